"""The fuzz child: makes variants of a base file, compiles and runs each, reports one JSON line per variant.

It runs in its own process, under an address-space limit, so that a crash, a hang or a runaway
allocation costs the harness one child, not the test session. The parent (``harness.py``) reads
the protocol lines; ``start`` is written before a variant is compiled, so the variant in flight
when the child dies or hangs is known.

Reproduce one variant by hand (the file is kept in DIR, the traceback printed in full)::

    python -m tests.fuzz.child gguf /work/shared/models/stories260K/stories260K.gguf DIR 17 --keep
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

import numpy as np

REPO = Path(__file__).resolve().parents[2]
PACKAGE = str(REPO / "infercc") + os.sep


def limit_memory(gib: float) -> None:
    """Cap the address space: a hostile size then fails as MemoryError instead of swapping the machine."""
    limit = int(gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _frame(f: traceback.FrameSummary) -> str:
    path = Path(f.filename)
    try:
        shown = str(path.resolve().relative_to(REPO))
    except ValueError:
        parts = path.parts
        shown = "/".join(parts[parts.index("site-packages") + 1:]) if "site-packages" in parts else path.name
    return f"{shown}:{f.lineno} {f.name}"


def describe(exc: BaseException, stage: str) -> dict[str, Any]:
    """The outcome of a variant that raised: whether it is an InferccError, the one-line message, where."""
    import infercc

    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(PACKAGE)]
    message = str(exc)
    return {
        "status": "error" if isinstance(exc, infercc.InferccError) else "bad",
        "stage": stage,
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": " ".join(message.split())[:400],
        "multiline": "\n" in message.strip(),
        "where": _frame(ours[-1]) if ours else None,
        "frames": [_frame(f) for f in frames[-5:]],
    }


def onnx_feeds(model, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
    """Feeds for every non-constant input: symbolic dims 1 (batch), 4 (sequence, total) or 0 (past);
    a concrete dim outside [0, 64] becomes 1 (the model then gets an InputError, which is fine).
    None when the feeds would be larger than 4M elements."""
    from infercc.ir import DType

    feeds = {}
    for v in model.graph.inputs:
        if v.const is not None:
            continue
        shape = []
        for d in v.shape or ():
            if isinstance(d, int):
                shape.append(d if 0 <= d <= 64 else 1)
            else:
                name = str(d).lower()
                shape.append(0 if "past" in name else 4 if ("seq" in name or "total" in name) else 1)
        if int(np.prod(shape, dtype=np.float64)) > 4_000_000:
            return None
        dtype = np.dtype((v.dtype or DType.FLOAT).numpy)
        if dtype == np.bool_ or "mask" in v.name.lower():
            feeds[v.name] = np.ones(shape, dtype)
        elif dtype.kind in "iuO":
            feeds[v.name] = np.zeros(shape, dtype)
        else:
            feeds[v.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_variant(fmt: str, path: Path, verbose: bool = False) -> dict[str, Any]:
    """Compile ``path``; if that works, one short run (GGUF: 2 greedy tokens; ONNX: one call)."""
    import infercc

    stage = "compile"
    try:
        if fmt == "selftest":
            return _selftest(path.name)
        lm = infercc.compile(path, intra_op_threads=1, inter_op_threads=1)
        stage = "run"
        if fmt == "gguf":
            lm.generate("Once", max_new_tokens=2)
        else:
            feeds = onnx_feeds(lm.model, np.random.default_rng(0))
            if feeds is None:
                return {"status": "ok", "stage": "run", "note": "inputs too large to feed; not run"}
            lm.run(feeds)
        return {"status": "ok", "stage": "run"}
    except Exception as exc:  # MemoryError and RecursionError are Exceptions too
        if verbose:
            traceback.print_exc()
        return describe(exc, stage)


#: what the harness's own test asks a "selftest" variant to do (seed modulo their number)
SELFTEST = ("ok", "infercc_error", "value_error", "huge_allocation", "escape", "abort", "hang")


def _selftest(kind: str) -> dict[str, Any]:
    """Misbehave on purpose, so the harness's detection of each failure kind is itself tested."""
    import infercc

    if kind == "infercc_error":
        raise infercc.ModelLoadError("selftest: a clean error")
    if kind == "value_error":
        raise ValueError("selftest: not an InferccError")
    if kind == "abort":
        os.abort()
    if kind == "hang":
        while True:
            pass
    if kind == "huge_allocation":
        np.ones(1 << 40, np.uint8)
    return {"status": "ok", "stage": "run"}


def write_variant(fmt: str, files: dict[str, Any], folder: Path) -> Path:
    """The variant's files in ``folder`` (links and directories as the mutation asked); the model path."""
    from .onnx_mutate import ABSOLUTE, MODEL, Directory, Link

    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = folder / name
        if isinstance(content, Link):
            os.symlink(content.target.replace(ABSOLUTE, str(folder.resolve().parent)), target)
        elif isinstance(content, Directory):
            target.mkdir()
        else:
            target.write_bytes(content)
    return folder / (MODEL if fmt == "onnx" else "model.gguf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("format", choices=("gguf", "onnx", "selftest"))
    parser.add_argument("base", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("seeds", type=int, nargs="+")
    parser.add_argument("--keep", action="store_true", help="keep the variant files and print tracebacks")
    parser.add_argument("--mem-gib", type=float, default=6.0)
    args = parser.parse_args(argv)

    # The protocol gets its own copy of stdout; fd 1 then goes to stderr, so whatever a library
    # prints (or a C extension writes) cannot corrupt it.
    protocol: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()
    limit_memory(args.mem_gib)

    def emit(**record: Any) -> None:
        protocol.write(json.dumps(record, default=str) + "\n")
        protocol.flush()

    import infercc  # noqa: F401 - imported before the first variant so its time is not charged to one

    from .onnx_mutate import ESCAPES, OUTSIDE, OUTSIDE_BYTES

    if args.format == "selftest":

        def make(seed: int):
            kind = SELFTEST[seed % len(SELFTEST)]
            return {}, f"{kind} {ESCAPES}" if kind == "escape" else kind
    elif args.format == "gguf":
        from .gguf_mutate import mutate_gguf, parse

        layout = parse(args.base.read_bytes())

        def make(seed: int):
            data, text = mutate_gguf(layout, seed)
            return {"model.gguf": data}, text
    else:
        from .onnx_mutate import OnnxBase, mutate_onnx

        base = OnnxBase.load(args.base)

        def make(seed: int):
            return mutate_onnx(base, seed)

    args.workdir.mkdir(parents=True, exist_ok=True)

    (args.workdir / OUTSIDE).write_bytes(b"\x01" * OUTSIDE_BYTES)  # what links out of a variant folder point at
    for seed in args.seeds:
        try:
            files, mutation = make(seed)
        except Exception as exc:
            emit(event="start", seed=seed, mutation="<mutator failed>")
            emit(event="done", seed=seed, status="harness", type=type(exc).__name__, message=str(exc)[:400],
                 frames=[_frame(f) for f in traceback.extract_tb(exc.__traceback__)[-5:]])
            continue
        folder = args.workdir / f"v{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        emit(event="start", seed=seed, mutation=mutation)
        path = write_variant(args.format, files, folder) if files else folder / mutation
        began = time.monotonic()
        outcome = run_variant(args.format, path, verbose=args.keep)
        if outcome["status"] == "ok" and ESCAPES in mutation:
            outcome = {"status": "accepted", "stage": outcome["stage"], "message": (
                "compiled (and ran) although its weights lie outside the model's folder (a symbolic link or path "
                "out of it): this must be a ModelLoadError")}
        emit(event="done", seed=seed, seconds=round(time.monotonic() - began, 3), **outcome)
        if args.keep:
            print(f"seed {seed}: {mutation}\n  -> {json.dumps(outcome)}\n  files in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
