"""icc_paged_attention (codegen/kernels/paged_attention.h) against PagedAttention's NumPy definition
(passes/kv_cache/paged_op.py), and that definition against the cached canonical Attention's ONNX
decomposition run row by row by onnxruntime (so the paged op means what a cached Attention means).

Rows of one call have different past lengths and blocks scattered over the pool; pool slots no row
owns hold NaN, which the kernel must neither read nor overwrite. The kernel is built -march=native,
haswell (AVX2+F16C) and x86-64 (portable: plain C and the portable fp16 converter), and runs with 2
threads so the key split runs too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math

import numpy as np
import pytest

from infercc.passes.fusion.attention_op import AttentionSpec
from infercc.passes.kv_cache.paged_op import PagedSpec, reference

from ._ckernel import MARCHES, build, cpu_has
from .test_attention_kernel import Case, decomposition

TOL = 1e-5
F32_MIN = float(np.finfo(np.float32).min)
EXPORTS = "void icc_test_paged(const icc_paged_attention_args *a) { icc_paged_attention(a); }\n" \
          "int icc_test_error(char *out, int n) { strncpy(out, icc_msg, n); int e = icc_err; icc_err = 0; " \
          "icc_msg[0] = 0; return e; }"
P64, PF, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class Args(ctypes.Structure):
    """icc_paged_attention_args of paged_attention.h, field for field."""

    _fields_ = [(n, P64) for n in ("B", "S", "H", "Hkv", "D", "Dv")] + [
        ("scale", PF), ("softcap", PF), ("mask_value", PF), ("causal", ctypes.c_int), ("left_window", P64),
        ("q", PTR), ("k", PTR), ("v", PTR), ("mask_bool", PTR), ("mask_float", PTR), ("mask_stride", P64 * 4),
        ("mask_len", P64), ("cache_dtype", ctypes.c_int), ("key_pool", PTR), ("value_pool", PTR),
        ("num_blocks", P64), ("block_size", P64), ("block_tables", PTR), ("max_blocks", P64),
        ("past_lens", PTR), ("out", PTR), ("tree", ctypes.c_int)]


@dataclasses.dataclass
class Paged:
    pasts: tuple[int, ...]  # past length of each row (B = len)
    S: int
    H: int
    Hkv: int
    D: int
    block: int = 16
    Dv: int | None = None
    causal: int = 1
    left_window: int = -1
    softcap: float = 0.0
    mask: str | None = None  # "pad" [B,1,1,T] bool, "rows" [1,1,S,T] float, "full" [B,H,S,T] float
    mask_value: float = -math.inf
    pool: str = "f32"  # "f32" or "f16"
    extra_mask: int = 3  # mask columns beyond the longest row (left padding of every row)
    tree: bool = False  # the args' tree flag (each row over its own allowed keys)

    @property
    def dv(self) -> int:
        return self.Dv or self.D

    def spec(self) -> PagedSpec:
        return PagedSpec(AttentionSpec(self.H, self.Hkv, self.D, self.dv, 1 / math.sqrt(self.D), bool(self.causal),
                                       self.left_window, self.mask_value, 0, self.softcap), self.block)


def make(case: Paged, seed: int = 0) -> dict:
    """Inputs of a case: q/k/v, the mask, pools (NaN where no row has a block) with each row's past
    filled in, and block tables over a shuffled pool (with spare blocks nobody owns)."""
    rng = np.random.default_rng(seed)
    B, S, bs = len(case.pasts), case.S, case.block
    need = [-(-(p + S) // bs) for p in case.pasts]
    num_blocks = sum(need) + 3
    order = rng.permutation(num_blocks).astype(np.int32)
    tables = np.zeros((B, max(need) + 1), np.int32)  # one padding column (0s) past every row's blocks
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[at:at + n]
        at += n
    dtype = np.float16 if case.pool == "f16" else np.float32
    pools = [np.full((num_blocks, case.Hkv, bs, size), np.nan, dtype) for size in (case.D, case.dv)]
    for b, p in enumerate(case.pasts):
        pos = np.arange(p)
        for pool in pools:
            pool[tables[b, pos // bs], :, pos % bs] = rng.standard_normal((p, case.Hkv, pool.shape[-1]))
    f = np.float32
    x = {"q": rng.standard_normal((B, S, case.H * case.D)).astype(f) * 2,
         "k": rng.standard_normal((B, S, case.Hkv * case.D)).astype(f),
         "v": rng.standard_normal((B, S, case.Hkv * case.dv)).astype(f), "mask": None, "key_pool": pools[0],
         "value_pool": pools[1], "block_tables": tables, "past_lens": np.asarray(case.pasts, np.int32)}
    T = max(case.pasts) + S + case.extra_mask
    if case.mask == "pad":
        x["mask"] = rng.random((B, 1, 1, T)) > 0.3
    elif case.mask == "rows":
        x["mask"] = (rng.standard_normal((1, 1, S, T)) * 3).astype(f)
    elif case.mask == "full":
        m = (rng.standard_normal((B, case.H, S, T)) * 3).astype(f)
        m[rng.random(m.shape) < 0.2] = -np.inf
        x["mask"] = m
    return x


def copy(x: dict) -> dict:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in x.items()}


def run_kernel(lib: ctypes.CDLL, case: Paged, x: dict) -> tuple[np.ndarray, int, str]:
    """Call the kernel on x (its pools written in place); (output, error code, message)."""
    a, keep = Args(), []

    def ptr(arr: np.ndarray) -> int:
        arr = np.ascontiguousarray(arr)
        keep.append(arr)
        return arr.ctypes.data

    B, S = x["q"].shape[:2]
    a.B, a.S, a.H, a.Hkv, a.D, a.Dv = B, S, case.H, case.Hkv, case.D, case.dv
    a.scale, a.softcap, a.mask_value = 1 / math.sqrt(case.D), case.softcap, case.mask_value
    a.causal, a.left_window = case.causal, case.left_window
    a.q, a.k, a.v = ptr(x["q"]), ptr(x["k"]), ptr(x["v"])
    mask = x["mask"]
    if mask is not None:
        a.mask_len = mask.shape[-1]
        strides = np.broadcast_to(mask, (B, case.H, S, mask.shape[-1])).strides
        a.mask_stride[:] = [st // mask.itemsize for st in strides]
        if mask.dtype == bool:
            a.mask_bool = ptr(mask.view(np.uint8))
        else:
            a.mask_float = ptr(mask)
    a.cache_dtype = int(case.pool == "f16")
    a.tree = int(case.tree)
    assert x["key_pool"].flags.c_contiguous and x["value_pool"].flags.c_contiguous
    a.key_pool, a.value_pool = x["key_pool"].ctypes.data, x["value_pool"].ctypes.data
    a.num_blocks, a.block_size = x["key_pool"].shape[0], case.block
    a.block_tables, a.max_blocks = ptr(x["block_tables"]), x["block_tables"].shape[1]
    a.past_lens = ptr(x["past_lens"])
    out = np.full((B, S, case.H * case.dv), np.nan, np.float32)
    a.out = out.ctypes.data
    lib.icc_test_paged(ctypes.byref(a))
    message = ctypes.create_string_buffer(256)
    code = lib.icc_test_error(message, 255)
    return out, code, message.value.decode()


CASES = {
    "decode_gqa_rows": Paged((0, 5, 37, 16), 1, 8, 2, 64),
    "decode_mqa_f16_pad": Paged((3, 40, 17), 1, 6, 1, 80, pool="f16", mask="pad"),
    "decode_split_long": Paged((600, 130), 1, 4, 2, 64, block=32),
    "decode_split_f16_min": Paged((700, 3, 300), 1, 4, 1, 32, pool="f16", mask="pad", mask_value=F32_MIN),
    "chunks_causal_rows": Paged((0, 9, 33), 7, 4, 2, 16, block=5),
    "prefill_rows_big_blocks": Paged((0, 70), 40, 4, 4, 16, block=128),
    "window_gqa": Paged((2, 19, 40), 3, 8, 2, 16, left_window=6, block=4),
    "softcap_rows": Paged((5, 64, 1), 2, 4, 4, 64, softcap=5.0),
    "float_rows_mask": Paged((10, 70), 7, 8, 2, 64, mask="rows"),
    "full_mask_window_f16": Paged((5, 12), 6, 8, 2, 16, causal=0, left_window=4, mask="full", pool="f16"),
    "dv_differs_noncausal": Paged((30, 200), 4, 8, 2, 64, Dv=16, causal=0),
    "odd_sizes_block_one": Paged((9, 2), 3, 6, 3, 24, Dv=12, mask="pad", block=1),
    "wide_group": Paged((100, 300), 2, 40, 1, 8, left_window=100, block=16),
}


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ctypes.CDLL]:
    folder = tmp_path_factory.mktemp("paged_kernel")
    found = {}
    for march in MARCHES:
        if march == "haswell" and not cpu_has("avx2", "fma", "f16c"):
            continue
        lib = build(folder, "paged_attention.h", EXPORTS, march)
        lib.icc_test_threads(2)
        found[march] = lib
    return found


def _row_case(case: Paged, p: int) -> Case:
    """One row of a paged case as a cached Attention case (batch 1, past p)."""
    return Case(1, case.S, p, case.H, case.Hkv, case.D, case.dv, case.causal, case.left_window, case.softcap, None,
                case.mask_value, "f16" if case.pool == "f16" else "f32")


@pytest.mark.parametrize("name", ["decode_mqa_f16_pad", "chunks_causal_rows", "window_gqa", "float_rows_mask",
                                  "full_mask_window_f16", "dv_differs_noncausal"])
def test_reference_is_the_cached_attention_row_by_row(name: str) -> None:
    """Each row of the paged definition = a cached Attention (ONNX decomposition, onnxruntime) with
    that row's past gathered from its blocks and the mask's last past + S columns; the pools get
    the row's new keys and values, rounded to the pool's type, at the row's slots."""
    case = CASES[name]
    x = make(case, seed=1)
    before = copy(x)
    out = reference(**{k: x[k] for k in ("q", "k", "v", "mask", "key_pool", "value_pool", "block_tables",
                                          "past_lens")}, spec=case.spec())
    bs, S = case.block, case.S
    for b, p in enumerate(case.pasts):
        pos = np.arange(p + S)
        blocks, slots = x["block_tables"][b, pos // bs], pos % bs
        mask = None
        if x["mask"] is not None:
            full = np.broadcast_to(x["mask"], (len(case.pasts),) + x["mask"].shape[1:])
            mask = np.ascontiguousarray(full[b:b + 1, ..., full.shape[-1] - p - S:])
        row = {"q": x["q"][b:b + 1], "k": x["k"][b:b + 1], "v": x["v"][b:b + 1], "mask": mask,
               "past_k": before["key_pool"][blocks[:p], :, slots[:p]].transpose(1, 0, 2)[None],
               "past_v": before["value_pool"][blocks[:p], :, slots[:p]].transpose(1, 0, 2)[None]}
        y, present_k, present_v = decomposition(_row_case(case, p), row)
        np.testing.assert_allclose(out[b:b + 1], y, atol=TOL, rtol=TOL)
        assert np.array_equal(x["key_pool"][blocks, :, slots].transpose(1, 0, 2)[None].view(np.uint8),
                              present_k.view(np.uint8))
        assert np.array_equal(x["value_pool"][blocks, :, slots].transpose(1, 0, 2)[None].view(np.uint8),
                              present_v.view(np.uint8))


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.pool == "f16"))
def test_a_float16_pool_read_in_place_equals_its_converted_tiles(libs: dict, tmp_path_factory, name: str) -> None:
    """With F16C the kernel reads float16 blocks where they lie; built without F16C it converts each
    tile into a float buffer first: the same outputs bit for bit (attention.h's test, paged)."""
    if "haswell" not in libs:
        pytest.skip("this CPU cannot run -march=haswell code")
    plain = build(tmp_path_factory.mktemp("paged_no_f16c"), "paged_attention.h", EXPORTS, "haswell -mno-f16c")
    plain.icc_test_threads(2)
    case = CASES[name]
    x, y = make(case, seed=5), make(case, seed=5)
    (got, code, _), (want, code2, _) = run_kernel(libs["haswell"], case, x), run_kernel(plain, case, y)
    assert code == code2 == 0
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(libs: dict, march: str, name: str) -> None:
    if march not in libs:
        pytest.skip(f"this CPU cannot run -march={march} code")
    case = CASES[name]
    x = make(case, seed=len(name))
    want_x = copy(x)
    want = reference(**{k: want_x[k] for k in ("q", "k", "v", "mask", "key_pool", "value_pool", "block_tables",
                                               "past_lens")}, spec=case.spec())
    got, code, message = run_kernel(libs[march], case, x)
    assert code == 0, message
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    for pool in ("key_pool", "value_pool"):  # the same bytes everywhere: new slots rounded alike, NaN slots kept
        assert np.array_equal(x[pool].view(np.uint16 if case.pool == "f16" else np.uint32),
                              want_x[pool].view(np.uint16 if case.pool == "f16" else np.uint32))


@pytest.mark.parametrize("march", ["native", "x86-64"])
def test_bad_tables_fail_before_writing(libs: dict, march: str) -> None:
    """A block id outside the pool, a table too short for past + S, a negative past or a mask
    shorter than a row's keys fail the call with a message, and the pools keep every byte."""
    case = Paged((4, 20), 2, 4, 2, 16, block=8, mask="pad")
    broken = {
        "outside the pool": lambda x: x["block_tables"].__setitem__((1, 0), x["key_pool"].shape[0]),
        "negative block": lambda x: x["block_tables"].__setitem__((0, 0), -1),
        "shorter than its past": lambda x: x.__setitem__("block_tables", np.ascontiguousarray(x["block_tables"][:, :2])),
        "negative length": lambda x: x["past_lens"].__setitem__(0, -3),
        "mask is shorter": lambda x: x.__setitem__("mask", np.ascontiguousarray(x["mask"][..., :21])),
    }
    expected = {"outside the pool": "outside the pool", "negative block": "outside the pool",
                "shorter than its past": "block table is shorter", "negative length": "negative length",
                "mask is shorter": "mask is shorter"}
    for what, damage in broken.items():
        x = make(case, seed=5)
        damage(x)
        pools = [x["key_pool"].copy(), x["value_pool"].copy()]
        _, code, message = run_kernel(libs[march], case, x)
        assert code and expected[what] in message, (what, message)
        for have, kept in zip((x["key_pool"], x["value_pool"]), pools):
            assert have.tobytes() == kept.tobytes(), what


#: A tree of candidates over a row's new tokens (runtime/tree_attention.py): parents in the row.
TREE = [-1, 0, 0, 0, 1, 1, 3, 6]
TREE_CASES = {
    "gqa_fp32_min": Paged((41, 7), 8, 9, 3, 64, mask_value=F32_MIN, tree=True),
    "f16_split_long": Paged((300, 20), 8, 4, 1, 16, pool="f16", block=8, tree=True),
}


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("name", sorted(TREE_CASES))
def test_tree_rows_are_their_chains_bit_for_bit(libs: dict, march: str, name: str) -> None:
    """With the tree flag each query row attends over its ancestors' keys as if they were
    contiguous: a node's output is, bit for bit, the output of a chain of its path run alone
    (greedy speculation with trees must give plain greedy tokens), and it means what the
    reference with the tree mask means."""
    from infercc.runtime.tree_attention import tree_feeds

    if march not in libs:
        pytest.skip(f"this CPU cannot run -march={march} code")
    case = TREE_CASES[name]
    x = make(case, seed=3)
    pasts = np.asarray(case.pasts)
    x["mask"] = tree_feeds([TREE] * len(pasts), pasts, int(pasts.max()), False)["kv_tree_mask"]
    before, want_x = copy(x), copy(x)
    got, code, message = run_kernel(libs[march], case, x)
    assert code == 0, message
    want = reference(**{k: want_x[k] for k in ("q", "k", "v", "mask", "key_pool", "value_pool", "block_tables",
                                               "past_lens")}, spec=case.spec())
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
    for b, p in enumerate(case.pasts):
        for i in range(len(TREE)):
            path = [i]
            while TREE[path[0]] >= 0:
                path.insert(0, TREE[path[0]])
            chain = dataclasses.replace(case, pasts=(p,), S=len(path), tree=False)
            y = {**copy(before), "mask": None, "past_lens": np.asarray([p], np.int32),
                 "block_tables": np.ascontiguousarray(before["block_tables"][b:b + 1])}
            for k in ("q", "k", "v"):
                y[k] = np.ascontiguousarray(before[k][b:b + 1, path])
            alone, code, message = run_kernel(libs[march], chain, y)
            assert code == 0, message
            assert np.array_equal(got[b, i], alone[0, -1]), (b, i, np.abs(got[b, i] - alone[0, -1]).max())
