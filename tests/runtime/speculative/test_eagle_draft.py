"""The EAGLE draft layer: the NumPy forward pass the proposer runs is the torch one train-heads
trains (a whole block at once, a position at a time over the cache, and the unrolled draft
steps: step s reads step s - 1's output and the cache entries of the proposal in flight); a draft
file that is not one, or not for this model, is a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infercc.runtime.speculative.eagle_draft import (
    DRAFT_FILE,
    EagleDraft,
    expected_shapes,
    load_draft,
    save_draft,
)
from infercc.runtime.speculative.heads import HeadsError

HIDDEN, HEADS, HEAD_DIM, INTER = 16, 2, 4, 24


def random_weights(seed: int = 0, hidden: int = HIDDEN, scale: float = 0.3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (1.0 + 0.1 * rng.standard_normal(shape) if name.endswith("norm.weight")
                   else scale * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in expected_shapes(hidden, HEADS, HEAD_DIM, INTER).items()}


def test_numpy_forward_is_the_trained_torch_layer():
    torch = pytest.importorskip("torch")
    from infercc.train_eagle import Draft

    weights = random_weights()
    draft = EagleDraft(weights, HEADS, HEAD_DIM)
    net = Draft(torch, HIDDEN, HEADS, HEAD_DIM, INTER, weights=weights)
    rng = np.random.default_rng(1)
    n, base = 9, 5
    feats = rng.standard_normal((n, HIDDEN)).astype(np.float32)
    embeds = rng.standard_normal((n, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        steps = [s[0].numpy() for s in net.steps(torch.from_numpy(feats)[None], torch.from_numpy(embeds)[None],
                                                 torch.arange(base, base + n)[None], 3)]
    block = draft.forward(draft.new_cache(base), feats, embeds)
    np.testing.assert_allclose(block, steps[0], rtol=1e-4, atol=1e-4)
    cache = draft.new_cache(base)
    one = np.concatenate([draft.forward(cache, feats[i:i + 1], embeds[i:i + 1]) for i in range(n)])
    np.testing.assert_allclose(one, block, rtol=1e-4, atol=1e-4)
    for anchor in (0, 3, 6):  # the proposer's chain: true entries up to the anchor, then its own
        cache = draft.new_cache(base)
        out = draft.forward(cache, feats[:anchor + 1], embeds[:anchor + 1])[-1:]
        for s in (1, 2):
            out = draft.forward(cache, out, embeds[anchor + s:anchor + s + 1])
            np.testing.assert_allclose(out[0], steps[s][anchor + s], rtol=1e-4, atol=1e-4)


def test_draft_files_that_do_not_fit_are_clear_errors(tmp_path):
    from safetensors.numpy import save_file

    good = save_draft(tmp_path / "good", random_weights(), hidden_size=HIDDEN, num_attention_heads=HEADS,
                      head_dim=HEAD_DIM, intermediate_size=INTER).parent
    draft, config = load_draft(good, HIDDEN)
    assert draft.heads == HEADS and config["architecture"] == "eagle"
    with pytest.raises(HeadsError, match="another model"):
        load_draft(good, HIDDEN * 2)
    base = json.loads((good / "config.json").read_text())
    cases = {
        "nan": ({**random_weights(), "fc.bias": np.full(HIDDEN, np.nan, np.float32)}, base, "NaN"),
        "missing": ({k: v for k, v in random_weights().items() if k != "fc.bias"}, base, "'fc.bias' is missing"),
        "stranger": ({**random_weights(), "lm_head.weight": np.zeros(2, np.float32)}, base, "not part of the EAGLE"),
        "dtype": ({**random_weights(), "fc.bias": np.zeros(HIDDEN, np.int32)}, base, "dtype I32"),
        "arch": (random_weights(), {**base, "architecture": "medusa"}, "does not describe an EAGLE draft"),
        "heads": (random_weights(), {**base, "num_attention_heads": 0}, "num_attention_heads must be an integer"),
        "odd": (random_weights(), {**base, "head_dim": 3}, "head_dim must be even"),
        "theta": (random_weights(), {**base, "rope_theta": "x"}, "rope_theta must be a positive number"),
    }
    for name, (tensors, config, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        save_file(tensors, str(folder / DRAFT_FILE))
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(HeadsError, match=message):
            load_draft(folder, HIDDEN)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / DRAFT_FILE).write_bytes(b"\xff" * 8 + (good / DRAFT_FILE).read_bytes()[8:200])
    (corrupt / "config.json").write_text(json.dumps(base))
    with pytest.raises(HeadsError, match="not a readable safetensors file"):
        load_draft(corrupt, HIDDEN)
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(HeadsError, match="not readable JSON"):
        load_draft(corrupt, HIDDEN)
