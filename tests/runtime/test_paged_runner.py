"""PagedRunner against the contiguous ModelRunner: three prompts of different lengths stepped
together over a shared block pool (one prompt in two chunks, then decode steps whose rows have
different past lengths) give each prompt's greedy tokens run alone, and logits within 1e-4, in
both forms ("c-paged": the PagedAttention library; "ort-gather": blocks gathered into the
contiguous cached graph). Blocks come from a hand-made free list (scattered, out of order).

Models: small random checkpoints written as Hugging Face folders (config.json + safetensors, no
torch), imported by infercc (positions from the mask's cumsum: rows of different past lengths
share a call), and torch-exported fixtures (positions counted over the mask's length: such rows
run apart, and the test shows that sharing a call would be wrong). C builds are the slow part:
each model is compiled once per module.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

import infercc
from infercc.errors import ConfigError, InputError
from infercc.runtime.kv_cache import CacheSpec, ContextOverflowError
from infercc.runtime.model_runner import ModelRunner
from infercc.runtime.paged_runner import PagedRow, PagedRunner
from tests.fixtures import catalog
from tests.importers._models import STORIES, require

from ._hf_models import write_hf

TOLERANCE = 1e-4
PROMPTS = [[1, 5, 9, 13, 7, 22, 3, 40, 11, 2, 17], [4, 8, 15, 16, 23], [42, 3, 9]]
STEPS = 8
BLOCK = 4


# -- models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paged_models")
    return {"llama": write_hf(root / "llama"), "mistral": write_hf(root / "mistral", "mistral", sliding_window=4),
            "gpt2": write_hf(root / "gpt2", "gpt2")}


@functools.cache
def compiled(source: str, **options) -> infercc.CompiledModel:
    return infercc.compile(source, **{"kv_cache_dtype": "fp32", **options})


# -- driving --------------------------------------------------------------------------------------
class Blocks:
    """A tiny hand-made allocator: a free list of scattered ids, each sequence's table grown as it needs."""

    def __init__(self, num_blocks: int) -> None:
        self.free = [b for pair in zip(range(num_blocks // 2), range(num_blocks - 1, num_blocks // 2 - 1, -1))
                     for b in pair][::-1]  # 0, last, 1, last-1, ... popped from the end
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    def row(self, seq: object, tokens: list[int]) -> PagedRow:
        table, start = self.tables.setdefault(seq, []), self.lengths.get(seq, 0)
        while len(table) * BLOCK < start + len(tokens):
            table.append(self.free.pop())
        self.lengths[seq] = start + len(tokens)
        return PagedRow(seq, list(tokens), start, list(table))


def paged_run(runner: PagedRunner, prompts: list[list[int]] = PROMPTS, steps: int = STEPS, chunked: bool = True):
    """Greedy tokens and the logits of every step, per prompt: prompt 0 in two chunks (the first
    beside prompt 1, the second beside prompt 2; or an empty first chunk), then ``steps`` decode
    steps of all rows at once."""
    blocks = Blocks(runner.num_blocks)
    logits: dict[int, list[np.ndarray]] = {i: [] for i in range(len(prompts))}
    half = len(prompts[0]) // 2 if chunked else 0
    first = runner.step(([blocks.row(0, prompts[0][:half])] if half else []) + [blocks.row(1, prompts[1])])
    logits[1].append(first[-1])
    second = runner.step([blocks.row(0, prompts[0][half:])] + [blocks.row(i, prompts[i]) for i in range(2, len(prompts))])
    logits[0].append(second[0])
    for i in range(2, len(prompts)):
        logits[i].append(second[i - 1])
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    for _ in range(steps):
        rows = []
        for i in range(len(prompts)):
            tokens[i].append(int(np.argmax(logits[i][-1])))
            rows.append(blocks.row(i, [tokens[i][-1]]))
        out = runner.step(rows)
        for i in range(len(prompts)):
            logits[i].append(out[i])
    return tokens, logits


def alone(model: infercc.CompiledModel, prompt: list[int], steps: int = STEPS):
    """The same prompt through the contiguous ModelRunner, alone."""
    runner = ModelRunner(model.backend, model.model)
    cache = runner.new_cache(1)
    logits = [runner.step(cache, [prompt])[0]]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(runner.step(cache, [[tokens[-1]]])[0])
    return tokens, logits


def assert_alone(model: infercc.CompiledModel, runner: PagedRunner, prompts: list[list[int]] = PROMPTS,
                 chunked: bool = True, tolerance: float = TOLERANCE, varied: bool = True) -> None:
    """Each prompt's greedy tokens equal its tokens alone, and every step's logits are within
    ``tolerance``; ``varied``: the model emits more than a few distinct tokens (so equal tokens mean
    something)."""
    tokens, logits = paged_run(runner, prompts, chunked=chunked)
    for i, prompt in enumerate(prompts):
        want_tokens, want_logits = alone(model, prompt)
        assert tokens[i] == want_tokens, (i, runner.form)
        assert len(logits[i]) == len(want_logits)
        for got, want in zip(logits[i], want_logits):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want.astype(np.float32), atol=tolerance, rtol=0)
    assert not varied or len(set(sum(tokens.values(), []))) > 3  # the model says something, not one token forever


# -- the forms ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_paged_library_reads_the_plain_librarys_weights(folders: dict, quantize: str | None) -> None:
    """The paged graph's library points at the plain library's weight bytes (one resident copy),
    whichever of the two is built first, and computes what it computed with its own copy."""
    for paged_first in (True, False):
        model = infercc.compile(str(folders["llama"]), backend="c", kv_cache_dtype="fp32", quantize=quantize)
        if not paged_first:
            assert model.runtime == "c"  # the plain library first
        runner = PagedRunner(model, 24, BLOCK)
        assert runner.form == "c-paged", runner.reason
        assert_alone(model, runner)
        assert runner.backend.library.weights is model.backend.library.weights
        if quantize:
            assert model.model.graph.op_histogram().get("ai.infercc::MatMulQuant", 0) > 0


@pytest.mark.parametrize("form", ["auto", "ort-gather"])
def test_c_model_both_forms_equal_each_prompt_alone(folders: dict, form: str) -> None:
    """Rows of different past lengths share every decode call (3 rows -> 1 run per step)."""
    model = compiled(str(folders["llama"]), backend="c")
    runner = PagedRunner(model, 24, BLOCK, form=form)
    assert runner.form == ("c-paged" if form == "auto" else "ort-gather"), runner.reason
    assert runner.padding is None
    if runner.form == "c-paged":
        assert runner.lowering.status == "applied" and runner.lowering.changes == {"layers_paged": 2}
        assert runner.paged_model.graph.op_histogram()["ai.infercc::PagedAttention"] == 2
    assert_alone(model, runner)
    assert runner.runs == 1 + 2 + STEPS  # prompt chunks of 5 + 5, then of 6 and 3, then one run per step


def test_greedy_steps_return_the_logits_argmax(folders: dict) -> None:
    """step_greedy's ids are the argmax of the logits step gives for the same rows (writing the
    same K/V again), and it declines what it cannot run as one greedy call."""
    model = compiled(str(folders["llama"]), backend="c")
    runner = PagedRunner(model, 24, BLOCK)
    blocks = Blocks(runner.num_blocks)
    prompts = [blocks.row(i, p) for i, p in enumerate(PROMPTS)]
    assert runner.step_greedy(prompts) is None  # rows of several lengths
    runner.step(prompts)
    for step in range(4):
        rows = [blocks.row(i, [7 + 3 * i + step]) for i in range(len(PROMPTS))]
        logits = runner.step(rows)
        ids = runner.step_greedy(rows)
        assert ids.dtype == np.int64 and ids.tolist() == np.argmax(logits, axis=-1).tolist()
    assert runner.step_greedy([PagedRow(0, [1, 2], 0, [0], num_logits=2)]) is None
    assert PagedRunner(model, 24, BLOCK, form="ort-gather").step_greedy(rows) is None


def test_ort_model_gathers_and_runs_rows_apart(folders: dict) -> None:
    """On ONNX Runtime the lowered graph's positions are not analysed: rows of different past
    lengths run in calls of their own (still each prompt's result alone)."""
    model = compiled(str(folders["llama"]))
    runner = PagedRunner(model, 24, BLOCK)
    assert runner.form == "ort-gather" and "ONNX Runtime" in runner.reason and runner.lowering is None
    assert runner.padding
    assert_alone(model, runner)
    assert runner.runs == 1 + 2 + 3 * STEPS


def test_int8_cache_gathers_its_scales_too(folders: dict) -> None:
    model = compiled(str(folders["llama"]), kv_cache_dtype="int8")
    runner = PagedRunner(model, 24, BLOCK)
    assert runner.form == "ort-gather"
    assert {p.split(".")[-1] for p in runner.pools} == {"key", "value", "key_scale", "value_scale"}
    spec = CacheSpec.from_model(model.model)
    assert PagedRunner.bytes_per_token(model) == spec.bytes_per_token == 2 * 2 * 2 * (8 + 4)
    assert runner.bytes_per_block == BLOCK * spec.bytes_per_token
    # no chunked prompt: an int8 graph attends to this call's own keys unrounded and to earlier
    # calls' keys rounded, so how a prompt is split into calls changes its results (contiguous too)
    assert_alone(model, runner, chunked=False)


def test_positions_from_the_length_keep_rows_apart() -> None:
    """A torch export counts positions over the mask's length (rotary from a Range): the runner
    runs rows of different past lengths apart and gets each prompt's result; padding them into
    one call (what ``padding`` prevents) changes the logits."""
    model = compiled(str(catalog.fixture_path("llama_dynamo")))
    runner = PagedRunner(model, 24, BLOCK)
    assert "counts positions" in runner.padding or "could not be analysed" in runner.padding
    assert_alone(model, runner, [[5, 9, 13, 2, 7, 30, 31], [11, 4, 200], [60, 61, 62, 63]])
    forced = PagedRunner(model, 24, BLOCK)
    forced.padding = None  # what the runner would do if it did not know
    tokens, logits = paged_run(forced, [[5, 9, 13, 2, 7, 30, 31], [11, 4, 200], [60, 61, 62, 63]], steps=2)
    _, want = alone(model, [11, 4, 200], steps=2)
    assert max(np.abs(g - w).max() for g, w in zip(logits[1], want)) > 1e-3


def test_copy_on_write_fork(folders: dict) -> None:
    """A child shares its parent's blocks; the partly filled last block is copied (copy_blocks)
    before either appends. Both continue with different tokens and each equals its own sequence
    run alone."""
    model = compiled(str(folders["llama"]), backend="c")
    runner = PagedRunner(model, 16, BLOCK)
    prompt = [1, 5, 9, 13, 7, 22]  # 1.5 blocks
    runner.step([PagedRow("parent", prompt, 0, [3, 9])])
    runner.copy_blocks([(9, 12)])
    out = runner.step([PagedRow("parent", [40], 6, [3, 9]), PagedRow("child", [41], 6, [3, 12])])
    out = runner.step([PagedRow("parent", [2], 7, [3, 9, 5]), PagedRow("child", [2], 7, [3, 12, 6])])
    for row, first in ((0, 40), (1, 41)):
        reference = ModelRunner(model.backend, model.model)
        cache = reference.new_cache(1)
        reference.step(cache, [prompt + [first]])
        np.testing.assert_allclose(out[row], reference.step(cache, [[2]])[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("form", ["auto", "ort-gather", "contiguous", "contiguous-ort"])
def test_trailing_logits_and_rewrite_after_rollback(folders: dict, form: str) -> None:
    """What speculative verification needs: a row asks for the logits of its last k + 1 tokens
    (stacked after the other rows' one each), equal to the contiguous runner's every-position
    logits; then a rollback (the next step starts inside the written tokens: rejected ones are
    overwritten) gives the logits of the sequence as if the rejected tokens never ran."""
    from infercc.runtime.contiguous_runner import ContiguousRunner

    model = compiled(str(folders["llama"]), backend="ort" if form == "contiguous-ort" else "c")
    contiguous = form.startswith("contiguous")
    runner = ContiguousRunner(model, 24, BLOCK) if contiguous else PagedRunner(model, 24, BLOCK, form=form)
    prompt, drafts = [1, 5, 9, 13, 7], [22, 3, 40]
    out = runner.step([PagedRow("a", prompt, 0, [7, 2]), PagedRow("b", [4, 8], 0, [11])])
    assert out.shape[0] == 2
    out = runner.step([PagedRow("b", [15], 2, [11]), PagedRow("a", drafts, 5, [7, 2], num_logits=3)])
    reference = ModelRunner(model.backend, model.model)
    cache = reference.new_cache(1)
    reference.step(cache, [prompt])
    want = reference.step(cache, [drafts], all_logits=True)[0]
    assert out.shape[0] == 4
    np.testing.assert_allclose(out[1:], want, atol=TOLERANCE, rtol=0)
    # keep prompt + drafts[0]; drafts[1:] were rejected: the next step writes from position 6 on
    again = runner.step([PagedRow("a", [17, 2], 6, [7, 2], num_logits=2)])
    cache.truncate(6)
    want = reference.step(cache, [[17, 2]], all_logits=True)[0]
    np.testing.assert_allclose(again, want, atol=TOLERANCE, rtol=0)
    if not contiguous:
        with pytest.raises(InputError, match="asks for 3 logits; it must be in 1..2"):
            runner.step([PagedRow("a", [1, 2], 8, [7, 2], num_logits=3)])


# -- refusals -------------------------------------------------------------------------------------
def test_bad_rows_are_refused_before_anything_is_written(folders: dict) -> None:
    model = compiled(str(folders["llama"]))
    runner = PagedRunner(model, 8, BLOCK)
    runner.step([PagedRow("a", [1, 2, 3], 0, [0])])
    before = {k: v.copy() for k, v in runner.pools.items()}
    good = PagedRow("b", [4, 5], 0, [1])
    cases = {
        "outside the pool": [good, PagedRow("a", [4], 3, [8])],
        "needs 2": [PagedRow("a", [4, 5], 3, [0]), good],
        "appears twice": [good, PagedRow("b", [6], 2, [1])],
        "no new tokens": [PagedRow("a", [], 3, [0])],
        "outside the vocabulary": [good, PagedRow("a", [64], 3, [0])],
        "start -1": [PagedRow("a", [1], -1, [0])],
    }
    for pattern, rows in cases.items():
        with pytest.raises(InputError, match=pattern) as info:
            runner.step(rows)
        assert "\n" not in str(info.value)
        for name, pool in runner.pools.items():
            assert np.array_equal(pool, before[name]), pattern
    with pytest.raises(ContextOverflowError, match="maximum context 96"):
        runner.step([PagedRow("a", [1] * 94, 3, list(range(8)) * 4)])
    with pytest.raises(InputError, match="outside the pool"):
        runner.copy_blocks([(0, 8)])


def test_config_errors(folders: dict) -> None:
    ort_model = compiled(str(folders["llama"]))
    with pytest.raises(ConfigError, match="form='c-paged' is not possible.*ONNX Runtime"):
        PagedRunner(ort_model, 8, BLOCK, form="c-paged")
    with pytest.raises(ConfigError, match="num_blocks must be a positive integer"):
        PagedRunner(ort_model, 0, BLOCK)
    with pytest.raises(ConfigError, match="form must be"):
        PagedRunner(ort_model, 8, BLOCK, form="paged")
    uncached = compiled(str(folders["llama"]), kv_cache=False)
    for call in (lambda: PagedRunner(uncached, 8, BLOCK), lambda: PagedRunner.bytes_per_token(uncached)):
        with pytest.raises(ConfigError, match="without a KV cache.*kv_cache=True"):
            call()


# -- heavier variants (run with -m slow) ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,options", [
    ("mistral", {"backend": "c"}),                         # sliding window of 4, per-row
    ("gpt2", {"backend": "c"}),                            # learned absolute positions, from the cumsum
    ("llama", {"backend": "c", "kv_cache_dtype": "fp16"}),  # fp16 pool
    ("llama_dynamo", {"backend": "c"}),                    # torch export on C: rows apart
    ("mistral_torchscript", {"backend": "c"}),             # torch export, sliding window, on C
    ("gpt2_torchscript", {}),                              # torch export, learned positions, on ORT
])
@pytest.mark.parametrize("form", ["auto", "ort-gather"])
def test_more_models_equal_each_prompt_alone(folders: dict, name: str, options: dict, form: str) -> None:
    """fp16: tokens equal, logits to fp16's rounding (a batch of 3 rounds a key's last fp32 bit
    differently than a batch of 1 now and then, which moves an fp16 key by one unit)."""
    source = str(folders[name]) if name in folders else str(catalog.fixture_path(name))
    model = compiled(source, **options)
    runner = PagedRunner(model, 24, BLOCK, form=form)
    assert runner.form == ("c-paged" if form == "auto" and options.get("backend") == "c" else "ort-gather")
    half = options.get("kv_cache_dtype") == "fp16"
    assert_alone(model, runner, tolerance=1e-2 if half else TOLERANCE, varied=name != "gpt2_torchscript")


@pytest.mark.slow
def test_stories260k_checkpoint() -> None:
    """A real GGUF checkpoint (LLaMA, GQA) on the C runtime: c-paged, rows of different past lengths
    in one call, each prompt's tokens as alone."""
    model = compiled(str(require(STORIES)), backend="c")
    runner = PagedRunner(model, 32, 16)
    assert runner.form == "c-paged" and runner.padding is None, (runner.reason, runner.padding)
    assert_alone(model, runner)
