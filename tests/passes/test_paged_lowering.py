"""PagedCacheLowering: a cached graph's attention becomes PagedAttention over kv_pool.* inputs, or
the graph is left alone with the reason per layer (int8 caches, no cache, ONNX Runtime's lowered
attention, a present that something else reads). The pass is not in the compile pipeline; the
paged graph cannot be lowered for ONNX Runtime (the op writes its inputs), and its C names the
kernel. End-to-end numbers are in tests/runtime/test_paged_runner.py."""

from __future__ import annotations

import functools

import pytest

import infercc
from infercc.codegen.build import warnings_of
from infercc.codegen.emit import emit
from infercc.codegen.ops import Unsupported
from infercc.errors import PassError
from infercc.ir import DType, Model
from infercc.passes.canonical import DOMAIN
from infercc.passes.cleanup.dce import DeadCodeElimination
from infercc.passes.diagnostics import PassRecord
from infercc.passes.kv_cache.paged import BLOCK_TABLES, PAST_LENS, PagedCacheLowering, pool_name
from infercc.passes.lowering import LowerCanonicalOps
from infercc.passes.manager import PassManager
from tests.runtime._hf_models import write_hf

BLOCK = 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_hf(tmp_path_factory.mktemp("paged_lowering") / "llama"))


@functools.cache
def compiled(source: str, **options) -> infercc.CompiledModel:
    return infercc.compile(source, **{"backend": "c", "kv_cache_dtype": "fp32", **options})


def lower(model: Model, config, block: int = BLOCK) -> tuple[Model, PassRecord]:
    paged, diagnostics = PassManager([PagedCacheLowering(block), DeadCodeElimination()],
                                     config.replace(strict=True)).run(model.clone())
    return paged, diagnostics[PagedCacheLowering.name]


@pytest.mark.parametrize("kv,dtype", [("fp32", DType.FLOAT), ("fp16", DType.FLOAT16)])
def test_every_cached_layer_becomes_paged_attention(llama: str, kv: str, dtype: DType) -> None:
    source = compiled(llama, kv_cache_dtype=kv)
    attention = [n for n in source.model.graph.nodes if n.op_type == "Attention"]
    paged, record = lower(source.model, source.config)
    assert record.status == "applied" and record.changes == {"layers_paged": 2}
    assert [s.status for s in record.sites] == ["applied", "applied"]
    graph = paged.graph
    inputs = {v.name: v for v in graph.inputs}
    assert not [n for n in inputs if n.startswith("past_key_values.")]
    assert [v.name for v in graph.outputs] == ["logits"]
    for layer in range(2):
        for what in ("key", "value"):
            pool = inputs[pool_name(layer, what)]
            assert pool.dtype == dtype and pool.shape == ("num_blocks", 2, BLOCK, 8)
    assert inputs[BLOCK_TABLES].dtype == DType.INT32 and inputs[BLOCK_TABLES].shape == ("batch", "max_blocks")
    assert inputs[PAST_LENS].dtype == DType.INT32 and inputs[PAST_LENS].shape == ("batch",)
    nodes = [n for n in graph.nodes if n.domain == DOMAIN and n.op_type == "PagedAttention"]
    assert len(nodes) == 2 and not any(n.op_type == "Attention" for n in graph.nodes)
    for old, new in zip(attention, nodes):
        assert [v and v.name for v in new.inputs[:4]] == [v and v.name for v in old.inputs[:4]]
        assert {k: new.attr(k) for k in old.attrs} == {k: old.attr(k) for k in old.attrs}
        assert new.attr("block_size") == BLOCK
        assert [v.name for v in new.inputs[4:]] == [pool_name(nodes.index(new), "key"),
                                                    pool_name(nodes.index(new), "value"), BLOCK_TABLES, PAST_LENS]
        assert new.outputs[0].shape == ("batch", "sequence", 32) and new.outputs[0].dtype == DType.FLOAT
    # the compiled model is untouched, and compile() never pages
    assert any(v.name.startswith("past_key_values.") for v in source.model.graph.inputs)
    assert "paged_cache_lowering" not in [r.pass_name for r in source.diagnostics]


def test_refusals_leave_the_graph_alone_with_the_reason(llama: str) -> None:
    cases = {
        "an int8 cache": compiled(llama, kv_cache_dtype="int8"),
        "no KV cache": compiled(llama, kv_cache=False),
        "no fused attention": compiled(llama, backend="ort"),
    }
    for reason, model in cases.items():
        before = [v.name for v in model.model.graph.inputs]
        paged, record = lower(model.model, model.config)
        assert record.status == "skipped", reason
        assert any(reason in r for r in record.reasons), (reason, record.reasons)
        assert [v.name for v in paged.graph.inputs] == before
        assert all(s.status == "skipped" for s in record.sites)


def test_a_present_read_by_another_node_refuses_every_layer(llama: str) -> None:
    model = compiled(llama).model.clone()
    graph = model.graph
    present = next(v for v in graph.outputs if v.name == "present.1.value")
    extra = graph.make_node("Identity", [present], output_names=["peek"]).outputs[0]
    extra.dtype, extra.shape = present.dtype, present.shape
    graph.outputs.append(extra)
    paged, record = lower(model, compiled(llama).config)
    assert record.status == "skipped"
    reasons = [s.reason for s in record.sites]
    assert "present %present.1.value is not just the output" in reasons[1]
    assert "cannot be" in reasons[0]  # one graph pages every layer or none
    assert any(v.name.startswith("past_key_values.") for v in paged.graph.inputs)


def test_the_paged_graph_is_for_the_c_runtime_only(llama: str) -> None:
    source = compiled(llama)
    paged, _ = lower(source.model, source.config)
    with pytest.raises(PassError, match="writes its key/value pools in place"):
        PassManager([LowerCanonicalOps()], source.config.replace(backend="ort", strict=True)).run(paged.clone())
    program = emit(paged)
    assert program.source.count("icc_paged_attention(&A);") == 2
    assert warnings_of(program.source) == []
    assert "no KV cache" in program.decode_reason  # the C decode loop is the contiguous runner's
    tables = next(v for v in paged.graph.inputs if v.name == BLOCK_TABLES)
    tables.dtype = DType.INT64
    with pytest.raises(Unsupported, match="PagedAttention.*int32"):
        emit(paged)


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size must be positive"):
        PagedCacheLowering(0)
