"""Which fused operators each ONNX Runtime execution provider has kernels for, and the context a
lowering reads to decide between a fused op and a decomposition.

Lowerings consult this table instead of assuming: a contrib op with no kernel for the provider and
element type makes session creation fail (or silently fall back to CPU with copies on CUDA), so a
lowering that is not backed here decomposes to standard ONNX and says why in the diagnostics.

Sources: CPU entries are what ``tests/passes/fusion/test_lowering.py`` runs on ORT's CPU provider
(one-node models per op and type; a few, such as float16 FastGelu, run through ORT's expansion of
the op's function body rather than a dedicated kernel); CUDA entries follow ORT's kernel
registrations (``contrib_ops/cuda/cuda_contrib_kernels.cc``, ``contrib_ops/cuda/math/bias_gelu.cc``),
not run here (no GPU in CI). Note that ORT registers
``SimplifiedLayerNormalization`` (and the pre-opset-17 ``LayerNormalization``) in the default ONNX
domain, not ``com.microsoft``: they are ORT-only ops despite the domain.
"""

from __future__ import annotations

import dataclasses

from ..ir import DType

MS = "com.microsoft"
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_F32, _F16, _BF16, _F64 = DType.FLOAT, DType.FLOAT16, DType.BFLOAT16, DType.DOUBLE


def _types(*dtypes: DType) -> frozenset[DType]:
    return frozenset(dtypes)


#: (domain, op_type) -> provider -> element types of the main input that have a kernel.
KERNELS: dict[tuple[str, str], dict[str, frozenset[DType]]] = {
    ("", "LayerNormalization"): {CPU: _types(_F32, _F64, _F16), CUDA: _types(_F32, _F64, _F16, _BF16)},
    ("", "SimplifiedLayerNormalization"): {CPU: _types(_F32, _F64, _F16), CUDA: _types(_F32, _F64, _F16, _BF16)},
    (MS, "SkipLayerNormalization"): {CPU: _types(_F32, _F16), CUDA: _types(_F32, _F16, _BF16)},
    (MS, "SkipSimplifiedLayerNormalization"): {CPU: _types(_F32, _F16), CUDA: _types(_F32, _F16, _BF16)},
    (MS, "Gelu"): {CPU: _types(_F32, _F16), CUDA: _types(_F32, _F64, _F16, _BF16)},
    (MS, "BiasGelu"): {CPU: _types(_F32, _F16), CUDA: _types(_F32, _F64, _F16, _BF16)},
    (MS, "FastGelu"): {CPU: _types(_F32, _F64, _F16), CUDA: _types(_F32, _F64, _F16, _BF16)},
    (MS, "QuickGelu"): {CPU: _types(_F32, _F64, _F16), CUDA: _types(_F32, _F64, _F16, _BF16)},
}

#: Standard ops and the opset that introduced the form a lowering emits.
STANDARD_SINCE: dict[str, int] = {
    "LayerNormalization": 17, "Gelu": 20, "RMSNormalization": 23, "Swish": 24,
}


def kernel_types(domain: str, op_type: str, provider: str) -> frozenset[DType]:
    return KERNELS.get((domain, op_type), {}).get(provider, frozenset())


def resolve_providers(requested: str) -> list[str]:
    """The providers a compiled model will run on, most preferred first. Unlike
    ``runtime.providers.choose_providers`` this never raises: compiling for CUDA on a machine without
    it is allowed (the artifact may run elsewhere)."""
    if requested == "cuda":
        return [CUDA, CPU]
    if requested == "cpu":
        return [CPU]
    from ..runtime.providers import choose_providers

    return choose_providers("auto")[0]


@dataclasses.dataclass(frozen=True)
class LoweringContext:
    """What a lowering may depend on besides the node: the target ("ort" or "onnx"), the model's
    default-domain opset, and the execution providers (for "ort")."""

    target: str = "ort"
    opset: int = 20
    providers: tuple[str, ...] = (CPU,)
    #: The model's maximum positions when its metadata says (sizes the rotary tables kernels read).
    context_length: int | None = None

    @property
    def provider(self) -> str:
        return self.providers[0]

    def unsupported(self, domain: str, op_type: str, dtype: DType | None) -> str | None:
        """None when the primary provider has a kernel for ``op_type`` at ``dtype``, else why not."""
        name = f"{domain}::{op_type}" if domain else op_type
        if dtype is None:
            return f"the input type is unknown, so no {name} kernel can be chosen"
        if (domain, op_type) not in KERNELS:
            return f"{name} is not in the provider capability table"
        if dtype not in kernel_types(domain, op_type, self.provider):
            short = self.provider.replace("ExecutionProvider", "")
            return f"ONNX Runtime's {short} provider has no {name} kernel for {dtype}"
        return None

    def needs_opset(self, op_type: str) -> str | None:
        """None when the model's opset has the standard ``op_type``, else why not."""
        since = STANDARD_SINCE[op_type]
        if self.opset < since:
            return f"standard {op_type} needs opset {since}; the model imports opset {self.opset}"
        return None


def context_of(builder: object) -> LoweringContext:
    """The context a lowering was called with; a default one (ORT on CPU, opset 20) for callers
    that build outside the lowering pass, such as tests."""
    found = getattr(builder, "__dict__", {}).get("lowering")
    return found if isinstance(found, LoweringContext) else LoweringContext()
