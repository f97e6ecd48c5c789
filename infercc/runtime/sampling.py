"""Sampling: how the next token is chosen from a row of logits.

``SamplingParams`` is validated when made, each error naming the field and what it allows.
The sampler is pure NumPy with one ``np.random.Generator`` per request, seeded from
``params.seed``: the same seed gives the same tokens whatever else runs beside it (threads,
other rows of a batch).

Order, as Hugging Face applies its processors: penalties on the raw logits, then temperature,
top-k, top-p, min-p, then a draw. Temperature 0 is greedy (argmax after penalties).
Penalties: ``repetition_penalty`` has HF semantics (a seen token's logit is divided by it when
positive, multiplied when negative; "seen" covers prompt and output), ``frequency_penalty`` and
``presence_penalty`` have OpenAI semantics over the generated tokens (logit -= f * count + p * [count > 0]).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, reject_unknown


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    #: 0 = greedy (the default: reproducible); > 0 divides the logits before the draw.
    temperature: float = 0.0
    #: Keep only the k most likely tokens; 0 = off.
    top_k: int = 0
    #: Keep the smallest set of most likely tokens whose probability reaches top_p; 1 = off.
    top_p: float = 1.0
    #: Drop tokens less likely than min_p times the most likely one; 0 = off.
    min_p: float = 0.0
    #: HF repetition penalty (> 0; 1 = off, > 1 discourages tokens already in prompt or output).
    repetition_penalty: float = 1.0
    #: OpenAI frequency penalty in [-2, 2]: subtracted once per earlier occurrence in the output.
    frequency_penalty: float = 0.0
    #: OpenAI presence penalty in [-2, 2]: subtracted once if the token occurs in the output.
    presence_penalty: float = 0.0
    #: Seed of this request's generator; None draws fresh entropy.
    seed: int | None = None
    #: Most tokens to generate.
    max_new_tokens: int = 128
    #: Token ids that end generation (not included in the output). The model's EOS ids are added
    #: unless ``ignore_eos``.
    stop_token_ids: tuple[int, ...] = ()
    #: Strings that end generation; the output text stops before the first one.
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if isinstance(self.stop_token_ids, int) and not isinstance(self.stop_token_ids, bool):
            object.__setattr__(self, "stop_token_ids", (self.stop_token_ids,))
        _number(self, "temperature", lambda v: v >= 0, ">= 0 (0 = greedy)")
        _integer(self, "top_k", 0, "an integer >= 0 (0 = off)")
        _number(self, "top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 = off)")
        _number(self, "min_p", lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)")
        _number(self, "repetition_penalty", lambda v: v > 0, "> 0 (1 = off)")
        _number(self, "frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2] (0 = off)")
        _number(self, "presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2] (0 = off)")
        if self.seed is not None:
            _integer(self, "seed", 0, "None or an integer >= 0")
        _integer(self, "max_new_tokens", 1, "an integer >= 1")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ConfigError(f"SamplingParams.stop_token_ids must be a list of token ids >= 0, got {ids!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"SamplingParams.stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    def replace(self, **changes) -> SamplingParams:
        """A copy with some fields changed; unknown names are an error listing the valid ones."""
        reject_unknown(changes, (f.name for f in dataclasses.fields(self)), "sampling option")
        return dataclasses.replace(self, **changes)

    def __new__(cls, *args, **options) -> SamplingParams:
        """Unknown keywords are a ConfigError with the closest field suggested, as ``replace`` gives."""
        reject_unknown(options, (f.name for f in dataclasses.fields(cls)), "sampling option")
        return super().__new__(cls)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (``apply_penalties`` is more than a copy)."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty or self.presence_penalty)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _integer(params: SamplingParams, name: str, minimum: int, allowed: str) -> None:
    value = getattr(params, name)
    if not _is_int(value) or value < minimum:
        raise ConfigError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _number(params: SamplingParams, name: str, ok, allowed: str) -> None:
    value = getattr(params, name)
    if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool) \
            or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


# -- the pieces, each a pure function of logits -----------------------------------------------
def apply_penalties(logits: np.ndarray, params: SamplingParams, context: Sequence[int] = (),
                    output: Sequence[int] = ()) -> np.ndarray:
    """Penalized float64 copy of ``logits`` [vocab]; ``context`` = prompt (and appended) ids,
    ``output`` = generated ids."""
    x = np.array(logits, dtype=np.float64)
    if params.repetition_penalty != 1.0 and (len(context) or len(output)):
        seen = np.unique(np.concatenate([np.asarray(context, np.int64), np.asarray(output, np.int64)]))
        values = x[seen]
        x[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and len(output):
        tokens, counts = np.unique(np.asarray(output, np.int64), return_counts=True)
        x[tokens] -= params.frequency_penalty * counts + params.presence_penalty
    return x


def filter_logits(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p: a float64 copy with dropped tokens at -inf."""
    x = np.asarray(x, np.float64) / (params.temperature or 1.0)
    if 0 < params.top_k < x.size:
        keep = np.argpartition(-x, params.top_k - 1)[: params.top_k]
        kept = np.full_like(x, -np.inf)
        kept[keep] = x[keep]
        x = kept
    if params.top_p < 1.0:
        probs = _softmax(x)
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        before = np.cumsum(sorted_probs) - sorted_probs  # mass of the more likely tokens
        x[order[before >= params.top_p]] = -np.inf  # the most likely token always stays
    if params.min_p > 0:
        probs = _softmax(x)
        x[probs < params.min_p * probs.max()] = -np.inf
    return x


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Sampler:
    """Chooses tokens for one request: its params and its own seeded generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def probabilities(self, logits: np.ndarray, context: Sequence[int] = (), output: Sequence[int] = ()) -> np.ndarray:
        """The distribution a draw uses (one-hot on the argmax when greedy)."""
        x = apply_penalties(logits, self.params, context, output)
        if self.params.greedy:
            probs = np.zeros_like(x)
            probs[int(np.argmax(x))] = 1.0
            return probs
        return _softmax(filter_logits(x, self.params))

    def __call__(self, logits: np.ndarray, context: Sequence[int] = (), output: Sequence[int] = ()) -> int:
        """The next token for a row of ``logits`` [vocab]."""
        logits = np.asarray(logits).reshape(-1)
        if self.params.greedy:
            # Unpenalized: the raw row's argmax (the float64 copy would pick the same index, ties
            # and NaN included, at ~50 us per token of a 32k vocabulary).
            x = apply_penalties(logits, self.params, context, output) if self.params.penalized else logits
            return int(np.argmax(x))
        probs = self.probabilities(logits, context, output)
        cumulative = np.cumsum(probs)
        token = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        # Rounding can put the draw past the end: fall back to the last token with mass.
        return min(token, int(np.flatnonzero(probs)[-1]))
