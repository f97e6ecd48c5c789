"""Bad requests over raw HTTP: each gets its status and OpenAI's error JSON with a one-line
message naming the field and the fix; --api-key answers 401 without the key; an unexpected
exception or a broken chat template is a 500 for that request while the server goes on."""

from __future__ import annotations

import httpx2 as httpx
import openai
import pytest
from fastapi import Request
from prometheus_client.parser import text_string_to_metric_families

import infercc
import infercc.server.app as server_app
from tests.importers._models import STORIES, require
from tests.server._server import running, wait_idle

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def served(stories):
    with running(stories) as server:
        yield server


def post(served, path: str, body=None, content: bytes | None = None, **headers) -> httpx.Response:
    return httpx.post(served.base_url + path, json=body, content=content, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    return error


@pytest.mark.parametrize("content, words", [
    (b"{bad json", ["not valid JSON", "Expecting property name"]),
    (b"", ["body is empty"]),
    (b"[1, 2]", ["must be a JSON object", "array"]),
    (b'{"model": "stories", "prompt": "a", "temperature": NaN}', ["SamplingParams.temperature"]),
])
def test_malformed_bodies(served, content, words):
    error = error_of(post(served, "/completions", content=content, **{"content-type": "application/json"}), 400)
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("path, body, param, words", [
    ("/completions", {"model": "stories"}, "prompt", ["'prompt' is required"]),
    ("/completions", {"model": "stories", "prompt": "a", "max_tokens": "many"}, "max_tokens", ["valid integer"]),
    ("/completions", {"model": "stories", "prompt": "a", "temperature": -1}, "temperature",
     ["SamplingParams.temperature must be >= 0"]),
    ("/completions", {"model": "stories", "prompt": "a", "top_p": 2}, "top_p", ["SamplingParams.top_p"]),
    ("/completions", {"model": "stories", "prompt": "a", "n": 100}, "n", ["less than or equal to 16"]),
    ("/completions", {"model": "stories", "prompt": ["one", "two"]}, "prompt", ["one prompt per request"]),
    ("/completions", {"model": "stories", "prompt": [1, 99999]}, "prompt", ["prompt[1] = 99999", "[0, 512)"]),
    ("/completions", {"model": "stories", "prompt": []}, "prompt", ["prompt is empty"]),
    ("/completions", {"model": "stories", "prompt": "a", "echo": True}, "echo", ["echo is not supported"]),
    ("/chat/completions", {"model": "stories", "messages": "hi"}, "messages", ["'messages'", "valid list"]),
    ("/chat/completions", {"model": "stories", "messages": [{"role": "user"}], "top_logprobs": 3}, "top_logprobs",
     ["logprobs: true"]),
])
def test_invalid_fields(served, path, body, param, words):
    error = error_of(post(served, path, body), 400)
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


def test_unknown_model_is_404_model_not_found(served):
    for path, body in (("/completions", {"model": "gpt-4o", "prompt": "a"}),
                       ("/chat/completions", {"model": "gpt-4o", "messages": CHAT})):
        error = error_of(post(served, path, body), 404)
        assert error["code"] == "model_not_found" and "'gpt-4o'" in error["message"] and "'stories'" in error["message"]
    error_of(httpx.get(served.base_url + "/models/gpt-4o"), 404)


def test_prompt_over_the_context_says_both_lengths(served):
    error = error_of(post(served, "/completions", {"model": "stories", "prompt": "Once upon a time",
                                                   "max_tokens": 2047}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert "2048 tokens" in error["message"] and "5 in the prompt + max_tokens 2047" in error["message"]
    long = [{"role": "user", "content": "the dog ran " * 1000}]
    error = error_of(post(served, "/chat/completions", {"model": "stories", "messages": long}), 400)
    assert error["param"] == "messages" and "maximum context length is 2048" in error["message"]
    error = error_of(post(served, "/completions", {"model": "stories", "prompt": "x" * 2048 * 129}), 400)
    assert error["message"].startswith("the prompt has 264,192 characters, more than this model's maximum context")
    with openai.OpenAI(api_key="x", base_url=served.base_url, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="stories", prompt="Once upon a time", max_tokens=4000)
    assert info.value.code == "context_length_exceeded"


def test_unknown_routes_and_methods_answer_openai_json(served):
    assert "routes are" in error_of(httpx.get(served.url + "/v1/engines"), 404)["message"]
    error_of(httpx.get(served.base_url + "/completions"), 405)


def test_harmless_unknown_fields_are_accepted(served):
    body = {"model": "stories", "prompt": "a", "max_tokens": 2, "user": "u-1", "metadata": {"a": "b"}, "store": False}
    assert post(served, "/completions", body).status_code == 200


def test_oversized_body_is_413(served, monkeypatch):
    monkeypatch.setattr(server_app, "MAX_BODY_BYTES", 1000)
    body = {"model": "stories", "prompt": "x" * 2000}
    error = error_of(post(served, "/completions", body), 413)
    assert "has 2,031 bytes, more than the 1,000" in error["message"]

    def chunked():  # no Content-Length: the cap holds while reading
        yield b'{"model": "stories", "prompt": "'
        yield b"x" * 2000
        yield b'"}'

    response = httpx.post(served.base_url + "/completions", content=chunked(), timeout=60,
                          headers={"content-type": "application/json"})
    assert "exceeds the 1,000 bytes" in error_of(response, 413)["message"]


def test_errors_are_counted_by_status(served):
    def errors_400() -> float:
        text = httpx.get(served.url + "/metrics").text
        family = next(f for f in text_string_to_metric_families(text) if f.name == "infercc_http_errors")
        return sum(s.value for s in family.samples if s.labels.get("status") == "400" and s.name.endswith("_total"))

    before = errors_400()
    post(served, "/completions", content=b"{", **{"content-type": "application/json"})
    assert errors_400() == before + 1


def test_api_key(stories):
    with running(stories, api_key="sekrit") as served:
        error = error_of(post(served, "/completions", {"model": "stories", "prompt": "a"}), 401)
        assert error["code"] == "invalid_api_key" and "no API key was given" in error["message"]
        response = post(served, "/completions", {"model": "stories", "prompt": "a"}, authorization="Bearer wrong")
        assert "not the server's" in error_of(response, 401)["message"]
        assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(served.base_url + "/models").status_code == 401
        assert httpx.get(served.url + "/health").status_code == 200  # monitoring stays open
        assert httpx.get(served.url + "/metrics").status_code == 200
        with openai.OpenAI(api_key="wrong", base_url=served.base_url, max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with openai.OpenAI(api_key="sekrit", base_url=served.base_url, max_retries=0) as client:
            assert client.completions.create(model="stories", prompt="a", max_tokens=2).usage.completion_tokens >= 1


def test_failures_inside_a_request_are_500_for_it_alone():
    """A handler that raises (here a route added for the test, behind the same guard as every
    route) and a model whose chat template is broken: 500 JSON for those requests; the server
    answers the next ones."""
    broken = infercc.compile(require(STORIES))  # its own copy: the template is changed below
    broken.tokenizer.chat_template = "{% for m in messages %}{{ m.content "

    def setup(app):
        async def boom(request: Request):
            raise RuntimeError("boom")

        app.add_api_route("/v1/boom", server_app.guarded(app.state.server, boom), methods=["POST"])

    with running(broken, setup=setup) as served:
        error = error_of(post(served, "/boom", {}), 500)
        assert error["type"] == "server_error" and error["code"] == "internal_error"
        assert "RuntimeError: boom" in error["message"]
        error = error_of(post(served, "/chat/completions", {"model": "stories", "messages": CHAT}), 500)
        assert error["code"] == "model_error" and "chat template syntax error" in error["message"]
        broken.tokenizer.chat_template = "{{ raise_exception('only one message, please') }}"
        error = error_of(post(served, "/chat/completions", {"model": "stories", "messages": CHAT}), 400)
        assert "rejected the messages" in error["message"] and "only one message" in error["message"]
        response = post(served, "/completions", {"model": "stories", "prompt": "Once", "max_tokens": 3})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def test_an_engine_failure_is_a_500_for_its_requests_and_the_server_goes_on():
    """A model that lies about its context (positions past its table of 48 fail inside ONNX
    Runtime): the request that gets there fails with a 500 (streamed: an error event, then
    [DONE]); its blocks come back and shorter requests still work."""
    from onnx import helper

    from tests.runtime._cached_model import tiny_lm

    proto = tiny_lm(cached=True, context=48)
    helper.set_model_props(proto, {"infercc.context_length": "256", "infercc.vocab_size": "32"})
    liar = infercc.compile(proto, optimize=False)
    with running(liar, model_name="liar") as served:
        body = {"model": "liar", "prompt": [1, 2, 3], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        error = error_of(post(served, "/completions", body), 500)
        assert error["type"] == "server_error" and error["code"] == "engine_failure"
        assert "the engine failed while generating" in error["message"]
        with httpx.stream("POST", served.base_url + "/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and '"code":"engine_failure"' in events[-2]
        ok = post(served, "/completions", {**body, "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        assert wait_idle(served.state).blocks.used == 0
