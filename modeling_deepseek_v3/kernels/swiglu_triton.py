"""SwiGLU ``silu(gate) * up`` in Triton, forward and backward.

The plain PyTorch version launches two kernels forward (``silu``, ``*``) and saves three tensors (``gate``,
``silu(gate)``, ``up``); this one is one kernel each way and saves only ``gate`` and ``up``. ``gate`` and ``up``
may be column slices of one ``[M, 2I]`` tensor (the grouped-GEMM experts compute both in one GEMM): rows are
addressed through their own strides. Grid: one program per (row, BLOCK-wide column tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, y_ptr, stride_g, stride_u, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    # silu rounded to the storage dtype before the product, as the two PyTorch ops round
    s = (gf * tl.sigmoid(gf)).to(g.dtype).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (s * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, stride_dy, stride_g, stride_u, stride_dg, stride_du, N,
                BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = σ(g) · (1 + g · (1 − σ(g)))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * stride_du + cols, (dy * silu).to(du_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        n = gate.shape[-1]
        g2, u2 = _rows(gate), _rows(up)
        y = torch.empty(g2.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        block = min(_BLOCK, triton.next_power_of_2(n))
        _swiglu_fwd[(g2.shape[0], triton.cdiv(n, block))](g2, u2, y, g2.stride(0), u2.stride(0), y.stride(0), n, BLOCK=block)
        ctx.save_for_backward(g2, u2)
        ctx.shapes = (gate.shape, up.shape)
        return y.view(*gate.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        n = g2.shape[-1]
        dy2 = _rows(dy)
        dg, du = torch.empty_like(g2, memory_format=torch.contiguous_format), torch.empty_like(u2, memory_format=torch.contiguous_format)
        block = min(_BLOCK, triton.next_power_of_2(n))
        _swiglu_bwd[(g2.shape[0], triton.cdiv(n, block))](
            dy2, g2, u2, dg, du, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), n, BLOCK=block
        )
        return dg.view(ctx.shapes[0]), du.view(ctx.shapes[1])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape.")
    if gate.numel() == 0:
        from . import swiglu_reference

        return swiglu_reference(gate, up)
    return _SwiGLU.apply(gate, up)
