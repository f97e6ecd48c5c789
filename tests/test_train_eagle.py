"""``infercc train-heads --kind eagle`` end to end: it generates text with the model, trains the
EAGLE draft layer on it, reports each draft step's held-out accuracy and writes a draft the eagle
proposer reads, whose greedy output is plain greedy decoding's; bad options are clear errors.
stories260K in the default run (a few seconds), SmolLM2-135M behind ``slow``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import infercc
from infercc import InputError
from infercc.cli import main
from infercc.runtime.speculative.eagle_draft import DRAFT_FILE
from infercc.train_eagle import train_eagle
from infercc.train_heads import held_out_ids
from tests.importers._models import SMOLLM2, STORIES, require

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside. One day, Lily"


def test_cli_trains_a_draft_the_eagle_proposer_reads(tmp_path, capsys):
    model = str(require(STORIES))
    texts = tmp_path / "prompts.txt"
    texts.write_text("Once upon a time\n\nTom had a big red ball.\n\nThe sun was hot.\n\nLily went to the park.")
    out = tmp_path / "eagle"
    assert main(["train-heads", model, "-o", str(out), "--kind", "eagle", "--steps", "12", "--seq-len", "24",
                 "--texts", str(texts), "--threads", "1"]) == 0
    log = capsys.readouterr().err
    assert "draft step 1 (token +1): top-1 accuracy" in log and "draft step 3" in log and "wrote" in log
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "eagle" and len(config["held_out_accuracy"]) == 5
    assert (out / DRAFT_FILE).is_file() and 0 < len(config["draft_vocab"]) <= 4096
    assert 0 <= config["min_confidence"] <= 1
    (out / "config.json").write_text(json.dumps({**config, "min_confidence": 0.0}))  # every guess verified
    compiled = infercc.compile(model, speculation="eagle", speculation_heads=str(out))
    plain = compiled.generate(STORY, max_new_tokens=40, speculation="off")
    spec = compiled.generate(STORY, max_new_tokens=40)
    assert spec.token_ids == plain.token_ids and spec.decode_loop == "speculative"
    assert spec.speculation_reason is None and spec.speculation.steps > 0


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="unroll must be an integer >= 1"):
        train_eagle("model.gguf", tmp_path, unroll=0)
    with pytest.raises(InputError, match="lr must be a number"):
        train_eagle("model.gguf", tmp_path, lr=2.0)
    with pytest.raises(InputError, match="no text file at"):
        train_eagle(str(require(STORIES)), tmp_path, texts=tmp_path / "missing.txt")


def test_held_out_sequences_are_drawn_by_prompt():
    """A prompt's greedy and sampled continuations fall on one side: no memory in the accuracy."""
    sequences = [([i], [1, 2, 3]) for i in range(10)] * 2
    held = held_out_ids(sequences, 0.3, seed=0)
    assert len(held) == 6 and all((i + 10) % 20 in held for i in held)
    assert np.unique([sequences[i][0] for i in held]).size == 3
    assert len(held_out_ids(sequences, 0.3, seed=0, by_prompt=False)) == 6


@pytest.mark.slow
def test_smollm2_draft_reaches_useful_acceptance(tmp_path):
    """The default recipe on SmolLM2-135M (minutes): the first draft step guesses right well above
    chance on prompts it never saw (11.8% measured: 5.9K training tokens, held out by prompt)."""
    summary = train_eagle(str(require(SMOLLM2)), tmp_path / "eagle", progress=False)
    assert summary["accuracy"][0] > 0.07 and summary["draft_vocab"] > 500, summary
