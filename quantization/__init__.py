"""FP8 for DeepSeek-V3 (arXiv 2412.19437 §3.3): E4M3 tile/block formats, Triton kernels, FP8 linear layers and
the ``fp8_block`` quantizer plugin (registered on import).

The Triton kernels live in ``.kernels`` and are imported lazily (only where a CUDA GPU runs them), so this
package imports without triton.
"""

from . import formats
from .formats import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_act_1x128,
    dequantize_weight_128x128,
    fp8_gemm_reference,
    fp8_grouped_gemm_reference,
    quantize_act_1x128,
    quantize_act_128x1_transposed,
    quantize_weight_128x128,
)
from .linear import (
    FP8GroupedLinearFunction,
    FP8Linear,
    FP8LinearFunction,
    FP8TrainingLinear,
    fp8_grouped_expert_mlp,
    fp8_grouped_linear,
    fp8_grouped_matmul,
    fp8_grouped_mm,
    fp8_matmul,
    set_check_finite,
    stack_expert_weights,
)
from .quantizer import FP8BlockQuantizer, dequantize_state_dict, is_fp8_eligible, quantize_state_dict


__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8BlockQuantizer",
    "FP8GroupedLinearFunction",
    "FP8Linear",
    "FP8LinearFunction",
    "FP8TrainingLinear",
    "dequantize_act_1x128",
    "dequantize_state_dict",
    "dequantize_weight_128x128",
    "formats",
    "fp8_gemm_reference",
    "fp8_grouped_expert_mlp",
    "fp8_grouped_gemm_reference",
    "fp8_grouped_linear",
    "fp8_grouped_matmul",
    "fp8_grouped_mm",
    "fp8_matmul",
    "is_fp8_eligible",
    "quantize_act_1x128",
    "quantize_act_128x1_transposed",
    "quantize_state_dict",
    "quantize_weight_128x128",
    "set_check_finite",
    "stack_expert_weights",
]
