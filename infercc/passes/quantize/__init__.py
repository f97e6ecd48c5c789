"""Weight-only quantization (int8 per channel, int4 blockwise) into canonical quantized ops that
lower to ONNX Runtime's MatMulNBits / GatherBlockQuantized or to standard ONNX."""

from .methods import METHODS, Quantized, quantize_rows, relative_error
from .ops import GATHER, MATMUL
from .weight_only import QuantizeWeights

__all__ = ["GATHER", "MATMUL", "METHODS", "QuantizeWeights", "Quantized", "quantize_rows", "relative_error"]
