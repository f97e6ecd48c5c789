"""Weight-only quantization (int8 per channel, int4 blockwise) into canonical quantized ops that
lower to ONNX Runtime's MatMulNBits / GatherBlockQuantized or to standard ONNX.

Modules: ``weight_only`` (the pass: sites, graph rewrite), ``plan`` (what each weight becomes),
``methods`` (data-free RTN / mse), ``gptq`` and ``calibrate`` (activation-aware, on inputs the
model generates), ``native`` (already-quantized grids kept exactly), ``pack`` / ``ops`` (the
MatMulNBits layout and lowerings), ``report``."""

from .gptq import gptq_rows
from .methods import METHODS, Quantized, quantize_rows, relative_error
from .ops import GATHER, MATMUL
from .weight_only import QuantizeWeights

__all__ = ["GATHER", "MATMUL", "METHODS", "QuantizeWeights", "Quantized", "gptq_rows", "quantize_rows", "relative_error"]
