"""Speculative generation of one prompt, end to end on real compiled models: greedy output is the
plain loop's token for token for every proposer (prompt lookup, a separately compiled draft, the
self-draft) on both backends, stop ids/strings, max_new_tokens and the context end it exactly
where plain decoding does, streams show the same text, seeded sampling is reproducible, and a
draft that cannot be used means plain decoding with the reason, never an error.

Models: random HF checkpoints written here (a 2-layer LLaMA / GPT-2 and its exact 1-layer prefix
as the draft), the ONNX decoder fixtures, stories260K and SmolLM2 (skipped when ../shared is
absent; SmolLM2 behind ``slow``)."""

from __future__ import annotations

import warnings

import pytest

import infercc
from infercc import ConfigError
from infercc.runtime.engine import Engine
from infercc.runtime.generate import _tokenizer_or_none
from infercc.runtime.model_runner import ModelRunner
from infercc.runtime.sampling import SamplingParams
from infercc.runtime.speculative import DepthPolicy, make_proposer
from infercc.runtime.speculative.loop import SpeculativeGeneration
from tests.fixtures import catalog
from tests.fuzz.synthetic import write_tiny_gguf
from tests.importers._models import SMOLLM2, STORIES, require
from tests.runtime._cached_model import tiny_lm
from tests.runtime._hf_models import write_hf

#: Prompts with repeats (prompt lookup finds matches) in the tiny models' 64-token vocabulary.
PROMPTS = [[1, 5, 9, 3, 5, 9, 3, 5, 9, 3, 7, 2], [4, 8, 15, 16, 23, 42, 4, 8, 15], [7]]
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside. One day, Lily"


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict:
    """Target (2 layers) and draft (its first layer, exactly) of each family, on each backend."""
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for family, backends in (("llama", ("ort", "c")), ("gpt2", ("ort",))):
        target, draft = write_hf(root / family, family), write_hf(root / f"{family}-1", family, layers=1)
        for backend in backends:
            out[family, backend] = infercc.compile(target, backend=backend, draft_model=str(draft))
    return out


@pytest.fixture(scope="module")
def stories() -> infercc.CompiledModel:
    return infercc.compile(require(STORIES))


def forced(compiled: infercc.CompiledModel, method: str, prompt, k: int = 3, **options):
    """Generate with ``method`` verifying k proposals every step (the policy never turns it off)."""
    proposer, why = make_proposer(compiled, method, compiled.config)
    assert proposer is not None, why
    params = SamplingParams(**options)
    runner = ModelRunner(compiled.backend, compiled.model, None)
    generation = SpeculativeGeneration(runner, _tokenizer_or_none(compiled), [list(prompt)], params, proposer,
                                       DepthPolicy(compiled.config, fixed=k))
    return generation.run()[0]


#: Default run: every method on ONNX Runtime, prompt lookup on C (the C runtime's verify steps are
#: the same for every proposer); the other methods on C behind -m slow.
_MODELS = [("llama", "ort"), ("llama", "c"), ("gpt2", "ort")]
_CASES = [pytest.param(method, model, id=f"{method}-{'-'.join(model)}",
                       marks=[pytest.mark.slow] if model[1] == "c" and method != "prompt_lookup" else [])
          for method in ("prompt_lookup", "draft", "self_draft") for model in _MODELS]


@pytest.mark.parametrize(("method", "model"), _CASES)
def test_greedy_equals_plain_decoding(hf, model, method):
    compiled = hf[model]
    for prompt in PROMPTS:
        plain = compiled.generate(prompt, max_new_tokens=24, ignore_eos=True)
        spec = forced(compiled, method, prompt, max_new_tokens=24, ignore_eos=True)
        assert spec.token_ids == plain.token_ids, (method, prompt)
        assert spec.decode_loop == "speculative" and spec.speculation.steps > 0
        assert spec.speculation.proposed >= spec.speculation.accepted
        public = compiled.generate(prompt, max_new_tokens=24, ignore_eos=True, speculation=method)
        assert public.token_ids == plain.token_ids and public.speculation_reason is None


def test_the_exact_prefix_draft_is_accepted_more_than_chance(hf):
    """The 1-layer draft and the self-draft are the same model here: same proposals, same counts."""
    compiled = hf["llama", "ort"]
    draft = forced(compiled, "draft", PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    self_draft = forced(compiled, "self_draft", PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    assert draft.speculation == self_draft.speculation and draft.speculation.accepted > 0


@pytest.mark.parametrize("name", catalog.list_fixtures(kind="decoder")[:4])
def test_decoder_fixtures_greedy_equality(name):
    compiled = infercc.compile(str(catalog.FIXTURE_DIR / f"{name}.onnx"))
    prompt = PROMPTS[0]
    plain = compiled.generate(prompt, max_new_tokens=16, ignore_eos=True)
    for method in ("prompt_lookup", "self_draft"):
        assert forced(compiled, method, prompt, max_new_tokens=16, ignore_eos=True).token_ids == plain.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("name", catalog.list_fixtures(kind="decoder")[4:])
def test_more_decoder_fixtures_greedy_equality(name):
    test_decoder_fixtures_greedy_equality(name)


@pytest.mark.parametrize("method", ["prompt_lookup", "self_draft"])
def test_stories_greedy_stop_strings_and_limits_land_exactly(stories, method):
    plain = stories.generate(STORY, max_new_tokens=60)
    spec = forced(stories, method, stories.tokenizer.encode(STORY), k=4, max_new_tokens=60)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    for limit in (1, 2, 7, 13):  # max_new_tokens inside a verified run of tokens
        got = forced(stories, method, stories.tokenizer.encode(STORY), k=5, max_new_tokens=limit)
        assert got.token_ids == plain.token_ids[:limit] and got.finish_reason == "length"
    word = plain.text.split()[8]
    stop = stories.generate(STORY, max_new_tokens=60, stop=[word])
    got = forced(stories, method, stories.tokenizer.encode(STORY), k=5, max_new_tokens=60, stop=[word])
    assert (got.text, got.token_ids, got.stop_reason) == (stop.text, stop.token_ids, word)
    stop_id = plain.token_ids[11]
    ended = forced(stories, method, stories.tokenizer.encode(STORY), k=5, max_new_tokens=60,
                   stop_token_ids=[stop_id])
    assert ended.token_ids == plain.token_ids[:plain.token_ids.index(stop_id)] and ended.stop_reason == stop_id


def test_stream_and_context_limit(stories):
    plain = stories.generate(STORY, max_new_tokens=40, stop="park")
    stream = stories.stream(STORY, max_new_tokens=40, stop="park", speculation="prompt_lookup")
    assert "".join(stream) == plain.text and stream.result.token_ids == plain.token_ids
    assert stream.result.decode_loop == "speculative"
    prompt = stories.tokenizer.encode(STORY)
    context = len(prompt) + 9  # the context fills in the middle of a verified run
    plain = stories.generate(prompt, max_new_tokens=40, max_context=context)
    spec = stories.generate(prompt, max_new_tokens=40, max_context=context, speculation="prompt_lookup")
    assert spec.token_ids == plain.token_ids and len(spec.token_ids) == 9 and spec.finish_reason == "length"


def test_seeded_sampling_is_reproducible(stories):
    options = dict(max_new_tokens=30, temperature=0.9, top_k=40, seed=5)
    first = forced(stories, "self_draft", stories.tokenizer.encode(STORY), **options)
    again = forced(stories, "self_draft", stories.tokenizer.encode(STORY), **options)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 30
    assert first.speculation.proposed > 0


def test_missing_or_mismatched_draft_decodes_plainly_with_the_reason(hf, tmp_path):
    compiled = hf["llama", "ort"]
    plain = compiled.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True)
    missing = infercc.compile(write_hf(tmp_path / "t"), draft_model=str(tmp_path / "nowhere"))
    with pytest.warns(RuntimeWarning, match="nowhere"):
        result = missing.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, speculation="draft")
    assert result.token_ids == plain.token_ids and result.speculation is None
    assert "nowhere" in result.speculation_reason and result.decode_loop == "python"
    other = infercc.compile(write_hf(tmp_path / "u"), draft_model=str(write_tiny_gguf(tmp_path / "tiny.gguf")))
    with pytest.warns(RuntimeWarning, match="273 tokens, the target's 64"):
        result = other.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, speculation="draft")
    assert result.token_ids == plain.token_ids
    with pytest.warns(RuntimeWarning, match="draft_layers=5 is not below the model's 2 layers"):
        compiled = infercc.compile(write_hf(tmp_path / "v"), draft_layers=5)
        assert compiled.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True,
                                 speculation="self_draft").token_ids == plain.token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # speculation asked nowhere: no warning
        compiled.generate(PROMPTS[0], max_new_tokens=4)
    with pytest.raises(ConfigError, match="speculation must be one of"):
        compiled.generate(PROMPTS[0], speculation="lookahead")


def test_ort_4bit_weights_warn_once_that_greedy_equality_is_not_guaranteed(hf, tmp_path):
    """MatMulNBits on ONNX Runtime computes a verify step's rows with another kernel than a
    one-token step: greedy speculation warns once per model (the engine too); float weights and
    the C runtime do not."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in ("ort", "c"):
            hf["llama", backend].generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True, speculation="prompt_lookup")
        int4c = infercc.compile(write_hf(tmp_path / "c"), quantize="int4", quant_method="rtn", backend="c")
        int4c.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True, speculation="prompt_lookup")
    int4 = infercc.compile(write_hf(tmp_path / "q"), quantize="int4", quant_method="rtn")
    with pytest.warns(RuntimeWarning, match="MatMulNBits"):
        result = int4.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True, speculation="prompt_lookup")
    assert result.speculation is not None and result.speculation_reason is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        int4.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True, speculation="prompt_lookup")
    again = infercc.compile(write_hf(tmp_path / "q"), quantize="int4", quant_method="rtn")
    engine = Engine(again)
    with pytest.warns(RuntimeWarning, match="MatMulNBits"):
        engine.add_request("a", PROMPTS[0], SamplingParams(max_new_tokens=4), speculation="prompt_lookup")
    while engine.has_unfinished():
        engine.step()
    assert not engine.stats().speculation_notes


def test_uncached_model_and_batches_decode_plainly_with_the_reason():
    compiled = infercc.compile(tiny_lm(cached=False), optimize=False)
    plain = compiled.generate([1, 2, 3, 1, 2], max_new_tokens=6, ignore_eos=True)
    with pytest.warns(RuntimeWarning, match="no KV cache"):
        result = compiled.generate([1, 2, 3, 1, 2], max_new_tokens=6, ignore_eos=True, speculation="prompt_lookup")
    assert result.token_ids == plain.token_ids and "no KV cache" in result.speculation_reason


def test_config_speculation_applies_and_a_request_turns_it_off(tmp_path):
    compiled = infercc.compile(write_hf(tmp_path / "t"), speculation="prompt_lookup")
    assert compiled.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True).decode_loop == "speculative"
    off = compiled.generate(PROMPTS[0], max_new_tokens=12, ignore_eos=True, speculation=None)
    assert off.decode_loop == "python" and off.speculation is None


@pytest.mark.slow
def test_smollm2_greedy_equality():
    compiled = infercc.compile(require(SMOLLM2), backend="c")
    prompt = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog."}]
    plain = compiled.generate(prompt, max_new_tokens=40)
    prompt_ids = infercc.runtime.generate.encode_prompt(compiled, prompt)
    for method in ("prompt_lookup", "self_draft"):
        assert forced(compiled, method, prompt_ids, k=4, max_new_tokens=40).token_ids == plain.token_ids
