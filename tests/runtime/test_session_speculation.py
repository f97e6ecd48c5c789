"""Speculative decoding in session sequences: each ``decode()`` still returns one token, the plain
sequence's token for token under greedy decoding, on both layouts (paged pool, contiguous caches) and
both backends, whether the proposals are accepted (prompt lookup on a repetitive prompt, an oracle)
or all wrong; append / fork / reset / close with verified tokens pending give the plain tokens and
give every block back; seeded sampling is reproducible; a method that cannot run decodes plainly
and says why.

Models: the tiny random-weight LLaMA GGUF (ONNX Runtime and generated C), the llama_dynamo ONNX
decoder fixture, the hand-built graph without a cache, and stories260K (skipped when the shared
models are absent)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import infercc
from infercc import InputError
from infercc.runtime import session_speculation
from infercc.runtime.block_manager import OutOfBlocks
from infercc.runtime.kv_cache import ContextOverflowError
from infercc.runtime.sampling import Sampler, SamplingParams
from infercc.runtime.speculative import DepthPolicy, Proposal
from infercc.runtime.speculative.draft import DraftProposer
from tests.fixtures import catalog
from tests.fuzz.synthetic import write_tiny_gguf
from tests.importers._models import STORIES, require
from tests.runtime._cached_model import tiny_lm
from tests.runtime._threads import together
from tests.runtime.test_session_pool import BLOCK_BYTES

#: Repeats in it: prompt lookup finds matches (the tiny model's greedy text loops too).
PROMPT = [1, 5, 9, 3, 5, 9, 3, 5, 9, 3, 7, 2]
N = 48


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_gguf(tmp_path_factory.mktemp("session_spec") / "tiny.gguf", context=1024)


@pytest.fixture(scope="module")
def models(gguf) -> dict:
    out = {}
    for backend in ("ort", "c"):
        for layout in ("paged", "contiguous"):
            out[backend, layout] = compiled = infercc.compile(gguf, backend=backend, kv_cache_layout=layout)
            if backend == "c" and compiled.runtime != "c":
                pytest.skip(f"the generated-C runtime is not available here: {compiled.runtime_reason}")
    return out


@pytest.fixture(params=[("ort", "paged"), ("c", "paged"), ("ort", "contiguous"), ("c", "contiguous")],
                ids=lambda p: "-".join(p))
def model(request, models) -> infercc.CompiledModel:
    return models[request.param]


def plain(compiled, prompt=PROMPT, n=N, **sampling) -> list[int]:
    with compiled.session() as session:
        seq = session.sequence(speculation="off", **sampling)
        seq.prefill(prompt)
        return [seq.decode() for _ in range(n)]


class Scripted:
    """A proposer that guesses what the model itself decodes greedily next (a draft that is the
    target: "oracle", every guess stands) or a different token at every position ("wrong")."""

    name = "scripted"

    def __init__(self, compiled: infercc.CompiledModel, right: bool) -> None:
        self.oracle, self.right = DraftProposer("draft", compiled, cost=0.0), right

    def propose(self, key, tokens, k, params) -> Proposal:
        guess = self.oracle.propose(key, tokens, k, params).tokens
        return Proposal(list(guess) if self.right else [(t + 1) % 200 for t in guess])

    def release(self, key) -> None:
        self.oracle.release(key)


@pytest.fixture
def scripted(monkeypatch):
    """Make ``speculation="auto"`` sequences use a Scripted proposer at a fixed depth of 3."""
    def use(compiled: infercc.CompiledModel, right: bool) -> None:
        proposer = Scripted(compiled, right)
        monkeypatch.setattr(session_speculation, "proposer_for", lambda compiled, method: (proposer, ""))
        monkeypatch.setattr(session_speculation, "DepthPolicy", lambda config, draft_cost: DepthPolicy(config, fixed=3))
    return use


# -- greedy: the plain tokens ------------------------------------------------------------------------
def test_prompt_lookup_greedy_equals_plain_with_fewer_steps(model):
    expected = plain(model)
    with model.session() as session:
        seq = session.sequence(speculation="prompt_lookup")
        seq.prefill(PROMPT)
        steps = session.pool.steps if session.pool else 0
        got = [seq.decode() for _ in range(N)]
        assert got == expected
        assert seq.tokens == PROMPT + expected and len(seq) == len(PROMPT) + N and seq.output == expected
        stats = seq.speculation
        assert stats.accepted > 0 and stats.proposed >= stats.accepted and seq.speculation_reason is None
        # model steps: one per call but those that returned an accepted token (some are still pending)
        model_steps = N - stats.accepted + len(seq._spec.pending)
        assert stats.steps <= model_steps < N
        if session.pool:
            assert session.pool.steps - steps == model_steps


@pytest.mark.parametrize("right", [True, False], ids=["oracle", "all-wrong"])
def test_accepted_or_rejected_proposals_give_the_plain_tokens(model, scripted, right):
    expected = plain(model)
    scripted(model, right)
    with model.session() as session:
        seq = session.sequence(speculation="auto")
        seq.prefill(PROMPT)
        assert [seq.decode() for _ in range(N)] == expected
        stats = seq.speculation
        assert stats.proposed > 0
        assert stats.accepted == (stats.proposed if right else 0)


def test_on_the_onnx_decoder_fixture():
    compiled = infercc.compile(str(catalog.fixture_path("llama_dynamo")), provider="cpu")
    prompt = [3, 17, 42, 3, 17, 42, 3, 17]
    expected = plain(compiled, prompt, 40)
    with compiled.session() as session:
        seq = session.sequence(speculation="prompt_lookup")
        seq.prefill(prompt)
        assert [seq.decode() for _ in range(40)] == expected
        assert seq.speculation.steps > 0


# -- state changes with tokens pending ----------------------------------------------------------------
def test_append_reset_and_fork_with_pending_tokens_equal_plain(model, scripted):
    """An oracle at depth 3 keeps tokens pending after nearly every call; each change drops them."""
    def script(seq):
        seq.prefill(PROMPT)
        out = [seq.decode() for _ in range(5)]
        pending = [bool(seq._spec and seq._spec.pending)]
        seq.append([7, 7, 3])
        out += [seq.decode() for _ in range(6)]
        pending.append(bool(seq._spec and seq._spec.pending))
        child = seq.fork()
        out += [child.decode() for _ in range(7)] + [seq.decode() for _ in range(4)]
        pending.append(bool(seq._spec and seq._spec.pending))
        seq.reset()
        seq.prefill(PROMPT[:6])
        out += [seq.decode() for _ in range(8)]
        return out, child.tokens, seq.tokens, pending

    with model.session() as session:
        expected = script(session.sequence(speculation="off"))
    scripted(model, True)
    with model.session() as session:
        got = script(session.sequence(speculation="auto"))
        assert got[:3] == expected[:3]
        assert got[3] == [True, True, True]  # every change above came with tokens pending
    if model.config.kv_cache_layout == "paged":
        assert session.pool.report().used == 0


def test_fork_keeps_the_parents_pending_tokens_and_blocks_come_back(models, scripted):
    compiled = models["c", "paged"]
    expected = plain(compiled)
    scripted(compiled, True)
    with compiled.session() as session:
        seq = session.sequence(speculation="auto")
        seq.prefill(PROMPT)
        first = [seq.decode() for _ in range(2)]
        pool = session.pool
        assert seq._spec.pending and pool.blocks.num_tokens(seq._id) > len(seq)
        child = seq.fork()
        assert child.tokens == seq.tokens and pool.blocks.num_tokens(child._id) == len(child)
        assert child.speculation.steps == 0 and child._spec is not seq._spec
        assert first + [seq.decode() for _ in range(N - 2)] == expected
        assert first + [child.decode() for _ in range(N - 2)] == expected
        # verified tokens entered the prefix cache (keep); a prompt that starts alike reuses them
        hits = pool.report().prefix_hits
        reader = session.sequence()
        logits = reader.prefill(seq.tokens[:50])
        assert pool.report().prefix_hits - hits == 48
        with compiled.session() as fresh:
            np.testing.assert_allclose(logits, fresh.sequence().prefill(seq.tokens[:50]), atol=1e-4)
        reader.close()
        seq.append([4, 4])
        assert pool.blocks.num_tokens(seq._id) == len(seq) == len(PROMPT) + N + 2
        third = session.sequence(speculation="auto")
        third.prefill(PROMPT)
        third.decode()
        for s in (seq, child):
            s.close()
        del third
        gc.collect()
        seq2 = session.sequence()  # the next booking frees the dropped sequence's blocks
        seq2.prefill([1, 2])
        seq2.close()
        assert pool.report().used == 0


def test_session_decode_batches_speculating_and_plain_sequences(models):
    compiled = models["c", "paged"]
    prompts = [PROMPT, [1, 20, 21, 22, 20, 21, 22, 20], [1, 40, 41]]
    expected = [plain(compiled, p, 24) for p in prompts]
    with compiled.session(speculation="prompt_lookup") as session:
        seqs = [session.sequence(), session.sequence(), session.sequence(speculation="off")]
        for seq, prompt in zip(seqs, prompts):
            seq.prefill(prompt)
        rounds = [session.decode(seqs) for _ in range(24)]
        assert [list(r) for r in zip(*rounds)] == expected
        assert seqs[0].speculation.accepted > 0 and seqs[2].speculation is None
    assert session.pool.report().used == 0


def test_threads_decoding_speculating_sequences_equal_each_alone(models):
    compiled = models["c", "paged"]
    prompts = [PROMPT, [1, 20, 21, 22, 20, 21, 22, 20], [1, 40, 41, 40, 41]]
    expected = [plain(compiled, p, 24) for p in prompts]
    with compiled.session(speculation="prompt_lookup") as session:
        seqs = [session.sequence() for _ in prompts]
        for seq, prompt in zip(seqs, prompts):
            seq.prefill(prompt)
        assert together(lambda i: [seqs[i].decode() for _ in range(24)], len(prompts)) == expected


# -- limits ------------------------------------------------------------------------------------------
def test_the_context_end_and_a_full_pool_are_plain_decodings_limits(models, scripted):
    compiled = models["ort", "paged"]
    scripted(compiled, True)
    limit = len(PROMPT) + 20
    for speculation in ("off", "auto"):
        with compiled.session(max_context=limit) as session:
            seq = session.sequence(speculation=speculation)
            seq.prefill(PROMPT)
            assert [seq.decode() for _ in range(20)] == plain(compiled, n=20)
            with pytest.raises(ContextOverflowError):
                seq.decode()
    # a pool of 4 blocks: a verify step that would need a fifth decodes plainly instead
    with compiled.session(kv_cache_memory=4 * BLOCK_BYTES, max_context=64) as session:
        seq, other = session.sequence(speculation="auto"), session.sequence()
        seq.prefill(list(range(1, 48)))  # 47 tokens: one slot left in its third block
        other.prefill(list(range(50, 66)))  # the fourth block
        token = seq.decode()
        assert seq.speculation.steps == 0 and len(seq) == 48
        with pytest.raises(OutOfBlocks):
            seq.decode()  # (plain decoding needs a fifth block here too)
        other.close()
        assert [token, seq.decode()] == plain(compiled, list(range(1, 48)), 2)


# -- sampling ----------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(models, scripted):
    compiled = models["ort", "paged"]
    scripted(compiled, True)  # (the tiny model's sampled text gives prompt lookup no 2-token match)

    def sample(seed):
        with compiled.session() as session:
            seq = session.sequence(speculation="prompt_lookup", temperature=0.8, seed=seed)
            seq.prefill(PROMPT)
            tokens = [seq.decode() for _ in range(32)]
            child = seq.fork()
            return tokens + [child.decode() for _ in range(8)], seq.speculation

    (a, stats), (b, _), (c, _) = sample(7), sample(7), sample(8)
    assert a == b and a != c and stats.steps > 0


@pytest.mark.slow  # (300 samples: several seconds)
def test_sampled_tokens_have_the_models_distribution(models, scripted):
    """Rejection sampling in a session: the first two sampled tokens (the second one verified
    against the oracle's greedy guess: accepted with probability p(guess), else drawn from the
    residual) follow the model's own distribution (exact, from its logits) over 300 seeds."""
    compiled = models["ort", "paged"]
    options = {"temperature": 1.0, "top_k": 3}
    sampler = Sampler(SamplingParams(**options))
    scripted(compiled, True)
    with compiled.session() as session:
        root = session.sequence(speculation="auto", **options)
        first = sampler.probabilities(root.prefill(PROMPT), PROMPT, [])
        exact = {}
        for t1 in np.flatnonzero(first):
            second = sampler.probabilities(session.sequence().prefill(PROMPT + [int(t1)]), PROMPT, [int(t1)])
            exact.update({(int(t1), int(t2)): first[t1] * second[t2] for t2 in np.flatnonzero(second)})
        counts: dict[tuple[int, int], int] = {}
        stood = 0  # samples whose second token was the oracle's guess, accepted
        for seed in range(300):
            seq = root.fork(seed=seed)
            pair = (seq.decode(), seq.decode())
            counts[pair] = counts.get(pair, 0) + 1
            stood += seq.speculation.accepted > 0
            seq.close()
    assert 30 < stood < 270  # both ways through verification were taken
    distance = sum(abs(counts.get(pair, 0) / 300 - exact.get(pair, 0.0)) for pair in set(exact) | set(counts)) / 2
    assert distance < 0.12, (distance, counts, exact)  # (0.08 here; redrawing a rejected position: 0.19)


# -- fallbacks and errors ----------------------------------------------------------------------------
def test_a_method_that_cannot_run_decodes_plainly_with_the_reason(models):
    uncached = infercc.compile(tiny_lm(cached=False), optimize=False)
    with uncached.session() as session:
        with pytest.warns(RuntimeWarning, match="no KV cache"):
            seq = session.sequence(speculation="prompt_lookup")
        assert seq.speculation is None and "no KV cache" in seq.speculation_reason
        seq.prefill([1, 2, 3])
        assert seq.decode() is not None
    compiled = models["ort", "paged"]
    with compiled.session() as session:
        with pytest.warns(RuntimeWarning, match="medusa"):
            seq = session.sequence(speculation="medusa")  # no heads configured
        seq.prefill(PROMPT)
        assert [seq.decode() for _ in range(8)] == plain(compiled, n=8) and seq.speculation is None
        with pytest.warns(RuntimeWarning, match="medusa"):
            assert seq.fork().speculation_reason == seq.speculation_reason  # a fork inherits the method
        assert session.sequence().speculation is None  # Config.speculation: None
        with pytest.raises(InputError, match="session.sequence: speculation='fast'"):
            session.sequence(speculation="fast")
    with pytest.raises(InputError, match="compiled.session"):
        compiled.session(speculation="fast")


# -- a real model ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ort", "c"])
def test_stories260k_greedy_equals_plain(backend):
    compiled = infercc.compile(require(STORIES), backend=backend)
    prompt = compiled.tokenizer.encode("Lily had a red ball. Lily had a red ball. Lily had a")
    expected = plain(compiled, prompt, N)
    with compiled.session() as session:
        seq = session.sequence(speculation="prompt_lookup")
        seq.prefill(prompt)
        assert [seq.decode() for _ in range(N)] == expected
        assert seq.speculation.accepted > 0


# -- Medusa heads: the hidden state of each step ------------------------------------------------------
@pytest.mark.parametrize(("backend", "layout"), [("ort", "paged"), ("c", "paged"), ("ort", "contiguous")])
def test_medusa_heads_read_each_steps_hidden_state(tmp_path, gguf, backend, layout):
    from tests.runtime.speculative.test_medusa import fitted_heads

    compiled = infercc.compile(gguf, backend=backend, kv_cache_layout=layout, speculation="medusa")
    expected = plain(compiled, n=32)
    heads = fitted_heads(tmp_path / "heads", compiled, [(PROMPT, expected)])
    compiled.config = compiled.config.replace(speculation_heads=str(heads))
    with compiled.session() as session:
        seq = session.sequence()  # the config's method
        seq.prefill(PROMPT)
        assert [seq.decode() for _ in range(32)] == expected
        assert seq.speculation.accepted > 0, seq.speculation


# -- LoRA adapters: set_adapter with tokens pending -------------------------------------------------
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_set_adapter_with_pending_tokens_equals_plain(tmp_path, gguf, scripted, layout):
    from tests.lora.test_layouts import _random_adapter

    compiled = infercc.compile(gguf, infercc.Config(quantize=None, kv_cache_layout=layout))
    assert compiled.lora.modules  # (finds the projections an adapter may name)
    compiled.add_adapter("x", _random_adapter(compiled, tmp_path / "x"))
    scripted(compiled, True)  # the base model's own guesses: all stand without the adapter

    def run(speculation, counts):
        with compiled.session() as session:
            seq = session.sequence(adapter="x", speculation=speculation)
            seq.prefill(PROMPT)
            out, pending = [], []
            for phase, adapter in enumerate((None, "x", None)):
                out += [seq.decode() for _ in range(counts[phase])]
                pending.append(bool(seq._spec and seq._spec.pending))
                seq.set_adapter(adapter)
            return out + [seq.decode() for _ in range(6)], pending

    counts = (4, 5, 6)
    expected, _ = run("off", counts)
    got, pending = run("auto", counts)
    assert got == expected
    assert pending[1]  # the base-model phase: the oracle's tokens were pending at set_adapter("x")
