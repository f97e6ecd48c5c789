"""Text generation: the uncached path on the real stories260K checkpoint (greedy equals the
reference), batches of different lengths equal one-by-one runs, stop tokens and strings,
streaming, seeds, chat prompts, the cached path on the hand-built contract graph."""

from __future__ import annotations

import numpy as np
import pytest

import infercc
from infercc import InputError, ModelLoadError
from infercc.demo import tiny_decoder
from tests.importers._models import SMOLLM2, STORIES, reference, require
from tests.runtime._cached_model import CONTEXT, tiny_lm

STORY_PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went to the park to play"]


@pytest.fixture(scope="module")
def stories():
    return infercc.compile(require(STORIES))


@pytest.fixture(scope="module")
def ref():
    return reference(require(STORIES))


@pytest.fixture(scope="module")
def cached():
    return infercc.compile(tiny_lm(cached=True), optimize=False)


def test_greedy_uncached_matches_reference(stories, ref):
    result = stories.generate(ref["prompt"], max_new_tokens=32)
    assert result.prompt_token_ids == ref["prompt_ids"]
    assert result.token_ids == ref["ids"][:32]
    assert result.finish_reason == "length" and result.stop_reason is None
    assert result.text == stories.tokenizer.decode(ref["ids"][:32])
    assert result.text.startswith(", there was a little girl")
    assert result.prompt_seconds > 0 and result.decode_seconds > 0 and result.tokens_per_second > 0


def test_batch_of_different_lengths_equals_one_by_one(stories):
    together = stories.generate(STORY_PROMPTS, max_new_tokens=24)
    alone = [stories.generate(p, max_new_tokens=24) for p in STORY_PROMPTS]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]


def test_batch_with_sampling_equals_one_by_one_per_seed(stories):
    options = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=3)
    together = stories.generate(STORY_PROMPTS, **options)
    assert [r.token_ids for r in together] == [stories.generate(p, **options).token_ids for p in STORY_PROMPTS]


def test_same_seed_same_text(stories):
    options = dict(max_new_tokens=24, temperature=1.0, top_k=40, seed=11)
    first = stories.generate("Once upon a time", **options)
    assert stories.generate("Once upon a time", **options).text == first.text
    others = {stories.generate("Once upon a time", **{**options, "seed": s}).text for s in range(4)}
    assert len(others) > 1


def test_stop_token_ends_without_emitting_it(stories, ref):
    stop = ref["ids"][5]
    result = stories.generate(ref["prompt"], max_new_tokens=32, stop_token_ids=[stop])
    assert result.token_ids == ref["ids"][:5]
    assert result.finish_reason == "stop" and result.stop_reason == stop


def test_stop_string_cuts_text_and_stream_never_shows_it(stories):
    full = stories.generate("Once upon a time", max_new_tokens=32).text
    assert "Lily" in full
    result = stories.generate("Once upon a time", max_new_tokens=32, stop=["Lily", "never appears"])
    assert result.text == full[: full.index("Lily")]
    assert result.finish_reason == "stop" and result.stop_reason == "Lily"
    stream = stories.stream("Once upon a time", max_new_tokens=32, stop="Lily")
    pieces = list(stream)
    assert "".join(pieces) == result.text and not any("Li" in p for p in pieces[-2:])
    assert stream.result.text == result.text


def test_stream_pieces_add_up_to_the_text(stories):
    stream = stories.stream("Once upon a time", max_new_tokens=40)
    with pytest.raises(InputError, match="iterate"):
        stream.result  # noqa: B018 - the property raises before iteration
    pieces = list(stream)
    assert len(pieces) > 10 and "".join(pieces) == stream.result.text
    assert stream.result.text == stories.generate("Once upon a time", max_new_tokens=40).text


def test_prompt_forms(stories, ref):
    by_text = stories.generate(ref["prompt"], max_new_tokens=4)
    assert stories.generate(ref["prompt_ids"], max_new_tokens=4).token_ids == by_text.token_ids
    assert stories.generate(np.array(ref["prompt_ids"]), max_new_tokens=4).token_ids == by_text.token_ids
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = stories.generate(messages, max_new_tokens=4)
    tok = stories.tokenizer
    assert chat.prompt_token_ids == tok.encode(tok.apply_chat_template(messages), add_bos=False)
    for bad in ([], [[]], 3.5, [{"role": "user"}, 4]):
        with pytest.raises(InputError):
            stories.generate(bad, max_new_tokens=2)


def test_eos_stops_unless_ignored(cached):
    free = cached.generate([1, 2, 3], max_new_tokens=12)
    eos = free.token_ids[4]
    first = free.token_ids.index(eos)
    cached.model.metadata_props["infercc.eos_token_ids"] = f"[{eos}]"
    try:
        stopped = cached.generate([1, 2, 3], max_new_tokens=12)
        assert stopped.token_ids == free.token_ids[:first] and stopped.stop_reason == eos
        assert cached.generate([1, 2, 3], max_new_tokens=12, ignore_eos=True).token_ids == free.token_ids
    finally:
        del cached.model.metadata_props["infercc.eos_token_ids"]


def test_cached_contract_graph_generates_like_uncached(cached):
    uncached = infercc.compile(tiny_lm(cached=False), optimize=False)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    a = cached.generate(prompts, max_new_tokens=20)
    b = uncached.generate(prompts, max_new_tokens=20)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] == [cached.generate(p, max_new_tokens=20).token_ids for p in prompts]
    assert all(r.text == "" for r in a)  # no tokenizer: ids only


def test_generation_stops_at_the_context_end(cached):
    result = cached.generate(list(range(1, 31)) + list(range(1, 11)), max_new_tokens=20)
    assert result.finish_reason == "length" and len(result.prompt_token_ids) + len(result.token_ids) == CONTEXT
    with pytest.raises(infercc.InferccError, match="exceeds the model's maximum context"):
        cached.generate(list(range(1, 31)) * 2, max_new_tokens=2)


def test_model_without_mask_runs_rows_one_by_one():
    compiled = infercc.compile(tiny_decoder())
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    together = compiled.generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in together] == [compiled.generate(p, max_new_tokens=8).token_ids for p in prompts]


def test_text_needs_a_tokenizer(cached):
    with pytest.raises(ModelLoadError, match="Tokenizer.from_pretrained"):
        cached.generate("hello", max_new_tokens=2)
    with pytest.raises(InputError, match="stop strings need"):
        cached.generate([1, 2], max_new_tokens=2, stop="x")
    with pytest.raises(infercc.ConfigError, match="unknown sampling option"):
        cached.generate([1, 2], max_tokens=2)


def test_rows_that_finish_early_leave_the_batch(stories, cached):
    """Rows ending at different steps (a stop string; an EOS id) give what they give alone, and so
    do the rows that go on after the batch shrank."""
    options = dict(max_new_tokens=30, stop="Lily")
    together = stories.generate(STORY_PROMPTS, **options)
    alone = [stories.generate(p, **options) for p in STORY_PROMPTS]
    assert [(r.token_ids, r.text, r.finish_reason) for r in together] == [(r.token_ids, r.text, r.finish_reason) for r in alone]
    assert len({len(r.token_ids) for r in together}) > 1
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13]]
    free = [r.token_ids for r in cached.generate(prompts, max_new_tokens=16)]
    eos = free[1][3]
    cached.model.metadata_props["infercc.eos_token_ids"] = f"[{eos}]"
    try:
        together = cached.generate(prompts, max_new_tokens=16)
        assert [r.token_ids for r in together] == [cached.generate(p, max_new_tokens=16).token_ids for p in prompts]
        assert [r.token_ids for r in together] == [f[: f.index(eos)] if eos in f else f for f in free]
    finally:
        del cached.model.metadata_props["infercc.eos_token_ids"]


def test_export_counting_positions_itself_is_not_padded():
    """A torch export derives positions with a Range, not from the mask: padding would shift them,
    so its padded rows run one by one, and still equal the rows alone."""
    from infercc.runtime.model_runner import ModelRunner
    from tests.fixtures.catalog import fixture_path

    compiled = infercc.compile(fixture_path("llama_dynamo"))
    assert not ModelRunner(compiled.backend, compiled.model).pads_safely
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    together = compiled.generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in together] == [compiled.generate(p, max_new_tokens=8).token_ids for p in prompts]


def test_sequence_takes_text_through_the_tokenizer(stories, ref):
    with stories.session() as session:
        assert session.cached and session.max_context == 2048  # KV cache is on by default
        seq = session.sequence()
        seq.prefill(ref["prompt"])
        assert seq.tokens == ref["prompt_ids"]
        assert [seq.decode() for _ in range(8)] == ref["ids"][:8]
        seq.append(" Lily")  # later text gets no BOS
        assert seq.tokens[-len(stories.tokenizer.encode(" Lily", add_bos=False)):] == stories.tokenizer.encode(" Lily", add_bos=False)
        assert seq.text.startswith(ref["prompt"]) and seq.text.endswith("Lily")


@pytest.mark.slow
def test_smollm2_greedy_follows_llama_cpp_and_chats():
    """The Q4_1 grid kept (the default) vs llama.cpp's quantized dot products: the first tokens
    agree (they drift apart after ~30). The chat answer of the float32 weights ends at
    <|im_end|> and names Paris; with int8 activations this 135M model answers "L'Étoile, la
    Marseillaise, ..." instead, in llama.cpp (llama-cpp-python's chat completion, temperature 0)
    exactly as here, so the chat check runs on the dequantized weights."""
    gguf = require(SMOLLM2)
    ref = reference(gguf)
    compiled = infercc.compile(gguf)
    result = compiled.generate(ref["prompt"], max_new_tokens=16)
    assert result.prompt_token_ids == ref["prompt_ids"] and result.token_ids == ref["ids"][:16]
    compiled = infercc.compile(gguf, quantize=None)
    stream = compiled.stream([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    text = "".join(stream)
    assert "Paris" in text and stream.result.finish_reason == "stop"
    assert stream.result.stop_reason in compiled.tokenizer.eos_ids
