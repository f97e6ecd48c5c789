"""Registry of benchmark cases: name -> `CaseDef` (a factory taking the parsed CLI options).

Why a plain dict: adding a case is one module plus one line here, with no plugin machinery.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.cases import (
    decode,
    matmul,
    packing,
    prefill,
    quant,
    roundtrip,
    serve,
    smollm2,
    speculative,
    stories,
)
from benchmarks.harness import Case


@dataclass(frozen=True)
class CaseDef:
    """`build` receives all CLI options (common ones such as `out`/`threads` plus the case's own)."""

    build: Callable[[argparse.Namespace], Case]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


CASES: dict[str, CaseDef] = {
    "roundtrip": CaseDef(roundtrip.build_case, _first_line(roundtrip.__doc__), roundtrip.add_arguments),
    "prefill": CaseDef(prefill.build_case, _first_line(prefill.__doc__), prefill.add_arguments),
    "matmul": CaseDef(matmul.build_case, _first_line(matmul.__doc__), matmul.add_arguments),
    "quant": CaseDef(quant.build_case, _first_line(quant.__doc__), quant.add_arguments),
    "decode": CaseDef(decode.build_case, _first_line(decode.__doc__), decode.add_arguments),
    "packing": CaseDef(packing.build_case, _first_line(packing.__doc__), packing.add_arguments),
    "smollm2": CaseDef(smollm2.build_case, _first_line(smollm2.__doc__), smollm2.add_arguments),
    "stories": CaseDef(stories.build_case, _first_line(stories.__doc__), stories.add_arguments),
    "serve": CaseDef(serve.build_case, _first_line(serve.__doc__), serve.add_arguments),
    "speculative": CaseDef(speculative.build_case, _first_line(speculative.__doc__), speculative.add_arguments),
}
