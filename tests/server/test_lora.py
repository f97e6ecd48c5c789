"""LoRA adapters over HTTP (``infercc serve --lora NAME=PATH``): the request's ``model`` names the
adapter (as vLLM's --lora-modules), /v1/models lists base + adapters, concurrent requests over
several adapters each get what they get alone, and a bad adapter is an error while the server
stays up. The tiny LLaMA has no tokenizer, so prompts are token ids and outputs are compared by
their log-probabilities (one per generated token, the chosen token's)."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, NotFoundError

from infercc.cli import main
from infercc.runtime.engine import log_softmax
from tests.lora._data import DATA, compiled
from tests.server._server import running, wait_idle

PROMPTS = [[1] + [(5 * i + 3 * j) % 90 + 3 for j in range(4 + 3 * i)] for i in range(8)]
MODELS = ["a", "b", "tiny", "c", "d", "a", "tiny", "b"]
NEW = 6


@pytest.fixture(scope="module")
def served():
    model = compiled("llama", "a", "b", "c", "d", backend="ort")
    with running(model, model_name="tiny") as server:
        yield server


def _alone(model, prompt: list[int], adapter: str | None) -> list[float]:
    with model.session() as session:
        seq = session.sequence(adapter=adapter)
        seq.prefill(prompt)
        return [float(log_softmax(seq.logits)[seq.decode()]) for _ in range(NEW)]


def test_models_lists_base_and_adapters(served) -> None:
    data = httpx.get(served.base_url + "/models").json()["data"]
    assert [card["id"] for card in data] == ["tiny", "a", "b", "c", "d"]
    assert all(card["parent"] == "tiny" for card in data[1:])
    assert httpx.get(served.base_url + "/models/c").json()["id"] == "c"
    metrics = httpx.get(served.url + "/metrics").text
    assert "infercc_lora_adapters 4.0" in metrics and "infercc_lora_merged_hits_total" in metrics


def test_concurrent_requests_over_four_adapters(served) -> None:
    async def run() -> list:
        client = AsyncOpenAI(api_key="unused", base_url=served.base_url, max_retries=0, timeout=120)
        return await asyncio.gather(*[
            client.completions.create(model=m, prompt=p, max_tokens=NEW, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
            for m, p in zip(MODELS, PROMPTS)])

    responses = asyncio.run(run())
    model = served.state.compiled
    for response, name, prompt in zip(responses, MODELS, PROMPTS):
        assert response.model == name
        got = response.choices[0].logprobs.token_logprobs
        np.testing.assert_allclose(got, _alone(model, prompt, None if name == "tiny" else name), atol=1e-4)
    wait_idle(served.state)
    assert model.lora.names == ["a", "b", "c", "d"]


def test_unknown_adapter_is_a_404_and_the_server_stays_up(served) -> None:
    async def run():
        client = AsyncOpenAI(api_key="unused", base_url=served.base_url, max_retries=0, timeout=60)
        await client.completions.create(model="../a", prompt=[1, 2, 3], max_tokens=2)

    with pytest.raises(NotFoundError, match="does not exist"):
        asyncio.run(run())
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize("spec, message", [
    ("noequals", "must be NAME=PATH"),
    ("x/y=" + str(DATA / "llama" / "a"), "adapter name"),
    ("a=" + str(DATA / "gpt2" / "a"), "is not a projection of this model"),
])
def test_bad_lora_options_are_one_line_errors(capsys, spec: str, message: str) -> None:
    assert main(["serve", str(DATA / "llama" / "base"), "--backend", "ort", "--lora", spec]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
