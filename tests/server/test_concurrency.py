"""Many requests at once through AsyncOpenAI: 32 concurrent greedy requests of different prompt
lengths each equal the same request alone; streams closed mid-way abort their requests (the
rest complete, and every KV block ends free or cached); a client that leaves a non-streamed
request aborts it too."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from infercc.runtime.paged_runner import PagedRunner
from tests.server._server import engine_held, running, wait_idle

STORY = ("Lily and Tom went to the park to play with their red ball. The sun was warm and the birds sang in the "
         "tall trees. Tom threw the ball high and Lily ran to catch it, but it rolled into the pond where a big "
         "green frog sat on a leaf and looked at them with round eyes.").split()
#: 32 prompts of 1 to 32 words, each with its own max_tokens.
CASES = [(" ".join(STORY[:1 + (7 * i) % len(STORY)]), 6 + (5 * i) % 19) for i in range(32)]
CANCELLED = (3, 14, 25)  # ~10%: closed after their first chunk


@pytest.fixture(scope="module")
def served(stories):
    """A small step budget (prompts prefill in chunks beside other requests' decode tokens) and
    the smallest pool the engine takes (one sequence of the whole context: 128 blocks), so long
    requests at once preempt each other."""
    pool = PagedRunner.bytes_per_token(stories) * 2048
    with running(stories, config=stories.config.replace(max_batch_tokens=64, kv_cache_memory=pool)) as server:
        yield server


def aborted(served) -> float:
    text = httpx.get(served.url + "/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "infercc_requests")
    return next(s.value for s in family.samples if s.labels == {"finish_reason": "abort"} and s.name.endswith("_total"))


def client_for(served) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="unused", base_url=served.base_url, max_retries=0, timeout=120)


async def complete(client: AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, str]:
    response = await client.completions.create(model="stories", prompt=prompt, max_tokens=max_tokens, temperature=0)
    return response.choices[0].text, response.choices[0].finish_reason


async def stream(client: AsyncOpenAI, prompt: str, max_tokens: int, cancel: bool = False) -> tuple[str, str | None]:
    text, finish = "", None
    chunks = await client.completions.create(model="stories", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": cancel})
    async for chunk in chunks:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
        if cancel and text:
            await chunks.close()
            return text, None
    return text, finish


def test_concurrent_greedy_requests_equal_each_alone(served):
    async def run() -> tuple[list, list]:
        async with client_for(served) as client:
            alone = [await complete(client, p, m) for p, m in CASES]
            together = await asyncio.gather(*(complete(client, p, m) for p, m in CASES))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert {f for _, f in alone} <= {"stop", "length"} and len({t for t, _ in alone}) > 20


def test_preempted_streams_equal_each_alone(served):
    """10 streams of 200 tokens need ~140 blocks of the 128: the newest are preempted (freed,
    recomputed later) and their streams go on where they were, equal to each request alone."""
    cases = [(" ".join(STORY[:8 + 3 * i]), 200) for i in range(10)]
    before = served.state.engine.snapshot().preemptions

    async def run() -> tuple[list, list]:
        async with client_for(served) as client:
            alone = [await complete(client, p, m) for p, m in cases]
            async with engine_held(served.state, len(cases)):  # all admitted at once: they must preempt
                streams = [asyncio.ensure_future(stream(client, p, m)) for p, m in cases]
            together = await asyncio.gather(*streams)
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == alone
    assert wait_idle(served.state).preemptions > before


def test_streams_closed_midway_abort_and_the_rest_complete(served):
    before = aborted(served)

    async def run() -> tuple[list, list]:
        async with client_for(served) as client:
            alone = [await complete(client, p, m) for i, (p, m) in enumerate(CASES) if i not in CANCELLED]
            jobs = [stream(client, p, 1500 if i in CANCELLED else m, cancel=i in CANCELLED)
                    for i, (p, m) in enumerate(CASES)]
            together = await asyncio.gather(*jobs)
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert [r for i, r in enumerate(together) if i not in CANCELLED] == alone
    assert all(together[i][0] and together[i][1] is None for i in CANCELLED)
    stats = wait_idle(served.state)
    blocks = stats.blocks
    assert blocks.used == 0 and blocks.free + blocks.cached == blocks.total
    assert aborted(served) == before + len(CANCELLED)


def test_a_client_leaving_a_plain_request_aborts_it(served):
    before = aborted(served)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(served.base_url + "/completions", timeout=0.2,
                   json={"model": "stories", "prompt": "Once", "max_tokens": 2000, "ignore_eos": True,
                         "temperature": 0})
    stats = wait_idle(served.state, seconds=10)
    assert stats.blocks.used == 0
    assert aborted(served) == before + 1
