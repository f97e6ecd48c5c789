"""``infercc train-heads`` end to end: it generates text with the model, trains Medusa heads on it,
reports each head's held-out accuracy and writes heads that the medusa proposer reads, whose
greedy output is plain greedy decoding's; bad options and a missing torch are clear errors.
stories260K in the default run (a few seconds), SmolLM2-135M behind ``slow``."""

from __future__ import annotations

import json
import sys

import pytest

import infercc
from infercc import InputError
from infercc.cli import main
from infercc.runtime.speculative.heads import HEADS_FILE
from infercc.train_heads import train_heads
from tests.importers._models import SMOLLM2, STORIES, require

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside. One day, Lily"


def test_cli_trains_heads_the_medusa_proposer_reads(tmp_path, capsys):
    model = str(require(STORIES))
    out = tmp_path / "heads"
    assert main(["train-heads", model, "-o", str(out), "--heads", "2", "--steps", "15", "--seq-len", "24",
                 "--threads", "1"]) == 0
    log = capsys.readouterr().err
    assert "head 1 (token +2): top-1 accuracy" in log and "head 2 (token +3)" in log and "wrote" in log
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["shared_lm_head"] and len(config["held_out_accuracy"]) == 2
    assert (out / HEADS_FILE).is_file() and 0 < len(config["draft_vocab"]) <= 4096
    assert 0 <= config["min_confidence"] <= 1
    # (a few steps of training leave the heads unsure: every guess proposed, so that they are verified)
    (out / "config.json").write_text(json.dumps({**config, "min_confidence": 0.0}))
    compiled = infercc.compile(model, speculation="medusa", speculation_heads=str(out))
    plain = compiled.generate(STORY, max_new_tokens=40, speculation="off")
    spec = compiled.generate(STORY, max_new_tokens=40)
    assert spec.token_ids == plain.token_ids and spec.decode_loop == "speculative"
    assert spec.speculation_reason is None and spec.speculation.steps > 0


def test_bad_options_and_a_missing_torch_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="steps must be an integer >= 1"):
        train_heads("model.gguf", tmp_path, steps=0)
    with pytest.raises(InputError, match="lr must be a number"):
        train_heads("model.gguf", tmp_path, lr=2.0)
    with pytest.raises(InputError, match="no text file at"):
        train_heads(str(require(STORIES)), tmp_path, texts=tmp_path / "missing.txt")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(InputError, match=r"pip install 'infercc\[export\]'"):
        train_heads("model.gguf", tmp_path)


@pytest.mark.slow
def test_smollm2_heads_reach_useful_acceptance(tmp_path):
    """The default recipe on SmolLM2-135M (a few minutes): the first head guesses right well above chance."""
    summary = train_heads(str(require(SMOLLM2)), tmp_path / "heads", progress=False)
    assert summary["accuracy"][0] > 0.15, summary  # (23% measured with the default recipe)
