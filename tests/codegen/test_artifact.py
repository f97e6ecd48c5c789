"""Saving and loading the generated-C artifact: model.c + weights.bin beside model.onnx, load
memory-maps weights.bin (no repacking, no copy) only when the source it regenerates from the IR is
byte-identical to the saved model.c and the hashes match; anything tampered warns and repacks, with
the same outputs; the folder saved by one process loads in a fresh one (its own build cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import infercc
from infercc.codegen import artifact
from tests.fixtures import catalog

ROOT = Path(__file__).resolve().parents[2]
NAME = "gpt2_dynamo"


@pytest.fixture(scope="module")
def compiled() -> infercc.CompiledModel:
    model = infercc.compile(catalog.fixture_path(NAME), backend="c")
    assert model.runtime == "c", model.runtime_reason
    return model


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return catalog.random_feeds(NAME, 2, 5, padding=True, seed=1)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _loaded_quietly(folder: Path) -> infercc.CompiledModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = infercc.load(folder)
        assert loaded.runtime == "c", loaded.runtime_reason
    return loaded


def test_round_trip_maps_the_saved_weights(compiled, feeds, tmp_path) -> None:
    compiled.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    entry = manifest[artifact.MANIFEST_KEY]
    assert {"model.c", "weights.bin"} <= set(manifest["files"])
    assert entry["weights_size"] == (tmp_path / "m" / "weights.bin").stat().st_size == compiled.backend.program.blob.size
    assert (tmp_path / "m" / "model.c").read_text() == compiled.backend.source
    loaded = _loaded_quietly(tmp_path / "m")
    weights = loaded.backend.library.weights
    assert isinstance(weights, np.memmap) and not weights.flags.writeable
    assert Path(weights.filename).resolve() == (tmp_path / "m" / "weights.bin").resolve()
    assert not loaded.backend.program.blob.pack and loaded.backend.program.blob.parts == []  # planned, not packed
    _same(compiled.run(feeds), loaded.run(feeds))


def test_quantized_weights_round_trip_mapped(feeds, tmp_path) -> None:
    quantized = infercc.compile(catalog.fixture_path(NAME), backend="c", quantize="int4")
    quantized.save(tmp_path / "q")
    loaded = _loaded_quietly(tmp_path / "q")
    assert isinstance(loaded.backend.library.weights, np.memmap)
    _same(quantized.run(feeds), loaded.run(feeds))


def test_saving_a_loaded_model_back_into_its_folder_keeps_it_running(compiled, feeds, tmp_path) -> None:
    compiled.save(tmp_path / "m")
    loaded = _loaded_quietly(tmp_path / "m")
    expected = loaded.run(feeds)
    loaded.save(tmp_path / "m")  # weights.bin is mapped by `loaded`: replaced by rename, not rewritten in place
    _same(expected, loaded.run(feeds))
    _same(expected, _loaded_quietly(tmp_path / "m").run(feeds))


def _tamper_source(folder: Path) -> None:
    path = folder / "model.c"
    path.write_text(path.read_text().replace("icc_run(", "icc_run_evil(", 1))


def _tamper_weights(folder: Path) -> None:
    with open(folder / "weights.bin", "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0xFF]))


def _truncate_weights(folder: Path) -> None:
    with open(folder / "weights.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 64)


def _link_weights_outside(folder: Path) -> None:
    outside = folder.parent / "elsewhere.bin"
    (folder / "weights.bin").rename(outside)
    (folder / "weights.bin").symlink_to(outside)


def _forge_manifest(folder: Path) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[artifact.MANIFEST_KEY]["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("tamper, why", [(_tamper_source, "model.c is not the source"),
                                         (_tamper_weights, "sha256"), (_truncate_weights, "bytes"),
                                         (_link_weights_outside, "outside the model folder"),
                                         (_forge_manifest, "sha256")])
def test_a_tampered_artifact_warns_and_repacks(compiled, feeds, tmp_path, tamper, why) -> None:
    compiled.save(tmp_path / "m")
    tamper(tmp_path / "m")
    loaded = infercc.load(tmp_path / "m")
    with pytest.warns(UserWarning, match=why):
        assert loaded.runtime == "c"
    assert not isinstance(loaded.backend.library.weights, np.memmap)
    assert "icc_run_evil" not in loaded.backend.source  # the saved source is never what gets built
    _same(compiled.run(feeds), loaded.run(feeds))


def test_an_ort_model_saves_no_c_files_and_removes_stale_ones(compiled, tmp_path) -> None:
    compiled.save(tmp_path / "m")
    infercc.compile(catalog.fixture_path(NAME)).save(tmp_path / "m")
    assert not (tmp_path / "m" / "model.c").exists() and not (tmp_path / "m" / "weights.bin").exists()
    assert artifact.MANIFEST_KEY not in json.loads((tmp_path / "m" / "manifest.json").read_text())


def test_a_saved_c_model_loads_in_a_fresh_process(compiled, feeds, tmp_path) -> None:
    compiled.save(tmp_path / "m")
    np.savez(tmp_path / "feeds.npz", **feeds)
    script = (
        "import sys, warnings, numpy as np, infercc\n"
        "warnings.simplefilter('error')\n"
        "m = infercc.load(sys.argv[1])\n"
        "out = m.run(dict(np.load(sys.argv[2])))\n"
        "assert m.runtime == 'c', m.runtime_reason\n"
        "assert isinstance(m.backend.library.weights, np.memmap)\n"
        "np.savez(sys.argv[3], **out)\n"
    )
    env = {**os.environ, "INFERCC_CACHE_DIR": str(tmp_path / "cache")}  # a cold cache: builds from scratch
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m"), str(tmp_path / "feeds.npz"),
                           str(tmp_path / "out.npz")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "cache" / "c").glob("model-*.so"))
    _same(compiled.run(feeds), dict(np.load(tmp_path / "out.npz")))
