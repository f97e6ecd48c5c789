"""Config: defaults, validation (every error names the field and what it allows), copies, dicts."""

from __future__ import annotations

import dataclasses
import math

import pytest

import infercc
from infercc import Config, ConfigError
from infercc.passes import pass_names


def test_defaults_are_valid_and_documented():
    c = Config()
    assert c.optimize is True and c.strict is False and c.check_each_pass is False
    assert c.provider == "auto" and c.disable_passes == ()
    assert c.intra_op_threads == 0 and c.inter_op_threads == 0
    assert c.fold_limit_bytes > 0 and c.check_tolerance > 0


def test_config_is_frozen_and_hashable():
    c = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.strict = True  # type: ignore[misc]
    assert hash(c) == hash(Config())
    assert c == Config() and c != Config(strict=True)


def test_config_error_is_a_value_error_and_an_infercc_error():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, infercc.InferccError)


@pytest.mark.parametrize("field", ["optimize", "strict", "check_each_pass"])
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_booleans_must_be_bool(field, bad):
    with pytest.raises(ConfigError) as info:
        Config(**{field: bad})
    msg = str(info.value)
    assert f"Config.{field}" in msg and "True or False" in msg and repr(bad) in msg


@pytest.mark.parametrize("bad", ["tpu", "CUDA", "", None, 1])
def test_provider_must_be_known(bad):
    with pytest.raises(ConfigError) as info:
        Config(provider=bad)
    msg = str(info.value)
    assert "Config.provider" in msg and "['auto', 'cpu', 'cuda']" in msg and repr(bad) in msg


@pytest.mark.parametrize("provider", ["auto", "cpu", "cuda"])
def test_known_providers_are_accepted(provider):
    assert Config(provider=provider).provider == provider


@pytest.mark.parametrize("field", ["intra_op_threads", "inter_op_threads", "fold_limit_bytes"])
@pytest.mark.parametrize("bad", [-1, 1.5, "4", True, None])
def test_counts_must_be_non_negative_integers(field, bad):
    with pytest.raises(ConfigError) as info:
        Config(**{field: bad})
    msg = str(info.value)
    assert f"Config.{field}" in msg and "integer >= 0" in msg and repr(bad) in msg


@pytest.mark.parametrize("bad", [0, -1e-3, "1e-4", True, math.nan, None])
def test_check_tolerance_must_be_positive(bad):
    with pytest.raises(ConfigError) as info:
        Config(check_tolerance=bad)
    assert "Config.check_tolerance" in str(info.value) and "> 0" in str(info.value)


def test_unknown_pass_in_disable_passes_lists_known_passes():
    with pytest.raises(ConfigError) as info:
        Config(disable_passes=["constant_folding", "no_such_pass"])
    msg = str(info.value)
    assert "Config.disable_passes" in msg and "no_such_pass" in msg
    for name in pass_names():
        assert name in msg


def test_disable_passes_accepts_lists_tuples_and_one_name():
    assert Config(disable_passes=["constant_folding"]).disable_passes == ("constant_folding",)
    assert Config(disable_passes=("constant_folding",)).disable_passes == ("constant_folding",)
    assert Config(disable_passes="constant_folding").disable_passes == ("constant_folding",)
    both = {"constant_folding", "dead_code_elimination"}
    assert Config(disable_passes=both).disable_passes == tuple(sorted(both))


@pytest.mark.parametrize("bad", [None, 3, [1], ["constant_folding", None]])
def test_disable_passes_must_be_names(bad):
    with pytest.raises(ConfigError) as info:
        Config(disable_passes=bad)
    assert "Config.disable_passes" in str(info.value)


def test_lowering_must_be_known():
    with pytest.raises(ConfigError) as info:
        Config(lowering="tvm")
    assert "Config.lowering" in str(info.value) and "'ort'" in str(info.value)


def test_replace_overrides_and_validates():
    c = Config().replace(strict=True, provider="cpu")
    assert c.strict is True and c.provider == "cpu"
    with pytest.raises(ConfigError, match="Config.provider"):
        Config().replace(provider="tpu")


def test_replace_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        Config().replace(optimise=False)
    msg = str(info.value)
    assert "optimise" in msg
    for f in dataclasses.fields(Config):
        assert f.name in msg


def test_unknown_field_is_the_same_config_error_everywhere(tmp_path):
    """Config(...), Config.replace(...) and compile(..., option=) give one message: the unknown
    name, the closest field, every valid field (compile refuses before reading the model)."""
    messages = []
    for make in (lambda: Config(qauntize="int8"), lambda: Config().replace(qauntize="int8"),
                 lambda: infercc.compile(tmp_path / "never-read.onnx", qauntize="int8")):
        with pytest.raises(ConfigError) as info:
            make()
        messages.append(str(info.value))
    assert messages[0] == messages[1] == messages[2]
    assert messages[0].startswith("unknown option(s) ['qauntize'] (did you mean 'quantize'?); valid options: [")
    for f in dataclasses.fields(Config):
        assert repr(f.name) in messages[0]


def test_several_unknown_fields_each_get_a_suggestion():
    with pytest.raises(ConfigError) as info:
        Config(optimise=False, strct=True, zzzz=1)
    msg = str(info.value)
    assert "['optimise', 'strct', 'zzzz'] (did you mean 'optimise' -> 'optimize', 'strct' -> 'strict'?)" in msg
    with pytest.raises(ConfigError) as info:
        Config(zzzz=1)
    assert "did you mean" not in str(info.value)


def test_config_still_copies_and_pickles():
    import copy
    import pickle

    c = Config(strict=True, disable_passes=("constant_folding",))
    assert pickle.loads(pickle.dumps(c)) == c and copy.deepcopy(c) == c and copy.copy(c) == c
    assert Config(False).optimize is False  # positional fields still work


def test_dict_round_trip():
    c = Config(strict=True, disable_passes=("constant_folding",), provider="cpu", intra_op_threads=2,
               check_tolerance=1e-3, fold_limit_bytes=1024)
    d = c.to_dict()
    assert d["disable_passes"] == ["constant_folding"]
    assert Config.from_dict(d) == c
    import json

    assert Config.from_dict(json.loads(json.dumps(d))) == c


def test_from_dict_rejects_unknown_or_invalid_fields():
    with pytest.raises(ConfigError, match="unknown option"):
        Config.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="Config.strict"):
        Config.from_dict({"strict": "no"})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("speculation", "lookahead", "Config.speculation must be one of"),
    ("speculation_policy", "fast", "Config.speculation_policy must be one of"),
    ("num_speculative_tokens", 0, r"Config.num_speculative_tokens must be an integer in \[1, 64\]"),
    ("num_speculative_tokens", True, "Config.num_speculative_tokens"),
    ("draft_layers", -1, "Config.draft_layers must be an integer >= 0"),
    ("max_speculation_compute_fraction", 1.5, r"Config.max_speculation_compute_fraction must be a number in \[0, 1\]"),
    ("speculation_hand_back", -1, r"Config.speculation_hand_back must be an integer >= 0"),
    ("draft_model", "", "Config.draft_model must be None or the path of a model"),
])
def test_speculation_fields_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        Config(**{field: value})


def test_speculation_fields_round_trip(tmp_path):
    config = Config(speculation="draft", draft_model=tmp_path / "draft.gguf", draft_layers=3,
                    num_speculative_tokens=8, speculation_policy="latency", max_speculation_compute_fraction=0.25)
    assert config.draft_model == str(tmp_path / "draft.gguf")
    assert Config.from_dict(config.to_dict()) == config
    assert Config().speculation is None
