"""Triton kernels that quantize to FP8 E4M3 with the paper's tilings.

Each kernel reproduces, bit for bit, the function of ``..formats`` named in its docstring:

* ``act_quant_1x128_kernel``      -> ``formats.quantize_act_1x128``
* ``act_quant_128x1_t_kernel``    -> ``formats.quantize_act_128x1_transposed`` (quantize fused with the transpose)
* ``weight_quant_128x128_kernel`` -> ``formats.quantize_weight_128x128``

Bit-exactness needs two details. The division ``x / scale`` uses ``div_rn`` (IEEE, like torch) rather
than the approximate fp32 division Triton emits by default. And the value is rounded to the E4M3 grid
in fp32 arithmetic (``_round_to_e4m3``) before the cast, so the cast itself is exact: the hardware
conversion would round the same way, but Triton's CPU interpreter rounds fp32 -> fp8 incorrectly
(no carry into the exponent, 127.9 -> 64), and this keeps one code path that is tested on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import formats
from ..formats import BLOCK, ceil_div


# ---------------------------------------------------------------------------------------------------
# tile helpers
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest E4M3 value, ties to even; returns fp32."""
    bits = y.to(tl.int32, bitcast=True)
    sign = bits & -2147483648
    mag = bits & 0x7FFFFFFF
    # normal range (|y| >= 2^-6): keep 3 of the 23 mantissa bits, round-to-nearest-even on the bits;
    # a carry out of the mantissa correctly bumps the exponent.
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576
    # subnormal range: a fixed step of 2^-9; 1.5 * 2^23 is the classic fp32 round-to-integer constant.
    a = tl.abs(y)
    sub = (((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125).to(tl.int32, bitcast=True)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _amax(x, axis: tl.constexpr):
    # nan counts as inf: tl.max may drop nan, and a non-finite tile must end with a non-finite scale.
    return tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=axis)


@triton.jit
def _scale_from_amax(amax, POWER_OF_TWO: tl.constexpr):
    """``max(amax, AMAX_FLOOR) / 448`` (optionally rounded up to a power of two), see formats.scale_from_amax."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if POWER_OF_TWO:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _quantize(x, scale):
    y = tl.math.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return _round_to_e4m3(y)


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def act_quant_1x128_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_sm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, POWER_OF_TWO: tl.constexpr,
):
    """One program: BLOCK_M rows × one 128-column tile; each row of it gets its own scale (1×128)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    # overhanging columns load as 0: the zero padding of the reference
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(_amax(x, 1), POWER_OF_TWO)  # [BLOCK_M]
    q = _quantize(x, scale[:, None])
    tl.store(q_ptr + rm[:, None] * stride_qm + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rm * stride_sm + tl.program_id(1), scale, mask=rm < M)


@triton.jit
def act_quant_128x1_t_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qk, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, POWER_OF_TWO: tl.constexpr,
):
    """One program: a 128-token × BLOCK_K-channel tile of x [M, K]; each channel gets a scale over the
    128 tokens (128×1), and the tile is written transposed into q [K, M], scales into s [K, ceil(M/128)]."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(_amax(x, 0), POWER_OF_TWO)  # [BLOCK_K], one per channel
    q = _quantize(x, scale[None, :])
    # the transpose is fused into the store: element (m, k) goes to q[k, m]
    tl.store(q_ptr + rk[None, :] * stride_qk + rm[:, None], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rk * stride_sk + tl.program_id(0), scale, mask=rk < K)


@triton.jit
def weight_quant_128x128_kernel(
    w_ptr, q_ptr, s_ptr,
    N, K,
    stride_wn, stride_wk, stride_qn, stride_sn,
    BLOCK: tl.constexpr, POWER_OF_TWO: tl.constexpr,
):
    """One program: one 128×128 weight block, one scale (the checkpoint's weight_scale_inv entry)."""
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
    scale = _scale_from_amax(tl.max(_amax(w, 1), axis=0), POWER_OF_TWO)
    q = _quantize(w, scale)
    tl.store(q_ptr + rn[:, None] * stride_qn + rk[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + tl.program_id(0) * stride_sn + tl.program_id(1), scale)


# ---------------------------------------------------------------------------------------------------
# launchers (same signatures and checks as the references)
# ---------------------------------------------------------------------------------------------------

_ROWS_PER_PROGRAM = 32  # memory-bound kernels: 32×128 elements per program keeps enough loads in flight


def act_quant_1x128(x: torch.Tensor, power_of_two: bool = False, name: str = "x", check_finite: bool = True):
    """Triton version of ``formats.quantize_act_1x128``."""
    formats.check_high_precision(x, name)
    m, k = x.shape
    q = torch.empty(m, k, dtype=formats.FP8_DTYPE, device=x.device)
    s = torch.empty(m, ceil_div(k, BLOCK), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, _ROWS_PER_PROGRAM), ceil_div(k, BLOCK))
    act_quant_1x128_kernel[grid](
        x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
        BLOCK_M=_ROWS_PER_PROGRAM, BLOCK_K=BLOCK, POWER_OF_TWO=power_of_two,
    )
    if check_finite:
        formats.check_scales_finite(s, name)
    return q, s


def act_quant_128x1_transposed(x: torch.Tensor, power_of_two: bool = False, name: str = "x", check_finite: bool = True):
    """Triton version of ``formats.quantize_act_128x1_transposed``: ``x [M, K]`` -> ``(q [K, M], s [K, ceil(M/128)])``."""
    formats.check_high_precision(x, name)
    m, k = x.shape
    q = torch.empty(k, m, dtype=formats.FP8_DTYPE, device=x.device)
    s = torch.empty(k, ceil_div(m, BLOCK), dtype=torch.float32, device=x.device)
    grid = (ceil_div(m, BLOCK), triton.cdiv(k, _ROWS_PER_PROGRAM))
    act_quant_128x1_t_kernel[grid](
        x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
        BLOCK_M=BLOCK, BLOCK_K=_ROWS_PER_PROGRAM, POWER_OF_TWO=power_of_two,
    )
    if check_finite:
        formats.check_scales_finite(s, name)
    return q, s


def weight_quant_128x128(w: torch.Tensor, power_of_two: bool = False, name: str = "weight", check_finite: bool = True):
    """Triton version of ``formats.quantize_weight_128x128``."""
    formats.check_high_precision(w, name)
    n, k = w.shape
    q = torch.empty(n, k, dtype=formats.FP8_DTYPE, device=w.device)
    s = torch.empty(ceil_div(n, BLOCK), ceil_div(k, BLOCK), dtype=torch.float32, device=w.device)
    weight_quant_128x128_kernel[s.shape](
        w, q, s, n, k, w.stride(0), w.stride(1), q.stride(0), s.stride(0), BLOCK=BLOCK, POWER_OF_TWO=power_of_two,
    )
    if check_finite:
        formats.check_scales_finite(s, name)
    return q, s
