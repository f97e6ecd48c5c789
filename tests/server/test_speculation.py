"""Speculative decoding through the server: the request field ``speculation`` (sent by the official
openai client through ``extra_body``) gives the same greedy text as without, streamed or not, stop
strings included, with several tokens per engine step; a bad value is a 400 naming the field; the
proposed/accepted counters reach /metrics; ``infercc serve --speculation`` sets the default."""

from __future__ import annotations

import httpx2 as httpx
import pytest
from openai import BadRequestError, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from infercc.cli import build_parser
from tests.server._server import running, wait_idle

#: Repetitive text: the story model's greedy continuation copies from it, so lookups are accepted.
PROMPT = "Lily and Tom went to the park. They played with a ball. Lily and Tom went to the park. They"
CHAT = [{"role": "user", "content": PROMPT}]
#: The request's own depth policy "fixed": it speculates whatever this machine's step timings say
#: (under "auto" a loaded machine can time verify steps as not paying and keep it off).
SPEC = {"speculation": "prompt_lookup", "speculation_policy": "fixed"}


@pytest.fixture(scope="module")
def served(stories):
    with running(stories) as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    with OpenAI(api_key="unused", base_url=served.base_url, max_retries=0, timeout=60) as client:
        yield client


def metric(served, name: str) -> float:
    wait_idle(served.state)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    return next(s.value for s in families[f"infercc_{name}"].samples if s.name.removesuffix("_total") == f"infercc_{name}")


def test_greedy_text_is_the_same_with_speculation(stories, served, client):
    proposed = metric(served, "spec_proposed_tokens")
    plain = client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=48)
    spec = client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=48, extra_body=SPEC)
    assert spec.choices[0].text == plain.choices[0].text == stories.generate(PROMPT, max_new_tokens=48).text
    assert spec.usage.completion_tokens == plain.usage.completion_tokens  # usage unchanged
    assert metric(served, "spec_proposed_tokens") > proposed
    assert metric(served, "spec_accepted_tokens") > 0 and 0 < metric(served, "spec_acceptance_rate") <= 1
    assert metric(served, "spec_tokens_per_step") > 1


def test_chat_streamed_with_stop_strings_is_the_same(client):
    """Several tokens arrive per step; the stream still holds back a possible stop-string start and
    cuts exactly where the plain answer does."""
    plain = client.chat.completions.create(model="stories", messages=CHAT, temperature=0, max_tokens=60)
    text = plain.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 4]
    want = client.chat.completions.create(model="stories", messages=CHAT, temperature=0, max_tokens=60, stop=[stop])
    for extra in (SPEC, {}):
        chunks = list(client.chat.completions.create(model="stories", messages=CHAT, temperature=0, max_tokens=60,
                                                     stop=[stop], stream=True, extra_body=extra))
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert got == want.choices[0].message.content and stop not in got
        assert chunks[-1].choices[0].finish_reason == want.choices[0].finish_reason == "stop"


def test_a_bad_speculation_value_is_a_400(client):
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="stories", prompt=PROMPT, max_tokens=4, extra_body={"speculation": "lookahead"})
    error = caught.value.body
    assert error["param"] == "speculation" and "prompt_lookup" in error["message"] and "'off'" in error["message"]
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="stories", messages=CHAT, max_tokens=4, extra_body={"speculation": 3})
    for field, value in (("speculation_policy", "eager"), ("max_speculation_compute_fraction", 1.5)):
        with pytest.raises(BadRequestError) as caught:
            client.completions.create(model="stories", prompt=PROMPT, max_tokens=4,
                                      extra_body={"speculation": "prompt_lookup", field: value})
        assert caught.value.body["param"] == field and repr(value) in caught.value.body["message"]


def test_server_default_and_per_request_off(stories):
    """A server made with Config.speculation speculates by default; "off" in a body turns it off
    for that request; the text is the same either way."""
    config = stories.config.replace(speculation="auto")
    with running(stories, config=config) as server, \
            OpenAI(api_key="unused", base_url=server.base_url, max_retries=0, timeout=60) as client:
        spec = client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=32)
        proposed = metric(server, "spec_proposed_tokens")
        off = client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=32,
                                        extra_body={"speculation": "off"})
        assert proposed > 0 and metric(server, "spec_proposed_tokens") == proposed
        assert spec.choices[0].text == off.choices[0].text


def test_serve_cli_takes_speculation():
    args = build_parser().parse_args(["serve", "model.gguf", "--speculation", "auto", "--speculation-policy",
                                      "throughput"])
    assert (args.speculation, args.speculation_policy) == ("auto", "throughput")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "model.gguf", "--speculation", "lookahead"])
