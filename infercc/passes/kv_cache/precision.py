"""KV-cache precision: the type the cache is stored in, and its cost in memory.

* ``fp32`` / ``fp16``: the cache holds floats of that type. A type other than the model's is
  carried by the canonical Attention itself (its past/present may be stored in another float type,
  see ``fusion/attention_op.py``); kernels that compute in one type get casts around them.
* ``int8``: symmetric, one float32 scale per token and head (``x ≈ q * scale``, ``scale =
  max|x| / 127`` over the head's channels). Per token because a cache only grows: each step
  quantizes its own rows and never revisits older ones, and no calibration is needed. The scales
  travel as extra inputs/outputs ``past_key_values.{i}.key_scale`` / ``present.{i}.key_scale``
  (and ``value_scale``) [batch, kv_heads, length, 1]; the graph dequantizes the past before
  attention (no ORT CPU kernel takes a per-token int8 cache: GroupQueryAttention's int8 cache uses
  static per-tensor/per-channel scales that need calibration) and quantizes the new rows after.
* ``auto``: the model's own float type, float32 for a float32 model. ONNX Runtime's CPU attention
  computes in the model's type, so a float16 cache costs a cast of the past in and of the present
  out every step; measured on the benchmark LLaMA (CPU, 2 threads, prompt 128 + 128 tokens,
  interleaved runs) a float16 or int8 cache decodes no faster, often slower, than float32 (tok/s
  fp32/fp16/int8: 85/80/83 on a quiet machine, 39/33/36 and 50/43/32 on a loaded one), so on
  CPU the smaller types buy memory, not speed, and auto keeps float32. A float16 model keeps
  float16.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...ir import DType, Value
from ..rewrite import Builder

KV_DTYPES = ("auto", "fp32", "fp16", "int8")
_STORAGE = {"fp32": DType.FLOAT, "fp16": DType.FLOAT16, "int8": DType.INT8}
#: Smallest scale: a row of zeros quantizes to zeros instead of dividing by zero.
_TINY = np.float32(1e-30)


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """The resolved cache type: ``name`` (fp32/fp16/int8), its element type, and why."""

    name: str
    storage: DType
    reason: str

    @property
    def scaled(self) -> bool:
        return self.name == "int8"

    def bytes_per_token(self, layers: list[tuple[int, int, int]]) -> int:
        """Cache bytes one token takes, all layers, keys and values; ``layers`` holds each layer's
        (kv_heads, head_size, v_head_size). int8 adds its float32 scales (one per head)."""
        item = int(np.dtype(self.storage.numpy).itemsize)
        total = 0
        for heads, k_size, v_size in layers:
            total += heads * (k_size + v_size) * item
            if self.scaled:
                total += 2 * heads * 4
        return total


def resolve(requested: str, model_dtype: DType | None) -> KVFormat:
    """The cache type for ``Config.kv_cache_dtype`` and a model computing in ``model_dtype``.

    "auto" stays float32 for float32 models on the generated-C runtime too, although its attention
    reads a float16 cache natively: measured, SmolLM2-135M's greedy text with a float16 cache leaves
    the float32 cache's after ~6 tokens (a near tie; stories260K and the fixtures agree), and the
    C runtime's greedy output must equal ONNX Runtime's. Speed does not decide it either: since the
    attention reads the float16 cache in place (each vector converted as it loads), SmolLM2 on two
    AVX2 cores decodes after a 1,024-token prompt at 104.5-113.9 tok/s with float16 against
    92.3-97.5 with float32 (+7-23%), and after 128 tokens within noise (144-146 vs 154-155 in one
    run, 121 vs 117 and 106 vs 85 in another); its greedy tokens leave float32's after 12.
    ``kv_cache_dtype="fp16"`` asks for it: half the memory, faster at long contexts."""
    model_dtype = model_dtype or DType.FLOAT
    if requested != "auto":
        return KVFormat(requested, _STORAGE[requested], f"kv_cache_dtype={requested!r}")
    if model_dtype == DType.FLOAT16:
        return KVFormat("fp16", DType.FLOAT16, "auto: the model computes in float16")
    if model_dtype == DType.FLOAT:
        return KVFormat("fp32", DType.FLOAT, "auto: the model computes in float32, and a float32 cache gives the same "
                        "greedy text on every runtime; kv_cache_dtype='fp16' halves the cache (ONNX Runtime's CPU "
                        "kernels add casts for it, the generated C reads it in place and decodes faster at long "
                        "contexts; see passes/kv_cache/precision.py)")
    return KVFormat("fp32", DType.FLOAT, f"auto: no float16 cache kernel is assumed for {model_dtype} models")


def storage_for(fmt: KVFormat, model_dtype: DType | None) -> DType:
    """The element type of the past/present inputs and outputs."""
    if fmt.name == "fp32" and model_dtype not in (None, DType.FLOAT):
        return DType.FLOAT
    return fmt.storage


# -- int8 -----------------------------------------------------------------------------------------
def dequantize(op: Builder, codes: Value, scale: Value, dtype: DType) -> Value:
    """int8 codes [B, H, P, D] and scales [B, H, P, 1] -> floats of ``dtype``."""
    values = op.Mul(op.Cast(codes, to=int(DType.FLOAT)), scale)
    return values if dtype == DType.FLOAT else op.Cast(values, to=int(dtype))


def quantize(op: Builder, x: Value, opset: int) -> tuple[Value, Value]:
    """Rows of x [B, H, S, D] -> (int8 codes, float32 scales [B, H, S, 1]), symmetric per row."""
    x32 = x if x.dtype == DType.FLOAT else op.Cast(x, to=int(DType.FLOAT))
    magnitude = op.Abs(x32)
    if opset >= 18:
        peak = op.ReduceMax(magnitude, op.const(np.asarray([-1], np.int64), hint="axes"), keepdims=1)
    else:
        peak = op.ReduceMax(magnitude, axes=[-1], keepdims=1)
    scale = op.Max(op.Div(peak, op.const(np.float32(127.0), hint="levels")), op.const(_TINY, hint="tiny"))
    rounded = op.Round(op.Div(x32, scale))
    clipped = op.Clip(rounded, op.const(np.float32(-127.0), hint="lo"), op.const(np.float32(127.0), hint="hi"))
    return op.Cast(clipped, to=int(DType.INT8)), scale
