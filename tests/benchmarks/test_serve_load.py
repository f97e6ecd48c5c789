"""The serve case's load generator: its statistics on known records, and a real load through the
official openai client against a small streaming server on 127.0.0.1 whose timing the test sets."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from benchmarks.serve_load import (
    LoadSpec,
    StreamRecord,
    cancel_indices,
    make_prompts,
    percentile,
    run_load_async,
    summarize,
)
from benchmarks.serve_report import kv_sample, parse_prometheus


@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.05]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], q) is None
    assert percentile([2.5], q) == 2.5


def test_percentile_rejects_out_of_range_q() -> None:
    with pytest.raises(ValueError, match="percentile q"):
        percentile([1.0], 101)


def _record(index: int, start: float, times: list[float], usage: int | None = None, **kw: object) -> StreamRecord:
    return StreamRecord(index=index, start=start, chunk_times=times, end=times[-1] if times else start + 1,
                        usage_tokens=usage, **kw)


def test_summarize_figures_from_known_records() -> None:
    records = [
        _record(0, 0.0, [0.5, 0.6, 0.7, 0.8], usage=4),  # ttft 0.5, gaps 0.1
        _record(1, 0.0, [1.0, 1.2, 1.4, 1.6], usage=4),  # ttft 1.0, gaps 0.2
        _record(2, 1.0, [1.3, 1.4], cancelled=True),     # cancelled: its 2 tokens count, its latencies do not
        _record(3, 2.0, [], error="APIStatusError: 500"),  # an error: no tokens, no latencies
        _record(4, 2.0, [2.1, 2.2], usage=2),            # finished early: a short one
    ]
    stats = summarize(records, wall_s=4.0, concurrency=2, expected_tokens=4)
    assert (stats.requests, stats.completed, stats.cancelled, stats.errors, stats.short) == (5, 3, 1, 1, 1)
    assert stats.out_tokens == 4 + 4 + 2 + 2
    assert stats.out_tok_per_s == pytest.approx(12 / 4.0)
    assert stats.req_per_s == pytest.approx(3 / 4.0)
    assert stats.ttft_p50_s == pytest.approx(0.5)  # of 0.5, 1.0, 0.1
    assert stats.ttft_p95_s == pytest.approx(float(np.percentile([0.5, 1.0, 0.1], 95)))
    assert stats.itl_p50_s == pytest.approx(0.1)  # gaps 0.1 x4, 0.2 x3
    assert stats.tpot_p50_s == pytest.approx(0.1)  # 0.3/3, 0.6/3, 0.1/1
    assert stats.first_error == "APIStatusError: 500" and stats.token_count == "usage"
    figures = stats.figures("c2")
    assert figures["c2_out_tok_per_s"] == pytest.approx(3.0) and figures["c2_errors"] == 1.0
    assert figures["c2_cancelled"] == 1.0 and figures["c2_short"] == 1.0


def test_summarize_counts_chunks_when_no_usage_and_handles_no_tokens() -> None:
    stats = summarize([_record(0, 0.0, [0.2, 0.3, 0.4])], wall_s=1.0, concurrency=1, expected_tokens=3)
    assert stats.out_tokens == 3 and stats.token_count == "chunks" and stats.short == 0
    empty = summarize([_record(0, 0.0, [], error="boom")], wall_s=1.0, concurrency=1, expected_tokens=3)
    assert empty.ttft_p50_s is None and empty.itl_p50_s is None and empty.out_tok_per_s == 0.0
    assert "c1_ttft_p50_s" not in empty.figures("c1")  # a figure no request gave is left out, not 0


def test_cancel_indices_spread_and_count() -> None:
    assert cancel_indices(64, 0.1) == {5, 16, 26, 37, 48, 58}  # round(6.4) of them, evenly
    assert cancel_indices(8, 0.1) == {4} and cancel_indices(8, 0.0) == set()
    assert cancel_indices(4, 1.0) == {0, 1, 2, 3}


def test_make_prompts_are_distinct_from_their_first_tokens() -> None:
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(ids: list[int]) -> str:
        return "".join(map(chr, ids))

    prompts = make_prompts(encode, decode, 30, 400, start=5)
    assert all(len(encode(p)) == 400 for p in prompts)
    assert len({p[:10] for p in prompts}) == 30  # no two share a first block
    assert prompts[0].startswith("Note 5. ") and make_prompts(encode, decode, 1, 400, start=5) == prompts[:1]


class _StreamServer:
    """A minimal OpenAI-style completions server (HTTP/1.1, SSE, one request per connection): the
    first text chunk after ``first_s``, then one every ``gap_s``; a prompt containing 'fail' gets a
    500. It records each request's body and whether the client hung up before the end."""

    def __init__(self, first_s: float, gap_s: float) -> None:
        self.first_s, self.gap_s = first_s, gap_s
        self.bodies: list[dict] = []
        self.disconnects = 0
        self.completed = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
        body = json.loads(await reader.readexactly(length))
        self.bodies.append(body)
        if "fail" in body["prompt"]:
            payload = json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode()
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n")
        hangup = asyncio.ensure_future(reader.read(1))  # b"" once the client closes the connection

        def event(data: dict | str) -> bytes:
            text = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
            return f"{len(text):x}\r\n".encode() + text + b"\r\n"

        n = body["max_tokens"]
        try:
            await asyncio.sleep(self.first_s)
            for i in range(n):
                if hangup.done():
                    self.disconnects += 1
                    return
                last = i == n - 1
                writer.write(event({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                    "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                                                 "finish_reason": "length" if last else None}]}))
                await writer.drain()
                if not last:
                    await asyncio.sleep(self.gap_s)
            if body.get("stream_options", {}).get("include_usage"):
                writer.write(event({"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                                    "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n,
                                                             "total_tokens": n + 3}}))
            writer.write(event("[DONE]") + b"0\r\n\r\n")
            await writer.drain()
            self.completed += 1
        except (ConnectionError, OSError):
            self.disconnects += 1
        finally:
            hangup.cancel()
            writer.close()


def _serve_and_load(server: _StreamServer, prompts: list[str], **spec: object) -> tuple[list[StreamRecord], float]:
    async def main() -> tuple[list[StreamRecord], float]:
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            load = LoadSpec(f"http://127.0.0.1:{port}", "m", prompts, **spec)  # type: ignore[arg-type]
            result = await run_load_async(load)
            await asyncio.sleep(0.1)  # let the server notice the last hang-ups
            return result
        finally:
            srv.close()
            await srv.wait_closed()

    return asyncio.run(asyncio.wait_for(main(), timeout=30))


def test_real_streams_through_the_openai_client_timings_and_usage() -> None:
    server = _StreamServer(first_s=0.08, gap_s=0.02)
    t0 = time.perf_counter()
    records, wall = _serve_and_load(server, [f"p{i}" for i in range(6)], concurrency=3, max_tokens=5,
                                    extra_body={"ignore_eos": True})
    stats = summarize(records, wall, 3, 5)
    assert wall <= time.perf_counter() - t0
    assert [b["ignore_eos"] for b in server.bodies] == [True] * 6 and all(b["stream"] for b in server.bodies)
    assert all(b["temperature"] == 0 and b["stream_options"] == {"include_usage": True} for b in server.bodies)
    assert stats.completed == 6 and stats.errors == 0 and stats.token_count == "usage" and stats.out_tokens == 30
    assert all(r.finish_reason == "length" and r.prompt_tokens == 3 and len(r.chunk_times) == 5 for r in records)
    assert 0.08 <= stats.ttft_p50_s < 2.0  # the server's first-token delay, plus loopback and parsing
    assert 0.015 <= stats.itl_p50_s < 1.0 and 0.015 <= stats.tpot_p50_s < 1.0
    assert wall >= 2 * (0.08 + 4 * 0.02)  # 6 requests over 3 clients: two after another on each
    assert stats.req_per_s == pytest.approx(6 / wall)


def test_cancelled_streams_hang_up_and_errors_are_counted() -> None:
    server = _StreamServer(first_s=0.01, gap_s=0.01)
    prompts = ["a", "b", "fail now", "c"]
    records, wall = _serve_and_load(server, prompts, concurrency=2, max_tokens=40,
                                    cancel=frozenset({1}), cancel_after=3)
    stats = summarize(records, wall, 2, 40)
    assert records[1].cancelled and len(records[1].chunk_times) == 3 and records[1].usage_tokens is None
    assert server.disconnects == 1 and server.completed == 2  # the server saw the client go away
    assert records[2].error is not None and "InternalServerError" in records[2].error
    assert (stats.completed, stats.cancelled, stats.errors) == (2, 1, 1)
    assert stats.out_tokens == 40 + 3 + 40


def test_kv_figures_from_a_real_prometheus_exposition() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    class Engine(Collector):
        def collect(self):  # the names and labels infercc's server exposes
            kv = GaugeMetricFamily("infercc_kv_blocks", "blocks", labels=["state"])
            for state, value in (("used", 42), ("cached", 3), ("free", 100)):
                kv.add_metric([state], value)
            yield kv
            yield GaugeMetricFamily("infercc_kv_pool_blocks", "total", value=145)
            yield GaugeMetricFamily("infercc_requests_running", "running", value=4)
            yield GaugeMetricFamily("infercc_kv_block_waste", "waste", value=0.25)

    registry = CollectorRegistry()
    registry.register(Engine())
    samples = parse_prometheus(generate_latest(registry).decode() + "garbage line\n# comment\n")
    assert kv_sample("infercc", samples) == {"used_blocks": 42, "total_blocks": 145, "running": 4, "waste": 0.25}
    vllm = parse_prometheus('vllm:kv_cache_usage_perc{model_name="m"} 0.5\nvllm:num_requests_running{model_name="m"} 3\n'
                            'vllm:cache_config_info{block_size="16",num_gpu_blocks="200"} 1.0\n')
    assert kv_sample("vllm", vllm) == {"used_blocks": 100, "total_blocks": 200.0, "running": 3, "block_size": 16.0}
    assert kv_sample("infercc", vllm) is None
