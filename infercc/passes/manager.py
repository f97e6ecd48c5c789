"""Runs passes in order, safely: every pass works on the live model after a snapshot is taken; if it
raises, leaves an invalid graph, or (when checking) changes the outputs, the snapshot is restored
and compilation goes on. A failed optimization must never cost the user a working model."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import PassError
from ..ir import Model, verify
from ..ir.shapes import infer_shapes
from .base import Pass, PassContext
from .diagnostics import APPLIED, FAILED, Diagnostics, PassRecord

if TYPE_CHECKING:
    from ..config import Config
    from ..runtime.numerics import NumericCheck


class PassManager:
    def __init__(
        self,
        passes: Sequence[Pass],
        config: Config,
        *,
        check: NumericCheck | None = None,
        on_pass: Callable[[Pass, PassRecord], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.config = config
        self.check = check
        self.on_pass = on_pass

    def run(self, model: Model, diagnostics: Diagnostics | None = None) -> tuple[Model, Diagnostics]:
        diagnostics = diagnostics if diagnostics is not None else Diagnostics()
        properties: set[str] = set()
        for p in self.passes:
            record = PassRecord(p.name)
            start = time.perf_counter()
            missing = sorted(p.requires - properties)
            if missing:
                record.note(f"requires {', '.join(missing)}, which no earlier pass established")
            else:
                model = self._run_one(p, model, PassContext(self.config, record, properties), record)
                if record.status != FAILED:
                    properties |= p.ensures
            record.seconds = time.perf_counter() - start
            record.finish()
            diagnostics.records.append(record)
            if self.on_pass is not None:
                self.on_pass(p, record)
        return model, diagnostics

    def _run_one(self, p: Pass, model: Model, ctx: PassContext, record: PassRecord) -> Model:
        snapshot = model.clone()
        try:
            p.run(model, ctx)
            model.graph.sort()
            verify(model)
            if record.changes:
                infer_shapes(model)
            if self.check is not None and p.rebaseline:
                self.check.rebaseline(self._runnable(model))
            elif self.check is not None:
                # Also when nothing was recorded: a pass that changes numbers without saying so
                # is exactly what the check is for.
                self.check.compare(self._runnable(model))
            return model
        except Exception as exc:  # noqa: BLE001 - any failure of a pass is contained here
            if self.config.strict:
                raise PassError(f"pass {p.name} failed: {exc}") from exc
            record.status = FAILED
            record.changes.clear()
            record.sites = [s for s in record.sites if s.status != APPLIED]  # undone by the rollback
            first = str(exc).splitlines()[0] if str(exc) else ""
            record.note(f"rolled back: {type(exc).__name__}: {first}")
            record.info["traceback"] = traceback.format_exc(limit=6)
            return snapshot

    def _runnable(self, model: Model) -> Model:
        """The model as onnxruntime can run it: between a fusion and the lowering pass the graph
        holds canonical ops (domain ai.infercc) that no runtime knows, so the check runs a copy
        with them lowered (as the configured lowering would, for the CPU provider)."""
        from .canonical import DOMAIN
        from .lowering import LowerCanonicalOps

        if not any(n.domain == DOMAIN for n in model.graph.walk()):
            return model
        copy = model.clone()
        config = self.config.replace(provider="cpu", backend="ort")
        LowerCanonicalOps().run(copy, PassContext(config, PassRecord(LowerCanonicalOps.name)))
        return copy
