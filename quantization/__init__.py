"""FP8 for DeepSeek-V3 (arXiv 2412.19437, Sec. 3.3): E4M3 tile/block formats, Triton kernels, FP8 linear layers and
the ``fp8_block`` quantizer plugin (registered on import). The numerics: docs/equations.md, FP8.

The Triton kernels live in ``.kernels`` and are imported lazily (only where a CUDA GPU runs them), so this
package imports without triton.
"""

from . import formats
from .experts import FP8Experts
from .formats import BLOCK, FP8_DTYPE, FP8_MAX, dequantize_weight_128x128, quantize_weight_128x128
from .linear import FP8Linear, FP8TrainingLinear, fp8_grouped_linear, fp8_grouped_mm, set_check_finite
from .quantizer import FP8BlockQuantizer, dequantize_state_dict, is_fp8_eligible, quantize_state_dict

# What users call. The tile/block formats, references and kernels are reached through `formats`, `linear` and
# `kernels`: `fp8_grouped_mm` is the differentiable grouped GEMM for training (high-precision [E, N, K] weights),
# `fp8_grouped_linear` the inference one (weights already in FP8 with their scales).
__all__ = [
    "BLOCK",
    "FP8_DTYPE",
    "FP8_MAX",
    "FP8BlockQuantizer",
    "FP8Experts",
    "FP8Linear",
    "FP8TrainingLinear",
    "dequantize_state_dict",
    "dequantize_weight_128x128",
    "formats",
    "fp8_grouped_linear",
    "fp8_grouped_mm",
    "is_fp8_eligible",
    "quantize_state_dict",
    "quantize_weight_128x128",
    "set_check_finite",
]
