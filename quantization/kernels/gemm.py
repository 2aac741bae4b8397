"""Block-scaled FP8 GEMMs in Triton: ``C = A @ B^T`` with fp32 accumulation, both scales applied per
128-wide K block (the paper's "increasing accumulation precision", Sec. 3.3.2).

* ``fp8_gemm_kernel``         -> ``formats.fp8_gemm_reference``: persistent programs walk the output
  tiles in grouped order (L2 reuse); operands through TMA tensor descriptors on Hopper, through masked
  pointers elsewhere (and under ``TRITON_INTERPRET=1``).
* ``fp8_grouped_gemm_kernel`` -> ``formats.fp8_grouped_gemm_reference``: every routed expert in one
  launch; tokens sorted by expert, ``m_offsets[e]:m_offsets[e+1]`` are expert ``e``'s rows.

A is ``[M, K]`` fp8 with 1×128 scales ``[M, ceil(K/128)]``. B is ``[N, K]`` fp8 with scales per
``B_SCALE_ROWS`` rows × 128 columns: 128 for a weight (``weight_scale_inv``), 1 for a 1×128-tiled
activation (the weight-gradient GEMM). BLOCK_K is fixed at 128 so that one K step is one scale block.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import formats
from ..formats import BLOCK


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ("super-row") order: GROUP_M row tiles share each B column tile while it sits in L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % tiles_per_group) % group_rows
    pid_n = (tile_id % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    NUM_PROGRAMS, M_BUCKET,  # M_BUCKET: only an autotuning key (power-of-two bucket of M)
    B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    if USE_TMA:
        # TMA zero-fills out-of-bounds boxes, which is the padding the scales were computed with.
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])

    # persistent: NUM_PROGRAMS programs (one per SM) stride over all output tiles
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(num_k_blocks):
            rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            if USE_TMA:
                a = a_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])
                b = b_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])
            else:
                a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                            mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)
                b = tl.load(b_ptr + rn[:, None] * stride_bn + rk[None, :] * stride_bk,
                            mask=(rn < N)[:, None] & (rk < K)[None, :], other=0.0)
            # one scale per row of A and per row (or 128-row block) of B for this K block
            sa = tl.load(as_ptr + rm * stride_asm + kb * stride_ask, mask=rm < M, other=0.0)
            sb = tl.load(bs_ptr + (rn // B_SCALE_ROWS) * stride_bsn + kb * stride_bsk, mask=rn < N, other=0.0)
            # tensor-core FP8 product of one K block, promoted to the fp32 accumulator with both scales
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        c_mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def fp8_grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, offsets_ptr,
    N, K, NUM_EXPERTS, M_BUCKET,  # M_BUCKET: only an autotuning key
    stride_am, stride_be, stride_bn, stride_cm,
    stride_asm, stride_bse, stride_bsn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (t, j): the t-th BLOCK_M row tile over all experts' row tiles, column tile j.

    Expert e owns ceil(rows_e / BLOCK_M) row tiles; the grid has sum_e of those or more (an upper bound
    known without reading the counts on the host), and a program whose t lies past the last tile exits.
    """
    t = tl.program_id(0)
    # find the expert of row tile t by walking the per-expert tile counts (scalar loop, E iterations)
    expert = -1
    row_start = 0
    row_end = 0
    tiles_before = 0
    for e in range(NUM_EXPERTS):
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        n_tiles = tl.cdiv(end - start, BLOCK_M)
        hit = (t >= tiles_before) & (t < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, start + (t - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, end, row_end)
        tiles_before += n_tiles
    if expert >= 0:
        rm = row_start + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rm < row_end  # rows of the next expert are not ours
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        bs_base = bs_ptr + expert * stride_bse
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(tl.cdiv(K, BLOCK_K)):
            rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :], mask=row_ok[:, None] & (rk < K)[None, :], other=0.0)
            b = tl.load(b_base + rn[:, None] * stride_bn + rk[None, :], mask=(rn < N)[:, None] & (rk < K)[None, :], other=0.0)
            sa = tl.load(as_ptr + rm * stride_asm + kb, mask=row_ok, other=0.0)
            sb = tl.load(bs_base + (rn // BLOCK_K) * stride_bsn + kb, mask=rn < N, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * sa[:, None] * sb[None, :]
        c_mask = row_ok[:, None] & (rn < N)[None, :]
        tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------------------
# configurations: autotuned on a GPU, one fixed small config under the interpreter
# ---------------------------------------------------------------------------------------------------

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, s, w in [
        (128, 128, 4, 8), (128, 256, 3, 8), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 3, 8), (256, 128, 3, 8),
    ]
]
_GROUPED_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bm, bn, s, w in [(64, 128, 4, 4), (128, 128, 4, 8), (64, 256, 3, 8), (128, 64, 4, 4)]
]
_INTERPRETER_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 2}
_INTERPRETER_GROUPED = {"BLOCK_M": 32, "BLOCK_N": 64}


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _tuned_kernels():
    # keyed on a power-of-two bucket of M, not M: token counts change every step (MoE experts above all)
    gemm = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "B_SCALE_ROWS", "USE_TMA"])(fp8_gemm_kernel)
    grouped = triton.autotune(configs=_GROUPED_CONFIGS, key=["M_BUCKET", "N", "K"])(fp8_grouped_gemm_kernel)
    return gemm, grouped


def _m_bucket(m: int) -> int:
    return min(max(triton.next_power_of_2(m), 16), 16384)


def _tma_available(*tensors: torch.Tensor) -> bool:
    """TMA: Hopper or newer, compiled (not interpreted), K-contiguous operands with 16-byte aligned rows."""
    if _interpreting() or not hasattr(tl, "make_tensor_descriptor"):
        return False
    t = tensors[0]
    if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    return all(x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0 for x in tensors)


def _ensure_tma_allocator() -> None:
    # device-side tensor descriptors need a small global scratch buffer per program
    if not getattr(_ensure_tma_allocator, "done", False):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ensure_tma_allocator.done = True


def fp8_gemm(a, a_scale, b, b_scale, b_scale_rows: int = BLOCK, out_dtype: torch.dtype = torch.bfloat16,
             use_tma: bool | None = None) -> torch.Tensor:
    """Triton version of ``formats.fp8_gemm_reference``: ``[M, K] x [N, K] -> [M, N]``."""
    formats.check_gemm_operands(a, a_scale, b, b_scale, b_scale_rows)
    (m, k), n = a.shape, b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if use_tma is None:
        use_tma = _tma_available(a, b)
    if use_tma:
        _ensure_tma_allocator()
    args = (a, b, c, a_scale, b_scale, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1))
    if _interpreting():
        cfg = _INTERPRETER_GEMM
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        programs = max(1, min(3, tiles))  # fewer programs than tiles, so the persistent loop is exercised
        fp8_gemm_kernel[(programs,)](*args, programs, _m_bucket(m), B_SCALE_ROWS=b_scale_rows, BLOCK_K=BLOCK, USE_TMA=use_tma, **cfg)
        return c
    programs = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
    gemm, _ = _tuned_kernels()

    def grid(meta):
        return (min(programs, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    gemm[grid](*args, programs, _m_bucket(m), B_SCALE_ROWS=b_scale_rows, BLOCK_K=BLOCK, USE_TMA=use_tma)
    return c


def fp8_grouped_gemm(a, a_scale, b, b_scale, m_offsets, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of ``formats.fp8_grouped_gemm_reference``. ``m_offsets`` (int32/int64, E+1 entries,
    on the device) are never read on the host: the launch needs no synchronization."""
    if b.dim() != 3:
        raise ValueError(f"grouped FP8 GEMM: `b` must be [experts, N, K], got {tuple(b.shape)}.")
    num_experts, n, k = b.shape
    m = a.shape[0]
    formats.check_gemm_operands(a, a_scale, b[0], b_scale[0], BLOCK)
    formats.check_group_offsets(m_offsets, num_experts, m)
    if not all(t.stride(-1) == 1 or t.shape[-1] == 1 for t in (a, b, a_scale, b_scale)):
        raise ValueError("grouped FP8 GEMM expects operands and scales contiguous along K.")
    offsets = m_offsets.to(device=a.device, dtype=torch.int32)
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    args = (a, b, c, a_scale, b_scale, offsets, n, k, num_experts, _m_bucket(m), a.stride(0), b.stride(0), b.stride(1), c.stride(0),
            a_scale.stride(0), b_scale.stride(0), b_scale.stride(1))

    def grid(meta):
        # sum_e ceil(m_e / BM) <= ceil(M / BM) + E
        return (triton.cdiv(m, meta["BLOCK_M"]) + num_experts, triton.cdiv(n, meta["BLOCK_N"]))

    if _interpreting():
        cfg = _INTERPRETER_GROUPED
        fp8_grouped_gemm_kernel[grid(cfg)](*args, BLOCK_K=BLOCK, **cfg)
        return c
    _, grouped = _tuned_kernels()
    grouped[grid](*args, BLOCK_K=BLOCK)
    return c
