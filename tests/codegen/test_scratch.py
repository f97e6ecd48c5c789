"""Kernel scratch (kernels/common.h): the quantized GEMV's int8 activations, the attention's partials
and per-thread workspaces come from grow-only buffers kept between calls, so a decode step after
the first (and after a KV cache has grown) allocates nothing; icc_free_buffers gives them back and
the next run takes them again with the same results. Counted by a build with -DICC_COUNT_ALLOCS,
which counts every heap allocation of the runtime (kernels, memory plan, decode loop)."""

from __future__ import annotations

import ctypes

import pytest

import infercc
from infercc.codegen.build import NATIVE, build
from infercc.codegen.decoding import Decoding
from infercc.codegen.library import Library
from tests.codegen.test_c_backend import pair  # (ORT, C) compiles, cached across the codegen tests
from tests.fixtures import catalog

SETTINGS = {"stop_ids": [], "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0}


def _counting(model: infercc.CompiledModel, threads: int) -> tuple[Library, ctypes.CDLL]:
    """The model's source built with the allocation counter, on the model's weights."""
    program = model.backend.program
    library = Library(build(program.source, NATIVE + ("-DICC_COUNT_ALLOCS",)), program, threads=threads,
                      weights=model.backend.library.weights)
    library.lib.icc_alloc_count.restype = ctypes.c_int64
    return library, library.lib


def _allocations_per_token(library: Library, prompt: list[int], new: int) -> tuple[list[int], list[int]]:
    """Heap allocations made by each step of a C decode loop (the first: the prefill), and its tokens."""
    count = getattr(library.lib, "icc_alloc_count", lambda: 0)  # a plain build counts nothing
    counts: list[int] = []
    last = [count()]

    def seen(_token: int) -> int:
        now = count()
        counts.append(now - last[0])
        last[0] = now
        return 0

    decoding = Decoding(library, prompt, max_new_tokens=new, **SETTINGS)
    decoding.next(seen)
    tokens = decoding.tokens()
    decoding.close()
    return counts, tokens


@pytest.mark.parametrize("options", [{}, {"quantize": "int4"}], ids=["fp32", "int4"])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_steps_after_the_first_allocate_nothing(options: dict, threads: int) -> None:
    model = pair(str(catalog.fixture_path("llama_dynamo")), **options)[1]
    assert model.runtime == "c", model.runtime_reason
    library, _ = _counting(model, threads)
    # a 20-token prompt: the caches' first room (64 rows) holds every step, so nothing grows after
    # the first decode step, which moves the prefill's caches into their room; the values one
    # position longer each token (the mask, its positions) grow their slots by 4 KiB at a time
    prompt = [(7 * i + 3) % 50 + 1 for i in range(20)]
    counts, tokens = _allocations_per_token(library, prompt, 24)
    assert len(counts) == 24 and counts[0] > 0
    assert sum(c > 0 for c in counts[2:]) <= 1 and sum(counts[2:]) <= 4, counts
    # a second generation: its decode steps find every buffer and scratch the size they need
    counts, tokens_again = _allocations_per_token(library, prompt, 24)
    assert tokens_again == tokens and counts[2:] == [0] * 22, counts
    # the same tokens as the model's own (uncounted) library
    assert tokens == _allocations_per_token(model.backend.library, prompt, 24)[1]
    # the scratch is given back with the slots, and taken again with the same results
    assert library.free_buffers() > 0
    again, tokens_again = _allocations_per_token(library, prompt, 24)
    assert tokens_again == tokens and again[0] > 0 and sum(again[2:]) <= 4


def test_growing_and_shrinking_runs_reuse_the_scratch_with_unchanged_results() -> None:
    """Prefill sizes up and down (the int8 activations, attention partials and workspaces grow to
    the largest and are reused by smaller runs): outputs equal a fresh library's, bit for bit."""
    import numpy as np

    from infercc.runtime.feeds import check_feeds

    model = pair(str(catalog.fixture_path("llama_dynamo")), quantize="int4")[1]
    library, lib = _counting(model, 2)
    fresh = model.backend.library
    library.free_buffers()  # (the library is shared with the other test's: start with nothing)
    runs = []
    for batch, seq, seed in ((1, 3, 0), (2, 33, 1), (1, 5, 2), (3, 17, 3), (1, 3, 0)):
        feeds = catalog.random_feeds("llama_dynamo", batch, seq, padding=batch > 1, seed=seed)
        arrays = model.backend._arrays(check_feeds(model.model.graph, feeds))
        fresh.free_buffers()
        expected = fresh.run(arrays)
        before = lib.icc_alloc_count()
        for got, want in zip(library.run(arrays), expected):
            np.testing.assert_array_equal(got, want)
        runs.append(lib.icc_alloc_count() - before)
    # the first shape again: only the outputs the larger runs left far too large (trimmed) and the
    # present caches (on the heap, for the decode loop to take) are allocated
    assert runs[-1] < runs[0]
