"""The facade: compile / CompiledModel.run / save / load, and the errors users see."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import infercc
from infercc import CompiledModel, Config, ConfigError, InputError, ModelLoadError
from infercc.passes import pass_names
from tests.fixtures import catalog

from .passes._build import I32, I64, F, assert_same_outputs, init, make, node, vi

SMALL = "gpt2_dynamo"
ENCODER = "bert_dynamo"


@pytest.fixture(scope="module")
def small():
    return infercc.compile(catalog.fixture_path(SMALL), provider="cpu")


def _plain_ort(path_or_proto, feeds):
    src = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _typed_model():
    """x: float[batch, 4], ids: int64[batch, seq] -> y: float[batch, 4], e: float[batch, seq, 4]"""
    return make(
        [node("Relu", ["x"], ["y"]), node("Gather", ["table", "ids"], ["e"], axis=0)],
        [vi("x", ["batch", 4]), vi("ids", ["batch", "seq"], I64)], [vi("y", ["batch", 4]), vi("e", ["batch", "seq", 4])],
        [init("table", np.arange(40, dtype=np.float32).reshape(10, 4))],
    )


def _typed_feeds(batch=2, seq=3):
    rng = np.random.default_rng(batch * 10 + seq)
    return {"x": rng.standard_normal((batch, 4)).astype(np.float32), "ids": rng.integers(0, 10, (batch, seq))}


# ----------------------------------------------------------------------------------- compile
def test_compile_from_path_str_path_and_proto_agree():
    path = catalog.fixture_path(SMALL)
    feeds, _ = catalog.reference(SMALL)
    a = infercc.compile(path, provider="cpu")
    b = infercc.compile(str(path), provider="cpu")
    c = infercc.compile(onnx.load(str(path)), provider="cpu")
    # (== also compares the diagnostics, timings included: two compilations are not equal)
    assert a.to_onnx().SerializeToString() == b.to_onnx().SerializeToString()
    assert a.to_onnx().SerializeToString() == c.to_onnx().SerializeToString()
    assert len(a.model.graph.nodes) == len(c.model.graph.nodes)
    ra, rc = a.run(feeds), c.run(feeds)
    assert_same_outputs(ra, rc)
    assert isinstance(a, CompiledModel) and "CompiledModel" in repr(a)


@pytest.mark.parametrize("name", catalog.list_fixtures())
def test_optimize_false_is_identical_to_plain_onnxruntime(name):
    path = catalog.fixture_path(name)
    compiled = infercc.compile(path, optimize=False, provider="cpu")
    assert len(compiled.diagnostics) == 0
    assert len(compiled.model.graph.nodes) == len(onnx.load(str(path)).graph.node)
    feeds, _ = catalog.reference(name)
    assert_same_outputs(_plain_ort(path, feeds), compiled.run(feeds))


def test_optimize_false_exports_the_model_unchanged():
    proto = onnx.load(str(catalog.fixture_path(ENCODER)))
    compiled = infercc.compile(proto, optimize=False)
    out = compiled.to_onnx()
    assert len(out.graph.value_info) == len(proto.graph.value_info)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in proto.graph.node]
    onnx.checker.check_model(out)


def test_compile_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot compile a int"):
        infercc.compile(42)
    with pytest.raises(ModelLoadError, match="no such file"):
        infercc.compile(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        infercc.compile(tmp_path / "empty.onnx")


def test_keyword_options_override_config():
    base = Config(strict=False, provider="cpu", intra_op_threads=1)
    compiled = infercc.compile(_typed_model(), base, strict=True, disable_passes=["constant_folding"])
    assert compiled.config.strict is True
    assert compiled.config.provider == "cpu" and compiled.config.intra_op_threads == 1
    assert compiled.config.disable_passes == ("constant_folding",)
    assert [r.pass_name for r in compiled.diagnostics] == [p for p in pass_names() if p != "constant_folding"]
    assert base.strict is False  # the caller's config is not modified


def test_config_must_be_a_config():
    with pytest.raises(ConfigError, match="infercc.Config"):
        infercc.compile(_typed_model(), {"strict": True})


@pytest.mark.parametrize(
    ("options", "field", "allowed"),
    [
        ({"optimise": False}, "optimise", "valid options"),
        ({"provider": "tpu"}, "Config.provider", "['auto', 'cpu', 'cuda']"),
        ({"intra_op_threads": -1}, "Config.intra_op_threads", "integer >= 0"),
        ({"inter_op_threads": -2}, "Config.inter_op_threads", "integer >= 0"),
        ({"disable_passes": ["fusion_of_dreams"]}, "Config.disable_passes", "known passes"),
        ({"strict": "yes"}, "Config.strict", "True or False"),
        ({"strict": 1}, "Config.strict", "True or False"),
    ],
)
def test_invalid_options_name_the_field_and_what_it_allows(options, field, allowed):
    with pytest.raises(ConfigError) as info:
        infercc.compile(_typed_model(), **options)
    assert field in str(info.value) and allowed in str(info.value)


def test_cuda_without_cuda_is_a_clear_config_error():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    seen = []
    with pytest.raises(ConfigError) as info:
        infercc.compile(_typed_model(), provider="cuda", on_pass=lambda p, r: seen.append(p))
    msg = str(info.value)
    assert "provider='cuda'" in msg and "CUDAExecutionProvider" in msg and "provider='cpu'" in msg
    assert seen == []  # refused before any work


def test_auto_provider_records_its_choice(small):
    compiled = infercc.compile(_typed_model())
    assert "provider" in compiled.diagnostics.facts
    assert small.diagnostics.facts["provider"] == "CPU (requested)"


# -------------------------------------------------------------------------------- save / load
def test_save_writes_model_and_manifest(small, tmp_path):
    out = small.save(tmp_path / "out")
    assert out == tmp_path / "out"
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    onnx.checker.check_model(str(out / "model.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"].startswith("infercc-compiled/")
    assert "model.onnx" in manifest["files"]
    assert manifest["config"] == small.config.to_dict()
    assert {"infercc", "onnx", "onnxruntime", "numpy", "python"} <= set(manifest["versions"])
    assert manifest["versions"]["infercc"] == infercc.__version__
    # the default pipeline inserts a KV cache (passes/kv_cache): past_key_values.* in, present.* out
    assert [i["name"] for i in manifest["inputs"]][:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert manifest["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert [o["name"] for o in manifest["outputs"]][:2] == ["logits", "present.0.key"]
    assert isinstance(manifest["diagnostics"], list)
    assert [d["pass"] for d in manifest["diagnostics"]] == pass_names()
    for record in manifest["diagnostics"]:
        assert {"pass", "status", "changes", "reasons", "seconds"} <= set(record)
        assert record["status"] in ("applied", "skipped", "failed")


def test_load_returns_an_equal_model_with_identical_outputs(small, tmp_path):
    small.save(tmp_path)
    loaded = infercc.load(tmp_path)
    assert loaded == small
    assert loaded.config == small.config and loaded.diagnostics == small.diagnostics
    assert loaded.inputs == small.inputs and loaded.outputs == small.outputs
    for feeds in (catalog.reference(SMALL)[0], catalog.random_feeds(SMALL, 3, 7, padding=True, seed=5)):
        assert_same_outputs(small.run(feeds), loaded.run(feeds))
    # saving what was loaded writes the same model again
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()


def test_load_of_an_unoptimized_model(tmp_path):
    path = catalog.fixture_path(ENCODER)
    compiled = infercc.compile(path, optimize=False, provider="cpu")
    compiled.save(tmp_path)
    loaded = infercc.load(str(tmp_path))
    assert loaded == compiled
    feeds, _ = catalog.reference(ENCODER)
    assert_same_outputs(_plain_ort(path, feeds), loaded.run(feeds))


def test_models_differ():
    a = infercc.compile(_typed_model(), provider="cpu")
    b = infercc.compile(_typed_model(), provider="cpu", strict=True)
    assert a != b
    assert a != "a model"
    with pytest.raises(TypeError):
        hash(a)


def test_load_needs_a_manifest(tmp_path):
    onnx.save(_typed_model(), tmp_path / "model.onnx")
    with pytest.raises(ModelLoadError, match="manifest.json"):
        infercc.load(tmp_path)
    with pytest.raises(ModelLoadError):
        infercc.load(tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: "{not json",
        lambda m: json.dumps({k: v for k, v in m.items() if k != "diagnostics"}),
        lambda m: json.dumps({k: v for k, v in m.items() if k != "config"}),
        lambda m: json.dumps(dict(m, diagnostics=[{"status": "applied"}])),
    ],
    ids=["not-json", "no-diagnostics", "no-config", "bad-record"],
)
def test_damaged_manifest_is_a_model_load_error(tmp_path, damage):
    compiled = infercc.compile(_typed_model(), provider="cpu")
    compiled.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(damage(manifest))
    with pytest.raises(ModelLoadError, match="damaged"):
        infercc.load(tmp_path)


def test_load_without_model_file(tmp_path):
    infercc.compile(_typed_model(), provider="cpu").save(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ModelLoadError):
        infercc.load(tmp_path)


FORMATS = [
    (None, "has no 'format' field, but this infercc ({v}) reads 'infercc-compiled/1'; compile the model again"),
    ("other-tool/1", "has format 'other-tool/1', but this infercc ({v}) reads 'infercc-compiled/1'; compile the model"),
    ("infercc-compiled/0", "has format 'infercc-compiled/0', but this infercc ({v}) reads 'infercc-compiled/1'"),
    (7, "has format 7, but this infercc ({v}) reads 'infercc-compiled/1'; compile the model again"),
    ("infercc-compiled/2", "format 'infercc-compiled/2' is newer than what this infercc ({v}) reads "
                           "('infercc-compiled/1'); upgrade infercc (pip install -U infercc), or compile the model again"),
]


@pytest.mark.parametrize("found, expected", FORMATS, ids=["missing", "other", "older", "not-a-string", "newer"])
def test_load_checks_the_manifest_format(tmp_path, found, expected):
    infercc.compile(_typed_model(), provider="cpu").save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "infercc-compiled/1"
    if found is None:
        del manifest["format"]
    else:
        manifest["format"] = found
    manifest["config"]["a_field_from_the_future"] = 1  # read only after the format: not "damaged"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as info:
        infercc.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "manifest.json"))
    assert expected.format(v=infercc.__version__) in str(info.value)


def test_manifest_that_is_not_an_object_is_damaged(tmp_path):
    infercc.compile(_typed_model(), provider="cpu").save(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="damaged .a JSON list, not an object"):
        infercc.load(tmp_path)


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("the user's file")
    with pytest.raises(InputError, match="model is a file, not a folder: save.. writes a folder .model.onnx \\+ "
                                         "manifest.json.; pass the path of a new or empty folder"):
        infercc.compile(_typed_model(), provider="cpu").save(target)
    assert target.read_text() == "the user's file"


@pytest.mark.parametrize("manifest", [None, '{"name": "some-other-tool"}', "not json"], ids=["none", "other", "broken"])
def test_save_refuses_a_folder_it_did_not_write(tmp_path, manifest):
    (tmp_path / "notes.txt").write_text("keep me")
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(InputError) as info:
        infercc.compile(_typed_model(), provider="cpu").save(tmp_path)
    message = str(info.value)
    assert f"{tmp_path} is a folder that holds other files (" in message and "'notes.txt'" in message
    assert "no manifest.json" in message if manifest is None else "manifest.json was not written by infercc" in message
    assert "pass an empty or new folder (nothing in this one is deleted)" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt"] + (["manifest.json"] if manifest else []))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_save_over_an_earlier_save_replaces_only_its_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    proto = make([node("MatMul", ["x", "w"], ["y"])], [vi("x", ["n", 64])], [vi("y", ["n", 8])], [init("w", w)])
    onnx.save(proto, src / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "out"
    infercc.compile(src / "m.onnx", provider="cpu").save(out)
    assert (out / "model.onnx.data").is_file()
    (out / "README.md").write_text("the user's notes")
    small = infercc.compile(_typed_model(), provider="cpu")
    small.save(out)  # no external data: the old model.onnx.data goes, the user's file stays
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.json", "model.onnx"]
    assert (out / "README.md").read_text() == "the user's notes"
    assert infercc.load(out) == small


# -------------------------------------------------------------------------------------- run
@pytest.fixture(scope="module")
def typed():
    return infercc.compile(_typed_model(), provider="cpu")


def test_run_returns_outputs_by_name(typed):
    feeds = _typed_feeds()
    out = typed.run(feeds)
    assert list(out) == ["y", "e"]
    assert_same_outputs(_plain_ort(_typed_model(), feeds), out)
    assert typed.inputs == [
        {"name": "x", "dtype": "float", "shape": ["batch", 4]},
        {"name": "ids", "dtype": "int64", "shape": ["batch", "seq"]},
    ]


def _input_error(compiled, feeds) -> str:
    with pytest.raises(InputError) as info:
        compiled.run(feeds)
    assert isinstance(info.value, ValueError) and isinstance(info.value, infercc.InferccError)
    return str(info.value)


def test_wrong_input_name(typed):
    feeds = _typed_feeds()
    feeds["idz"] = feeds.pop("ids")
    msg = _input_error(typed, feeds)
    assert "idz" in msg and "'ids'" in msg


def test_missing_input(typed):
    msg = _input_error(typed, {"x": _typed_feeds()["x"]})
    assert "missing" in msg and "ids" in msg


def test_wrong_rank(typed):
    feeds = _typed_feeds()
    feeds["ids"] = feeds["ids"][0]
    msg = _input_error(typed, feeds)
    assert "'ids'" in msg and "rank 2" in msg


def test_wrong_fixed_dim(typed):
    feeds = _typed_feeds()
    feeds["x"] = np.zeros((2, 5), np.float32)
    msg = _input_error(typed, feeds)
    assert "'x'" in msg and "axis 1 must be 4" in msg and "5" in msg


def test_inconsistent_symbolic_dims(typed):
    feeds = _typed_feeds(batch=2)
    feeds["ids"] = np.zeros((3, 4), np.int64)
    msg = _input_error(typed, feeds)
    assert "'x'" in msg and "'ids'" in msg and "'batch'" in msg


def test_inconsistent_dims_in_a_real_model(small):
    feeds = catalog.random_feeds(SMALL, 2, 5, padding=False, seed=0)
    feeds["attention_mask"] = np.ones((2, 6), np.int64)
    msg = _input_error(small, feeds)
    assert "input_ids" in msg and "attention_mask" in msg and "seq" in msg


def test_float_for_integer_input_is_refused(typed):
    feeds = _typed_feeds()
    feeds["ids"] = feeds["ids"].astype(np.float32)
    msg = _input_error(typed, feeds)
    assert "'ids'" in msg and "int64" in msg and "astype" in msg


def test_int32_ids_are_cast_to_int64(small):
    feeds = catalog.random_feeds(SMALL, 2, 6, padding=True, seed=3)
    as32 = {k: v.astype(np.int32) for k, v in feeds.items()}
    assert_same_outputs(small.run(feeds), small.run(as32))


def test_int32_model_input_accepts_python_lists():
    proto = make([node("Cast", ["i"], ["y"], to=F)], [vi("i", [3], I32)], [vi("y", [3])])
    compiled = infercc.compile(proto, provider="cpu")
    np.testing.assert_array_equal(compiled.run({"i": [1, 2, 3]})["y"], np.array([1, 2, 3], np.float32))


def test_overridable_initializer_may_be_fed():
    proto = make([node("Add", ["x", "bias"], ["y"])], [vi("x", [2]), vi("bias", [2])], [vi("y", [2])],
                 [init("bias", np.ones(2, np.float32))])
    compiled = infercc.compile(proto, provider="cpu")
    x = np.zeros(2, np.float32)
    assert compiled.run({"x": x})["y"].tolist() == [1, 1]
    assert compiled.run({"x": x, "bias": np.full(2, 3, np.float32)})["y"].tolist() == [3, 3]
    assert [i["name"] for i in compiled.inputs] == ["x"]


def test_run_from_four_threads(small):
    feed_sets = [catalog.random_feeds(SMALL, 1 + i % 3, 4 + 3 * i, padding=True, seed=i) for i in range(8)]
    expected = [small.run(f) for f in feed_sets]
    fresh = infercc.compile(catalog.fixture_path(SMALL), provider="cpu")  # backend created under contention
    errors, results = [], {}
    barrier = threading.Barrier(4)

    def work(t):
        try:
            barrier.wait()
            for rep in range(3):
                for i in range(t, len(feed_sets), 4):
                    results[(t, rep, i)] = fresh.run(feed_sets[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(results) == 3 * len(feed_sets)
    for (_, _, i), out in results.items():
        for name in expected[i]:
            np.testing.assert_allclose(out[name], expected[i][name], rtol=0, atol=1e-6)


def test_compiled_model_lazily_creates_its_backend():
    compiled = infercc.compile(_typed_model(), provider="cpu")
    assert compiled._backend is None
    compiled.run(_typed_feeds())
    assert compiled._backend is not None and compiled.backend.providers == ["CPUExecutionProvider"]


def test_public_surface():
    assert set(infercc.__all__) >= {
        "CompiledModel", "Config", "ConfigError", "InferccError", "InputError", "ModelLoadError", "PassError",
        "compile", "load",
    }
    assert Path(catalog.fixture_path(SMALL)).is_file()


def test_save_and_load_with_external_data(tmp_path):
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 100
    proto = make([node("MatMul", ["x", "w"], ["m"]), node("Add", ["m", "b"], ["y"])], [vi("x", ["n", 64])], [vi("y", ["n", 8])],
                 [init("w", w), init("b", np.ones(8, np.float32))])
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(proto, src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    compiled = infercc.compile(src / "m.onnx", provider="cpu")
    x = np.ones((2, 64), np.float32)
    expected = compiled.run({"x": x})
    np.testing.assert_allclose(expected["y"], x @ w + 1, rtol=1e-5)
    out = compiled.save(tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.onnx", "model.onnx.data"]
    loaded = infercc.load(out)
    assert loaded == compiled
    assert_same_outputs(expected, loaded.run({"x": x}))
    loaded.save(out)  # over the files it reads from
    assert_same_outputs(expected, infercc.load(out).run({"x": x}))


@pytest.mark.parametrize("name", catalog.list_fixtures())
def test_save_load_round_trip_on_every_fixture(name, tmp_path):
    compiled = infercc.compile(catalog.fixture_path(name), provider="cpu")
    compiled.save(tmp_path)
    loaded = infercc.load(tmp_path)
    assert loaded == compiled
    feeds = catalog.random_feeds(name, 2, 9, padding=True, seed=11)
    assert_same_outputs(compiled.run(feeds), loaded.run(feeds))
