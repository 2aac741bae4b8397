"""The MoE weight-gradient GEMM in Triton: ``dW_e = dY_eᵀ X_e`` for every expert in one launch.

* ``act_quant_128x1_t_grouped_kernel`` -> ``formats.quantize_act_128x1_transposed_grouped``: 128×1 tiles that
  restart at every expert segment, quantization fused with the transpose, bit for bit.
* ``fp8_grouped_wgrad_kernel`` -> ``formats.fp8_grouped_wgrad_reference``: one program per (output tile,
  expert); it walks its expert's 128-token blocks, both scales applied per block, fp32 accumulation.

The segment bounds ``m_offsets`` and the first scale column of each segment (``formats.group_tile_offsets``)
are read inside the kernels, so the launches need no host synchronization and no per-expert Python loop:
grid sizes depend only on T, E and the channel counts.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .. import formats
from ..formats import BLOCK
from .quant import _amax, _quantize, _scale_from_amax


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------


@triton.jit
def act_quant_128x1_t_grouped_kernel(
    x_ptr, q_ptr, s_ptr, offsets_ptr, tile_offsets_ptr,
    C, NUM_EXPERTS,
    stride_xm, stride_xc, stride_qc, stride_sc,
    SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, POWER_OF_TWO: tl.constexpr,
):
    """Program (t, c): scale column t (the t-th 128-token tile over all segments) × BLOCK_C channels."""
    t = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    # Which segment owns tile t: the largest e in [0, E] with tile_offsets[e] <= t, by binary search
    # (ceil(log2(E+1)) scalar loads instead of a walk over all experts). An empty expert shares its
    # offset with the next one, so the search never lands on it; e == E means t is past the last tile.
    lo = t * 0
    hi = lo + NUM_EXPERTS + 1
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(tile_offsets_ptr + mid) <= t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    if lo < NUM_EXPERTS:
        first = tl.load(offsets_ptr + lo) + (t - tl.load(tile_offsets_ptr + lo)) * BLOCK_M
        seg_end = tl.load(offsets_ptr + lo + 1)
        rm = first + tl.arange(0, BLOCK_M)
        # tokens of the next segment load as 0: the per-segment zero padding of the reference
        mask = (rm < seg_end)[:, None] & (rc < C)[None, :]
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rc[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        scale = _scale_from_amax(_amax(x, 0), POWER_OF_TWO)  # one per channel over this segment's 128 tokens
        q = _quantize(x, scale[None, :])
        # transpose fused into the store: token m of channel c goes to q[c, m], segments stay in place
        tl.store(q_ptr + rc.to(tl.int64)[None, :] * stride_qc + rm[:, None], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rc * stride_sc + t, scale, mask=rc < C)
    else:
        # the scale tensor is sized by a bound; its unused tail is defined as 1.0 (no memset launch needed)
        tl.store(s_ptr + rc * stride_sc + t, tl.full((BLOCK_C,), 1.0, tl.float32), mask=rc < C)


@triton.jit
def fp8_grouped_wgrad_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offsets_ptr, tile_offsets_ptr,
    N, K, NUM_EXPERTS, T_BUCKET,  # NUM_EXPERTS, T_BUCKET: only autotuning keys
    stride_an, stride_bk, stride_ce, stride_cn, stride_asn, stride_bsk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_N: tl.constexpr,
):
    """Program (i, e): output tile i of ``dW_e [N, K]``; ``a = dYᵀ [N, T]``, ``b = Xᵀ [K, T]`` (fp8, tokens contiguous).

    The expert is the slow grid axis, so the tiles of one expert run side by side and share its dY/X
    segments in L2; within an expert the tiles go in grouped order (GROUP_N row tiles per column sweep).
    The work of a program is proportional to its expert's token count; an empty expert stores zeros.
    """
    e = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    tiles_per_group = GROUP_N * num_pid_k
    first_n = (tl.program_id(0) // tiles_per_group) * GROUP_N
    group_rows = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (tl.program_id(0) % tiles_per_group) % group_rows
    pid_k = (tl.program_id(0) % tiles_per_group) // group_rows

    seg_start = tl.load(offsets_ptr + e)
    seg_end = tl.load(offsets_ptr + e + 1)
    tile0 = tl.load(tile_offsets_ptr + e)  # scale column of the segment's first 128-token block
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rn.to(tl.int64)[:, None] * stride_an
    b_rows = b_ptr + rk.to(tl.int64)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for j in range(tl.cdiv(seg_end - seg_start, BLOCK_T)):
        # one 128-token block of this segment = one scale column; tokens of the next expert are masked to 0
        rt = seg_start + j * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = rt < seg_end
        a = tl.load(a_rows + rt[None, :], mask=(rn < N)[:, None] & t_ok[None, :], other=0.0)
        b = tl.load(b_rows + rt[None, :], mask=(rk < K)[:, None] & t_ok[None, :], other=0.0)
        sa = tl.load(as_ptr + rn * stride_asn + tile0 + j, mask=rn < N, other=0.0)
        sb = tl.load(bs_ptr + rk * stride_bsk + tile0 + j, mask=rk < K, other=0.0)
        # FP8 tensor-core product over the block, promoted to the fp32 accumulator with both 128×1 scales
        acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
    c_mask = (rn < N)[:, None] & (rk < K)[None, :]
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + rn[:, None] * stride_cn + rk[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------
# configurations: autotuned on a GPU, one fixed small config under the interpreter
# ---------------------------------------------------------------------------------------------------

_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_N": 8}, num_stages=s, num_warps=w)
    for bn, bk, s, w in [(128, 128, 4, 8), (128, 256, 3, 8), (256, 128, 3, 8), (64, 128, 4, 4), (128, 64, 4, 4)]
]
_INTERPRETER_WGRAD = {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_N": 2}
_QUANT_CHANNELS_PER_PROGRAM = 32  # as act_quant_128x1_transposed: 128 tokens × 32 channels per program


@functools.lru_cache(maxsize=None)
def _tuned_wgrad():
    # keyed on a power-of-two bucket of T: the token split changes every step, the shapes do not
    return triton.autotune(configs=_WGRAD_CONFIGS, key=["N", "K", "NUM_EXPERTS", "T_BUCKET"])(fp8_grouped_wgrad_kernel)


def _t_bucket(t: int) -> int:
    return min(max(triton.next_power_of_2(t), 128), 1 << 20)


def _device_offsets(m_offsets: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = m_offsets.to(device=device, dtype=torch.int32)
    return offsets, formats.group_tile_offsets(offsets)


# ---------------------------------------------------------------------------------------------------
# launchers (same signatures and checks as the references)
# ---------------------------------------------------------------------------------------------------


def act_quant_128x1_transposed_grouped(x: torch.Tensor, m_offsets: torch.Tensor, power_of_two: bool = False,
                                       name: str = "x", check_finite: bool = True):
    """Triton version of ``formats.quantize_act_128x1_transposed_grouped``: ``x [T, C]`` -> ``(q [C, T], s [C, tiles])``."""
    formats.check_high_precision(x, name)
    num_experts = m_offsets.numel() - 1
    formats.check_group_offsets(m_offsets, num_experts, x.shape[0])
    t, c = x.shape
    offsets, tile_offsets = _device_offsets(m_offsets, x.device)
    q = torch.empty(c, t, dtype=formats.FP8_DTYPE, device=x.device)
    s = torch.empty(c, formats.grouped_token_tiles(t, num_experts), dtype=torch.float32, device=x.device)
    grid = (s.shape[1], triton.cdiv(c, _QUANT_CHANNELS_PER_PROGRAM))
    act_quant_128x1_t_grouped_kernel[grid](
        x, q, s, offsets, tile_offsets, c, num_experts, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
        SEARCH_STEPS=max(1, math.ceil(math.log2(num_experts + 1))), BLOCK_M=BLOCK,
        BLOCK_C=_QUANT_CHANNELS_PER_PROGRAM, POWER_OF_TWO=power_of_two,
    )
    if check_finite:  # one host read, as in the other quantization launchers (off with set_check_finite(False))
        formats.check_scales_finite(s, name)
    return q, s


def fp8_grouped_wgrad(a_t, a_scale, b_t, b_scale, m_offsets, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton version of ``formats.fp8_grouped_wgrad_reference``: ``[N, T] x [K, T] -> [E, N, K]``, one launch.

    ``m_offsets`` (E+1 entries, on the device) is never read on the host."""
    formats.check_grouped_wgrad_operands(a_t, a_scale, b_t, b_scale, m_offsets)
    if a_t.stride(1) != 1 or b_t.stride(1) != 1 or a_scale.stride(1) != 1 or b_scale.stride(1) != 1:
        raise ValueError("grouped Wgrad expects operands and scales contiguous along the token dimension.")
    num_experts = m_offsets.numel() - 1
    (n, t), k = a_t.shape, b_t.shape[0]
    offsets, tile_offsets = _device_offsets(m_offsets, a_t.device)
    c = torch.empty(num_experts, n, k, dtype=out_dtype, device=a_t.device)
    args = (a_t, b_t, c, a_scale, b_scale, offsets, tile_offsets, n, k, num_experts, _t_bucket(t),
            a_t.stride(0), b_t.stride(0), c.stride(0), c.stride(1), a_scale.stride(0), b_scale.stride(0))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), num_experts)

    if _interpreting():
        fp8_grouped_wgrad_kernel[grid(_INTERPRETER_WGRAD)](*args, BLOCK_T=BLOCK, **_INTERPRETER_WGRAD)
        return c
    _tuned_wgrad()[grid](*args, BLOCK_T=BLOCK)
    return c
