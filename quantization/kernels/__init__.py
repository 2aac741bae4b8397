"""Triton FP8 kernels; each has its PyTorch reference in ``..formats``. Importing this module imports triton."""

from .gemm import fp8_gemm, fp8_grouped_gemm
from .grouped_wgrad import act_quant_128x1_transposed_grouped, fp8_grouped_wgrad
from .quant import act_quant_1x128, act_quant_128x1_transposed, weight_quant_128x128

__all__ = ["act_quant_1x128", "act_quant_128x1_transposed", "act_quant_128x1_transposed_grouped", "weight_quant_128x128",
           "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_wgrad"]
