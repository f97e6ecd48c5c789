"""The server through the official openai client (and raw HTTP where the wire format itself is
checked): completions and chat, streamed and not, usage, stop strings, n, logprobs, models,
health, metrics. One real server on stories260K for the module."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.server._server import running, sse_events, wait_idle

PROMPT = "Once upon a time"
CHAT = [{"role": "user", "content": "Tell me a story about a dog."}]


@pytest.fixture(scope="module")
def served(stories):
    with running(stories) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    with OpenAI(api_key="unused", base_url=served.base_url, max_retries=0, timeout=60) as client:
        yield client


def greedy(client, **options):
    return client.completions.create(model="stories", prompt=PROMPT, temperature=0, **options)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["stories"]
    card = client.models.retrieve("stories")
    assert card.id == "stories" and card.owned_by == "infercc" and card.model_extra["max_model_len"] == 2048
    health = httpx.get(served.url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_greedy_completion_equals_generate_and_counts_usage(stories, client):
    response = greedy(client, max_tokens=24)
    alone = stories.generate(PROMPT, max_new_tokens=24)
    choice = response.choices[0]
    assert choice.text == alone.text and choice.index == 0 and choice.finish_reason == "length"
    assert response.object == "text_completion" and response.model == "stories" and response.id.startswith("cmpl-")
    usage = response.usage
    assert usage.prompt_tokens == len(alone.prompt_token_ids) and usage.completion_tokens == 24
    assert usage.total_tokens == usage.prompt_tokens + 24
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_token_id_prompts_equal_text_prompts(stories, client):
    ids = stories.tokenizer.encode(PROMPT)
    text = greedy(client, max_tokens=12).choices[0].text
    for prompt in (ids, [ids]):
        response = client.completions.create(model="stories", prompt=prompt, temperature=0, max_tokens=12)
        assert response.choices[0].text == text and response.usage.prompt_tokens == len(ids)
    listed = client.completions.create(model="stories", prompt=[PROMPT], temperature=0, max_tokens=12)
    assert listed.choices[0].text == text


def test_streamed_completion_equals_the_whole_and_ends_with_usage(client):
    whole = greedy(client, max_tokens=20)
    chunks = list(greedy(client, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_has_openai_shape_on_the_wire(stories, served):
    body = {"model": "stories", "messages": CHAT, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", served.base_url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    first, *middle, last, usage = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
               for c in middle)
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    assert all(c["usage"] is None for c in chunks[:-1])
    alone = stories.generate(CHAT, max_new_tokens=16)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == alone.text
    assert usage["usage"]["prompt_tokens"] == len(alone.prompt_token_ids)


def test_chat_completion_and_max_completion_tokens(stories, client):
    response = client.chat.completions.create(model="stories", messages=CHAT, max_completion_tokens=10,
                                              temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == stories.generate(CHAT, max_new_tokens=10).text
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 10
    streamed = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=10, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == choice.message.content


def test_stop_strings_cut_the_text_streamed_or_not(client):
    full = greedy(client, max_tokens=32).choices[0].text
    assert "girl" in full, full  # the stories260K greedy text: ", there was a little girl named Lily..."
    expected = full[:full.index("girl")]
    for stop in ("girl", ["nothing like this", "girl"]):
        response = greedy(client, max_tokens=32, stop=stop)
        assert response.choices[0].text == expected and response.choices[0].finish_reason == "stop"
        assert response.usage.completion_tokens < 32
    chunks = list(greedy(client, max_tokens=32, stop="girl", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices_are_indexed_seeded_and_distinct(client):
    def sample(**options):
        return client.completions.create(model="stories", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=5,
                                         n=2, **options)

    first = sample()
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.text for c in first.choices]
    assert texts[0] != texts[1]  # choice i draws with seed + i
    assert [c.text for c in sample().choices] == texts
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in sample(logprobs=0).choices)
    streamed = {0: "", 1: ""}
    for chunk in sample(stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == texts


def test_completion_logprobs(client):
    response = greedy(client, max_tokens=12, logprobs=3)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 12
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(12)]
    for token, chosen, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert top[token] == pytest.approx(chosen) and chosen == pytest.approx(max(top.values()))  # greedy
    streamed = list(greedy(client, max_tokens=12, logprobs=3, stream=True))
    assert [t for c in streamed for t in c.choices[0].logprobs.tokens] == logprobs.tokens
    assert [o for c in streamed for o in c.choices[0].logprobs.text_offset] == logprobs.text_offset


def test_chat_logprobs(client):
    response = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    plain = client.chat.completions.create(model="stories", messages=CHAT, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def prefix_counters(served) -> dict[str, float]:
    """The prefix-cache counters of /metrics (tokens), once the engine is idle."""
    wait_idle(served.state)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    return {name: next(s.value for s in families[f"infercc_{name}"].samples if s.name.endswith("_total"))
            for name in ("prompt_tokens_cached", "prefix_cache_hits", "prefix_cache_queries")}


def test_repeated_prompt_is_served_from_the_prefix_cache(stories, served, client):
    prompt = "Lily and Tom went to the park to play with their red ball. " * 4  # > 2 blocks of 16 tokens
    first = client.completions.create(model="stories", prompt=prompt, temperature=0, max_tokens=4)
    before = prefix_counters(served)
    second = client.completions.create(model="stories", prompt=prompt, temperature=0, max_tokens=4)
    assert second.choices[0].text == first.choices[0].text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0
    after = prefix_counters(served)  # the metrics count what usage reported
    assert after["prompt_tokens_cached"] - before["prompt_tokens_cached"] == cached
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] == cached
    assert after["prefix_cache_queries"] - before["prefix_cache_queries"] == second.usage.prompt_tokens


def test_metrics_parse_and_count(served, client):
    greedy(client, max_tokens=5)
    wait_idle(served.state)
    text = httpx.get(served.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("engine_info", "requests_running", "requests_waiting", "prompt_tokens", "prompt_tokens_cached",
                 "generation_tokens", "computed_tokens", "engine_steps", "preemptions",
                 "kv_blocks", "kv_pool_blocks", "prefix_cache_hit_rate", "prefix_cache_queries",
                 "time_to_first_token_seconds", "inter_token_latency_seconds", "requests", "request_latency_seconds"):
        assert f"infercc_{name}" in families, name

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in families[f"infercc_{name}"].samples
                    if s.labels == labels and s.name.removesuffix("_total") == f"infercc_{name}")

    assert value("requests_running") == 0 and value("requests_waiting") == 0
    assert value("generation_tokens") >= 5 and value("prompt_tokens") >= 1
    assert value("requests", finish_reason="length") >= 1
    blocks = {s.labels["state"]: s.value for s in families["infercc_kv_blocks"].samples}
    assert blocks["used"] == 0 and sum(blocks.values()) == value("kv_pool_blocks") > 0
    ttft = next(s.value for s in families["infercc_time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    assert ttft >= 1
    assert 0 <= value("prefix_cache_hit_rate") <= 1
    assert [s.labels["runner"] for s in families["infercc_engine_info"].samples] == \
        [served.state.engine.snapshot().runner]
