"""Prometheus metrics of one server (``GET /metrics``), on a registry of its own.

A per-app ``CollectorRegistry`` instead of prometheus_client's global one: two apps in one
process (tests, an embedding program) must not collide on metric names or mix their counts.

Two kinds of numbers:

* What the engine counts (requests running and waiting, prompt and generation tokens, KV blocks
  used/free/cached, prefix-cache lookups and hits, preemptions) is read from the engine's last
  ``EngineStats`` snapshot when scraped (``EngineCollector``): the engine is the one source of
  truth, and the engine thread never pays for a scrape.
* What only the server sees (time to first token, the time between tokens, end-to-end latency,
  requests by finish reason, HTTP errors by status) is observed as it happens, by the engine
  thread and the handlers (prometheus_client's metrics are thread-safe).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "infercc"
#: Time-to-first-token buckets (s): CPU prefill of short to long prompts.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Time between two tokens of a request (s).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineCollector(Collector):
    """Engine-side gauges and counters, read from ``snapshot()`` (an ``EngineStats``) per scrape."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot()
        if stats is None:
            return
        blocks = stats.blocks

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        info = GaugeMetricFamily(f"{PREFIX}_engine_info", "The engine's model-runner form (c-paged, ort-gather "
                                 "or contiguous); always 1.", labels=["runner"])
        info.add_metric([stats.runner], 1)
        yield info
        yield gauge("requests_running", "Requests the engine is running (holding KV blocks).", stats.running)
        yield gauge("requests_waiting", "Requests waiting in the engine's queue.", stats.waiting)
        yield counter("prompt_tokens", "Prompt tokens of the requests admitted, all requests.", stats.prompt_tokens)
        yield counter("prompt_tokens_cached", "Prompt tokens the prefix cache served (not computed).",
                      stats.cached_tokens)
        yield counter("generation_tokens", "Tokens generated, all requests.", stats.generation_tokens)
        yield counter("computed_tokens", "Tokens run through the model (prompts, decodes, recomputation).",
                      stats.computed_tokens)
        yield counter("engine_steps", "Engine steps run.", stats.steps)
        yield counter("preemptions", "Running requests preempted (blocks freed, recomputed later).", stats.preemptions)
        yield gauge("prefix_cache_hit_rate", "Share of admitted prompt tokens the prefix cache served.",
                    stats.prefix_hit_rate)
        kv = GaugeMetricFamily(f"{PREFIX}_kv_blocks", "KV-cache blocks by state: used (referenced by a sequence), "
                               "cached (unreferenced, in the prefix cache, evictable), free (empty).", labels=["state"])
        for state in ("used", "cached", "free"):
            kv.add_metric([state], getattr(blocks, state))
        yield kv
        yield gauge("kv_pool_blocks", "KV-cache blocks in the pool (used + cached + free).", blocks.total)
        yield gauge("kv_cache_usage", "Fraction of the KV-cache blocks in use.",
                    blocks.used / blocks.total if blocks.total else 0.0)
        yield gauge("kv_block_waste", "Fraction of the used blocks' slots that hold no token.", blocks.waste)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", blocks.prefix_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", blocks.prefix_hits)
        spec = stats.speculation
        proposed, accepted, steps = (spec.proposed, spec.accepted, spec.steps) if spec is not None else (0, 0, 0)
        yield counter("spec_proposed_tokens", "Tokens proposed by speculative decoding (verified by the model).",
                      proposed)
        yield counter("spec_accepted_tokens", "Proposed tokens the model accepted (emitted without a step of "
                      "their own).", accepted)
        yield counter("spec_verify_steps", "Speculative rows verified (each emits its accepted tokens + 1).", steps)
        yield gauge("spec_acceptance_rate", "Accepted / proposed tokens so far (0 before any proposal).",
                    accepted / proposed if proposed else 0.0)
        yield gauge("spec_tokens_per_step", "Mean tokens a speculative row emitted per verify step.",
                    (accepted + steps) / steps if steps else 0.0)
        lora = stats.lora or {"adapters": [], "merged_cache": {"hits": 0, "misses": 0, "bytes": 0}}
        merged = lora["merged_cache"]
        yield gauge("lora_adapters", "LoRA adapters loaded.", len(lora["adapters"]))
        yield counter("lora_merged_hits", "Adapter batches run on a cached merged-weight copy.", merged["hits"])
        yield counter("lora_merged_misses", "Single-adapter batches run with the deltas (no merged copy).",
                      merged["misses"])
        yield gauge("lora_merged_bytes", "Bytes of the merged-weight copies held.", merged["bytes"])


class Metrics:
    """The server's registry and the metrics it observes itself."""

    def __init__(self, snapshot: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between two tokens of a request.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "Arrival to the end of a request.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(f"{PREFIX}_requests", "Engine requests ended, by finish reason (stop, length, "
                                "abort: the client left; error: the engine failed).", ["finish_reason"],
                                registry=self.registry)
        self.errors = Counter(f"{PREFIX}_http_errors", "Requests answered with an error, by HTTP status.",
                              ["status"], registry=self.registry)
        for reason in ("stop", "length", "abort", "error"):
            self.requests.labels(reason)
        self.registry.register(EngineCollector(snapshot))

    def tokens(self, arrival: float, last: float | None, now: float, count: int) -> None:
        """``count`` new tokens of a request at ``now``: the first one's delay (TTFT) and the
        time per token since the previous output."""
        if last is None:
            self.ttft.observe(now - arrival)
            count -= 1
            last = now
        for _ in range(count):
            self.itl.observe((now - last) / count)

    def finished(self, arrival: float, reason: str, now: float | None = None) -> None:
        self.requests.labels(reason).inc()
        self.latency.observe((now if now is not None else time.monotonic()) - arrival)

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
