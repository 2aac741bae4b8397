"""FP8 for DeepSeek-V3 (arXiv 2412.19437, Sec. 3.3): E4M3 tile/block formats, Triton kernels, FP8 linear layers and
the ``fp8_block`` quantizer plugin (registered on import). The numerics: docs/equations.md, FP8.

The Triton kernels live in ``.kernels`` and are imported lazily (only where a CUDA GPU runs them), so this
package imports without triton.
"""

from . import formats
from .experts import FP8Experts
from .linear import FP8Linear, FP8TrainingLinear, set_check_finite
from .quantizer import FP8BlockQuantizer, dequantize_state_dict, is_fp8_eligible, quantize_state_dict

# What users call: the quantizer plugin, the FP8 layers, offline state-dict (de)quantization and the inf/nan check
# policy. Everything else lives in its module: the tile/block formats and their references in `formats`, the
# grouped expert GEMMs in `linear` (`fp8_grouped_linear_trainable` over high-precision master weights, for training;
# `fp8_grouped_linear_frozen` over weights stored in FP8), the Triton kernels in `kernels`.
__all__ = [
    "FP8BlockQuantizer",
    "FP8Experts",
    "FP8Linear",
    "FP8TrainingLinear",
    "dequantize_state_dict",
    "formats",
    "is_fp8_eligible",
    "quantize_state_dict",
    "set_check_finite",
]
