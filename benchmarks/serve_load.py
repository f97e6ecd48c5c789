"""Load generator of the serve case: N concurrent streaming clients against an OpenAI-compatible
server, with the official ``openai`` client (``AsyncOpenAI``), and the statistics of one load.

Why a closed loop of N clients (each sends its next request when its stream ends) rather than an
open-loop arrival rate: the issue asks for behaviour "at concurrency 1, 4 and 16", the number of
streams a server has in flight, which a closed loop holds fixed whatever the server's speed, so
every contender is measured under the same pressure.

What is measured, per request, on the client's clock (``time.perf_counter``): when it was sent,
when each chunk carrying text arrived, and how many tokens it made (the server's
``usage.completion_tokens`` when it reports it, else the number of text chunks). From those:

* ``out_tok_per_s``: tokens received by all clients / wall time of the whole load;
* ``req_per_s``: requests that ran to their end (not cancelled, no error) / wall time;
* TTFT (time to first token): send -> first text chunk, p50 and p95 over requests;
* ITL (inter-token latency): gaps between consecutive text chunks, pooled over all streams, p50;
* TPOT (time per output token): (last chunk - first chunk) / (tokens - 1) per request, p50; unlike
  the ITL it does not depend on how many tokens a server packs into one chunk.

A cancelled stream is closed by the client after ``cancel_after`` text chunks (closing the
response drops the connection, which a server sees as a client disconnect); its tokens count in
``out_tok_per_s`` (they were delivered) but it is not a completed request, and its TTFT/ITL are
left out of the others' figures so that the variant shows what cancelling does to the rest.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: Sentences the prompts are made of (plain prose written for this benchmark); each prompt starts
#: with its own number and a rotation of these, so no two prompts share a first KV block.
SENTENCES = (
    "The harbor town woke slowly in winter.",
    "Before dawn the bakers lit their ovens, and the smell of fresh bread drifted toward the water.",
    "The fishing boats rocked against the old stone pier while gulls circled above the masts.",
    "The lighthouse keeper climbed the spiral stairs one last time and turned down the lamp.",
    "He wrote the night's weather in a leather book that had belonged to his grandfather.",
    "Out on the bay, a ferry sounded its horn as it left for the islands with mail and tools.",
    "At the market, merchants argued about the price of apples and salt.",
    "Children ran between the stalls, chasing a dog that had stolen a loaf of bread.",
    "By noon the fog had lifted, and the mountains on the far side of the water were white with snow.",
    "The old teacher at the village school told her students a story about the first settlers.",
    "A carpenter repaired the roof of the chapel, whistling a tune nobody else remembered.",
    "In the evening the tavern filled with sailors who traded news from distant ports.",
)


def make_prompts(encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], count: int,
                 length: int, start: int = 0) -> list[str]:
    """``count`` distinct prompt texts of about ``length`` tokens each, numbered from ``start``.

    Why numbered from the first token on: a server with a prefix cache (infercc, vLLM) must not
    serve one request's prompt from another's; two prompts whose first ``block_size`` tokens differ
    share no cached block. The text is cut at ``length`` tokens of ``encode`` and decoded back, so
    a server's own tokenizer may count a token more or less at the cut."""
    prompts = []
    for i in range(start, start + count):
        k = i % len(SENTENCES)
        text = f"Note {i}. " + " ".join(SENTENCES[k:] + SENTENCES[:k])
        ids = encode(text)
        while len(ids) < length:
            text += " " + " ".join(SENTENCES)
            ids = encode(text)
        prompts.append(decode(ids[:length]))
    return prompts


def cancel_indices(n: int, fraction: float) -> set[int]:
    """Which of ``n`` requests (by index) the variant cancels: ``round(n * fraction)`` of them (at
    least one when ``fraction > 0``), spread evenly, so the same ones are cancelled on every server."""
    if fraction <= 0 or n <= 0:
        return set()
    k = min(n, max(1, round(n * fraction)))
    return {min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (as
    numpy's default), or None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class StreamRecord:
    """One streamed request as the client saw it; times are ``time.perf_counter()`` seconds."""

    index: int
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried text
    end: float | None = None
    usage_tokens: int | None = None  # usage.completion_tokens, when the server reported it
    prompt_tokens: int | None = None  # usage.prompt_tokens, when reported
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens received: the server's count when it gave one, else one per text chunk."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None for fewer than two tokens."""
        if len(self.chunk_times) < 2 or self.tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)

    @property
    def completed(self) -> bool:
        return not self.cancelled and self.error is None


@dataclass(frozen=True)
class LoadStats:
    """The figures of one load (see the module docstring); times in seconds, None where no request
    gave the figure."""

    concurrency: int
    requests: int
    completed: int
    cancelled: int
    errors: int
    short: int  # completed requests that made fewer tokens than asked (a server that stopped at EOS)
    wall_s: float
    out_tokens: int
    out_tok_per_s: float
    req_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None
    tpot_p50_s: float | None
    e2e_p50_s: float | None
    token_count: str  # "usage" when every completed request reported usage, else "chunks"
    first_error: str | None = None

    def figures(self, prefix: str) -> dict[str, float]:
        """Numbers for `benchmarks.harness.CallMetrics`, named ``<prefix>_<figure>`` so that the
        harness's naming rule gives each its '>1 = better' ratio (``*_per_s`` rates, ``*_s``
        times; counts get none). Figures no request gave are left out."""
        names = ("out_tok_per_s", "req_per_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "tpot_p50_s", "errors")
        out = {f"{prefix}_{name}": float(v) for name in names if (v := getattr(self, name)) is not None}
        if self.cancelled:
            out[f"{prefix}_cancelled"] = float(self.cancelled)
        if self.short:
            out[f"{prefix}_short"] = float(self.short)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(records: Sequence[StreamRecord], wall_s: float, concurrency: int, expected_tokens: int) -> LoadStats:
    """`LoadStats` of one load. Latencies come from completed requests only (a cancelled stream's
    TTFT is real but the variant asks how the others fared; an errored one has none)."""
    done = [r for r in records if r.completed]
    ttfts = [t for r in done if (t := r.ttft) is not None]
    gaps = [g for r in done for g in r.gaps]
    tpots = [t for r in done if (t := r.tpot) is not None]
    e2e = [r.end - r.start for r in done if r.end is not None]
    out_tokens = sum(r.tokens for r in records if r.error is None)
    errors = [r for r in records if r.error is not None]
    return LoadStats(
        concurrency=concurrency,
        requests=len(records),
        completed=len(done),
        cancelled=sum(r.cancelled for r in records),
        errors=len(errors),
        short=sum(r.tokens < expected_tokens for r in done),
        wall_s=wall_s,
        out_tokens=out_tokens,
        out_tok_per_s=out_tokens / wall_s if wall_s > 0 else 0.0,
        req_per_s=len(done) / wall_s if wall_s > 0 else 0.0,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        itl_p50_s=percentile(gaps, 50),
        tpot_p50_s=percentile(tpots, 50),
        e2e_p50_s=percentile(e2e, 50),
        token_count="usage" if done and all(r.usage_tokens is not None for r in done) else "chunks",
        first_error=errors[0].error if errors else None,
    )


@dataclass(frozen=True)
class LoadSpec:
    """What one load sends: each prompt once, ``concurrency`` streams at a time."""

    base_url: str  # http://127.0.0.1:PORT (no /v1)
    model: str
    prompts: Sequence[str]
    concurrency: int
    max_tokens: int
    extra_body: dict[str, Any] = field(default_factory=dict)  # server-specific fields (ignore_eos, logit_bias)
    include_usage: bool = True  # stream_options.include_usage: the server's own token count
    cancel: frozenset[int] = frozenset()  # request indices closed after `cancel_after` text chunks
    cancel_after: int = 0
    api_key: str = "none"
    timeout_s: float = 900.0


async def _one_stream(client: Any, spec: LoadSpec, index: int) -> StreamRecord:
    """Send request ``index`` and read its stream to the end (or to the cancel point)."""
    record = StreamRecord(index=index, start=time.perf_counter())
    extra: dict[str, Any] = {}
    if spec.include_usage:
        extra["stream_options"] = {"include_usage": True}
    try:
        stream = await client.completions.create(
            model=spec.model, prompt=spec.prompts[index], max_tokens=spec.max_tokens, temperature=0.0,
            stream=True, extra_body=dict(spec.extra_body) or None, **extra)
        try:
            async for chunk in stream:
                now = time.perf_counter()
                for choice in chunk.choices or ():
                    if choice.text:
                        record.chunk_times.append(now)
                    if choice.finish_reason:
                        record.finish_reason = choice.finish_reason
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    record.usage_tokens = usage.completion_tokens
                    record.prompt_tokens = usage.prompt_tokens
                if index in spec.cancel and len(record.chunk_times) >= spec.cancel_after:
                    record.cancelled = True
                    break
        finally:
            await stream.close()  # on a cancel: drops the connection mid-stream (the server sees a disconnect)
    except Exception as exc:  # any failure of one request is a counted error, not a crash of the load
        record.error = f"{type(exc).__name__}: {str(exc)[:300]}"
    record.end = time.perf_counter()
    return record


async def run_load_async(spec: LoadSpec, monitor: Callable[[], None] | None = None,
                         monitor_interval_s: float = 1.0) -> tuple[list[StreamRecord], float]:
    """Run the load: ``spec.concurrency`` clients take the prompts in order until none is left.
    Returns the records (in request order) and the wall time from the first send to the last end.
    ``monitor`` (blocking, run in a thread so it never stalls a stream) is called every
    ``monitor_interval_s`` while the load runs: a scrape of the server's /metrics, say."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=spec.base_url.rstrip("/") + "/v1", api_key=spec.api_key, max_retries=0,
                         timeout=spec.timeout_s)
    todo = iter(range(len(spec.prompts)))
    records: list[StreamRecord] = []

    async def worker() -> None:
        for index in todo:  # a shared iterator: each index goes to exactly one client
            records.append(await _one_stream(client, spec, index))

    async def watch() -> None:
        while True:
            await asyncio.to_thread(monitor)
            await asyncio.sleep(monitor_interval_s)

    watcher = asyncio.create_task(watch()) if monitor is not None else None
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, spec.concurrency))))
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await client.close()
    wall = time.perf_counter() - t0
    return sorted(records, key=lambda r: r.index), wall


def run_load(spec: LoadSpec, expected_tokens: int | None = None,
             monitor: Callable[[], None] | None = None) -> tuple[LoadStats, list[StreamRecord]]:
    """`run_load_async` in a fresh event loop, summarized."""
    records, wall = asyncio.run(run_load_async(spec, monitor))
    stats = summarize(records, wall, spec.concurrency, spec.max_tokens if expected_tokens is None else expected_tokens)
    return stats, records
