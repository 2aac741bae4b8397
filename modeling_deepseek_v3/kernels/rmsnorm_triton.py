"""RMSNorm in Triton: ``y = w * cast(x * rsqrt(mean(x²) + eps))`` with fp32 statistics.

Forward: one program per row; the whole row is one tile (hidden sizes are at most a few thousand), so the
mean of squares is a single in-register reduction. The per-row ``rstd`` is saved for backward (4 bytes a row)
instead of the normalised activations. Backward: one program per block of rows; each computes ``dx`` for its
rows and accumulates its share of ``dw`` in fp32 registers, written as one partial row that PyTorch sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, N, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    # load the row, statistics in fp32 whatever the storage dtype (masked lanes are 0: they add nothing)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    # round the normalised row to the input dtype first, then scale: the reference's order of roundings
    x_hat = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (w * x_hat).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                  stride_dy, stride_x, stride_dx, M, N, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)  # this program's share of dw, kept in registers
    for i in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        if row < M:
            x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            x_hat = x * rstd
            dw += dy * x_hat
            # d/dx of x·rstd(x): rstd · (g − x̂ · mean(g · x̂)) with g = dy · w
            g = dy * w
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / N))
            tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * N + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    # [..., N] -> [M, N] with unit column stride (a view when the layout allows, e.g. a column slice)
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        n = x.shape[-1]
        x2 = _rows(x)
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        _rms_norm_fwd[(x2.shape[0],)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n, eps, BLOCK_N=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        rows_per_program = 8 if m <= 4096 else 64  # fewer partial dw rows to sum for long inputs
        programs = triton.cdiv(m, rows_per_program)
        dw_partial = torch.empty(programs, n, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0),
                                   m, n, ROWS_PER_PROGRAM=rows_per_program, BLOCK_N=triton.next_power_of_2(n))
        dw = dw_partial.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: input [..., {x.shape[-1]}] does not match weight [{weight.shape[0]}].")
    if x.numel() == 0:
        from . import rms_norm_reference

        return rms_norm_reference(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)
