"""Request validation without a server: OpenAI bodies -> requests, sampling params, context and
token-id checks, each refusal a RequestError with its status, field and a one-line message."""

from __future__ import annotations

import pytest

from infercc import InputError
from infercc.server.protocol import (
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    check_context,
    check_token_ids,
    parse,
    sampling_params,
)


def refused(model, body) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(model, body)
    assert "\n" not in str(info.value)
    return info.value


def test_request_error_is_an_input_error_with_openai_fields():
    error = refused(CompletionRequest, {"prompt": "hi"})
    assert isinstance(error, InputError)
    assert error.status == 400 and error.param == "model"
    assert error.body() == {"error": {"message": "invalid request: 'model' is required",
                                      "type": "invalid_request_error", "param": "model", "code": None}}


@pytest.mark.parametrize("body, param, words", [
    ({"model": "m", "prompt": "a", "max_tokens": "ten"}, "max_tokens", ["'max_tokens'", "integer", "'ten'"]),
    ({"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens", ["'max_tokens'", "greater than or equal to 1"]),
    ({"model": "m", "prompt": "a", "n": MAX_N + 1}, "n", ["'n'", f"less than or equal to {MAX_N}"]),
    ({"model": "m", "prompt": 7}, "prompt", ["'prompt' must be a string, a list of token ids", "(got 7)"]),
    ({"model": "m", "prompt": [1, "a"]}, "prompt", ["'prompt' must be a string, a list of token ids"]),
    ({"model": "m", "prompt": "a", "stop": 3}, "stop", ["'stop' must be a string or a list of strings"]),
    ({"model": "m", "prompt": "a", "stream": "yes please"}, "stream", ["'stream'", "boolean"]),
    ({"model": "m", "prompt": "a", "logprobs": 21}, "logprobs", ["'logprobs'", "20"]),
])
def test_invalid_completion_fields_name_the_field(body, param, words):
    error = refused(CompletionRequest, body)
    assert error.param == param
    for word in words:
        assert word in str(error), str(error)


@pytest.mark.parametrize("body, param, words", [
    ({"model": "m"}, "messages", ["'messages' is required"]),
    ({"model": "m", "messages": []}, "messages", ["'messages'", "at least 1"]),
    ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role", ["'messages[0].role' is required"]),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content",
     ["'messages[0].content' must be a string, a list of {'type': 'text'"]),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     ["logprobs: true"]),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools",
     ["not supported"]),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "response_format", ["'json_object' is not supported"]),
])
def test_invalid_chat_fields_name_the_field(body, param, words):
    error = refused(ChatCompletionRequest, body)
    assert error.param == param
    for word in words:
        assert word in str(error), str(error)


def test_body_must_be_an_object():
    assert "got a JSON array" in str(refused(CompletionRequest, [1, 2]))
    assert "got a JSON string" in str(refused(CompletionRequest, "prompt"))


@pytest.mark.parametrize("field, value", [("echo", True), ("suffix", "end"), ("best_of", 3),
                                          ("logit_bias", {"50256": -100})])
def test_fields_that_would_change_the_output_are_refused_not_ignored(field, value):
    error = refused(CompletionRequest, {"model": "m", "prompt": "a", field: value})
    assert error.param == field and "not supported" in str(error)


def test_harmless_unknown_fields_are_ignored():
    body = {"model": "m", "prompt": "a", "user": "u-1", "metadata": {"k": "v"}, "store": False,
            "service_tier": "auto", "best_of": 1}
    request = parse(CompletionRequest, body)
    assert request.prompt == "a" and request.n == 1


def test_chat_content_parts_are_joined_and_non_text_parts_refused():
    request = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "system", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}]})
    assert request.chat_messages() == [{"role": "system", "content": ""}, {"role": "user", "content": "Hello, world"}]
    request = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]})
    with pytest.raises(RequestError, match=r"messages\[0\].content\[0\] is a 'image_url' part") as info:
        request.chat_messages()
    assert info.value.param == "messages[0].content"


def test_sampling_params_follow_openai_defaults_and_seed_each_choice():
    request = parse(CompletionRequest, {"model": "m", "prompt": "a", "stop": "\n", "seed": 7, "n": 2})
    first, second = (sampling_params(request, 12, i) for i in range(2))
    assert first.temperature == 1.0 and first.top_p == 1.0 and first.max_new_tokens == 12
    assert first.stop == ("\n",) and (first.seed, second.seed) == (7, 8)
    unseeded = sampling_params(parse(CompletionRequest, {"model": "m", "prompt": "a"}), 5, 1)
    assert unseeded.seed is None
    extras = parse(CompletionRequest, {"model": "m", "prompt": "a", "top_k": 5, "min_p": 0.1, "ignore_eos": True,
                                       "repetition_penalty": 1.2, "stop_token_ids": [3], "presence_penalty": 0.5})
    params = sampling_params(extras, 5, 0)
    assert (params.top_k, params.min_p, params.ignore_eos, params.repetition_penalty, params.stop_token_ids,
            params.presence_penalty) == (5, 0.1, True, 1.2, (3,), 0.5)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "SamplingParams.temperature must be >= 0"),
    ("top_p", 0.0, "SamplingParams.top_p must be in (0, 1]"),
    ("frequency_penalty", 2.5, "SamplingParams.frequency_penalty must be in [-2, 2]"),
    ("seed", -1, "SamplingParams.seed must be None or an integer >= 0"),
    ("stop", ["ok", ""], "SamplingParams.stop must be a string or a list of non-empty strings"),
])
def test_bad_sampling_values_are_400_with_sampling_params_messages(field, value, message):
    request = parse(CompletionRequest, {"model": "m", "prompt": "a", field: value})
    with pytest.raises(RequestError) as info:
        sampling_params(request, 5, 0)
    assert str(info.value).startswith(message) and info.value.status == 400 and info.value.param == field


def test_context_check_names_both_lengths():
    check_context(10, 6, 16, "prompt")
    check_context(10, 10**6, None, "prompt")  # no known context: nothing to check
    with pytest.raises(RequestError) as info:
        check_context(10, 7, 16, "prompt")
    message = str(info.value)
    assert "maximum context length is 16 tokens" in message and "10 in the prompt + max_tokens 7" in message
    assert "at most 6" in message and info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(RequestError, match="the prompt has 20 tokens but .* is 16 tokens") as info:
        check_context(20, 1, 16, "messages")
    assert info.value.param == "messages"


@pytest.mark.parametrize("ids, bad", [([], "empty"), ([1, 512], "prompt[1] = 512"), ([-1], "prompt[0] = -1"),
                                      ([True], "prompt[0] = True")])
def test_token_ids_must_be_in_the_vocabulary(ids, bad):
    with pytest.raises(RequestError, match=bad.replace("[", r"\[").replace("]", r"\]")):
        check_token_ids(ids, 512, "prompt")
    assert check_token_ids([0, 511], 512, "prompt") == [0, 511]
