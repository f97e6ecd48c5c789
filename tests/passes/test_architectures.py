"""Architectures beyond the main fixtures (``tests/fixtures/architectures``, TorchScript exports of
tiny random Hugging Face models, see ``make_architectures.py``): every one compiles with the
defaults and matches onnxruntime on its own file; attention fuses where the table says, and where
it does not, the diagnostics say why and warn. Decoders whose every layer fused get a KV cache
that decodes token by token as the full run computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import infercc

FOLDER = Path(__file__).resolve().parents[1] / "fixtures" / "architectures"
#: arch -> attention layers fused of 2, and for the ones left unfused the reason the report gives.
EXPECTED: dict[str, tuple[int, str]] = {
    "gptj": (2, ""), "opt": (2, ""), "falcon": (2, ""), "gemma": (2, ""), "phi3": (2, ""),
    "stablelm": (2, ""), "starcoder2": (2, ""), "olmo": (2, ""),
    "codegen": (2, ""), "gpt_bigcode": (2, ""),
    "distilbert": (2, ""), "roberta": (2, ""),
    "mpt": (2, ""),  # ALiBi kept as a bias in both layers
    "bloom": (0, "reshaped before the product with V"),  # ALiBi with heads folded into the batch
    "gemma2": (2, ""),  # soft-capped scores: fused and cached, lowered by decomposition
    "deberta-v2": (0, "also used elsewhere"),  # disentangled attention reads the probabilities' shape
}
#: How the fused sites report their rotary ("none" for the rest).
ROTARY = {"gptj": "interleaved, 4 of 8 dims", "codegen": "interleaved, 4 of 8 dims", "falcon": "half-rotated",
          "gemma": "half-rotated", "gemma2": "half-rotated", "olmo": "half-rotated", "phi3": "half-rotated", "starcoder2": "half-rotated",
          "stablelm": "half-rotated, 4 of 8 dims"}
ENCODERS = {"distilbert", "roberta", "deberta-v2"}
#: Fused but not cached: MPT's causal triangle is turned into a float and cast back to bool, which
#: the mask analysis does not see through, so its layers have no causal flag to cache with.
UNCACHED = {"mpt"}
TOLERANCE = 1e-4


def _feeds(batch: int, seq: int, pad: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seq).integers(3, 90, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_compiles_matches_and_reports(arch: str) -> None:
    path = FOLDER / f"{arch}.onnx"
    compiled = infercc.compile(path)
    source = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq, pad in ((2, 7, 2), (1, 5, 0)):
        feeds = _feeds(batch, seq, pad)
        expected = source.run(None, feeds)[0]
        got = compiled.run(feeds)[source.get_outputs()[0].name]
        real = feeds["attention_mask"].astype(bool)
        assert float(np.abs(got - expected)[real].max()) <= TOLERANCE, (batch, seq)
    fused, reason = EXPECTED[arch]
    record = compiled.diagnostics["attention_fusion"]
    report = record.info["attention"]
    assert (report["fused"], report["expected"]) == (fused, 2), report
    if fused < 2:
        assert any(reason in w for w in record.warnings), record.warnings
    assert {site["rotary"] for site in report["sites"] if site["status"] == "fused"} <= {ROTARY.get(arch, "none")}
    assert {site.get("softcap") for site in report["sites"]} == {50.0 if arch == "gemma2" else None}  # Gemma 2's default


@pytest.mark.parametrize("arch", sorted(a for a, (fused, _) in EXPECTED.items() if fused == 2 and a not in ENCODERS | UNCACHED))
def test_cached_decoding_equals_the_full_run(arch: str) -> None:
    compiled = infercc.compile(FOLDER / f"{arch}.onnx")
    assert compiled.diagnostics["kv_cache_insertion"].status == "applied"
    feeds = _feeds(2, 7, 2)
    full = compiled.run(feeds)["logits"]
    out = compiled.run({k: v[:, :4] for k, v in feeds.items()})
    steps = [out["logits"]]
    for t in range(4, 7):
        past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        out = compiled.run({"input_ids": feeds["input_ids"][:, t:t + 1], "attention_mask": feeds["attention_mask"][:, :t + 1],
                            **past})
        steps.append(out["logits"])
    cached = np.concatenate(steps, axis=1)
    real = feeds["attention_mask"].astype(bool)
    assert float(np.abs(cached - full)[real].max()) <= TOLERANCE
