"""Routed experts as grouped GEMMs (``experts_backend: "grouped_mm"``).

Storage is the gather executor's: ``E`` SwiGLU MLPs at the official names ``mlp.experts.{e}.{gate,up,down}_proj``,
so every checkpoint (bf16, FP8 kept as ``FP8Linear``), the ``fp8_block`` quantizer, FSDP wrapping and optimizers
see exactly what they see with ``gather``. Execution differs:

* tokens are permuted once per layer (sorted by expert), then each projection is ONE grouped GEMM over all
  experts (``torch._grouped_mm``); gate and up share one GEMM (their weights are stacked as ``[E, 2I, H]``);
* the per-expert weights are stacked inside an autograd function that saves only the activations: the stacked
  copy lives for the duration of one GEMM (forward) and is rebuilt in backward, so it never adds to the
  activation memory of a training step (per MoE layer it is one transient ``3·E·I·H`` copy: 3·64·512·1024 bf16
  numbers = 201 MB for the benchmark config; its time cost is unmeasured until ``benchmarks/train_step.py`` runs);
* experts whose projections are FP8 layers (``quantizer: "fp8_block"`` or an FP8 checkpoint kept in FP8) run the
  FP8 grouped path of ``quantization.linear.fp8_grouped_expert_mlp``.

Nothing reads the token counts on the host on the grouped path (``torch._grouped_mm`` takes device offsets), so
there is no per-expert Python loop and no device sync. Where ``torch._grouped_mm`` is missing or rejects the
device/dtype/shape (e.g. fp32 on CUDA, unaligned widths), and for tiny batches where stacking all experts costs
more than running the few that received tokens (decoding), the executor uses the gather loop instead.
"""

from __future__ import annotations

import functools

import torch

from modeling_deepseek_v3 import kernels
from modeling_deepseek_v3.quantization import linear as fp8_linear
from modeling_deepseek_v3.registry import register_plugin

from .gather import GatherScatterExperts, SortedSlots


# ---------------------------------------------------------------------------------------------------
# support probe
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, device_index, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` exists here and gives the right answer for ``dtype`` on this device.

    Probed once on a small problem (16-byte aligned widths, an empty group included) because support depends on
    the torch build and the GPU generation, and a missing kernel shows up only as a runtime error."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(24, 32, generator=g).to(device=device, dtype=dtype)
        w = torch.randn(3, 16, 32, generator=g).to(device=device, dtype=dtype)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        out = torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        ref = torch.cat([x[:8] @ w[0].T, x[8:] @ w[2].T])
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool(torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2))


def grouped_mm_available(x: torch.Tensor, *widths: int) -> bool:
    """True when ``torch._grouped_mm`` runs for ``x``'s device/dtype and rows of every width are 16-byte aligned
    (a requirement of the CUDA kernels; harmless elsewhere)."""
    if any((w * x.element_size()) % 16 for w in widths):
        return False
    return _grouped_mm_works(x.device.type, x.device.index, x.dtype)


# ---------------------------------------------------------------------------------------------------
# grouped linear over per-expert weights, without keeping the stacked copy alive
# ---------------------------------------------------------------------------------------------------


class _GroupedLinear(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ W_eᵀ`` with ``W_e = cat(parts[e])`` along the output dim.

    ``weights`` is a flat tuple of ``E * P`` tensors (P projections per expert, concatenated along N, e.g. gate
    and up). The ``[E, N, K]`` stack is built here, used, and dropped; backward rebuilds it for the input
    gradient. Saving ``x`` (needed for the weight gradient anyway) is all the memory this keeps.
    """

    @staticmethod
    def forward(ctx, x, offs, parts_per_expert: int, *weights):
        ctx.save_for_backward(x, offs)
        ctx.parts_per_expert = parts_per_expert
        ctx.weights = weights  # the Parameters themselves (not activations): no extra memory
        w = _stack(weights, parts_per_expert)  # [E, N, K]
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad_out):
        x, offs = ctx.saved_tensors
        p = ctx.parts_per_expert
        # torch's grouped kernels reject broadcast (stride-0) gradients such as that of `.sum()`
        grad_out = grad_out.contiguous()
        weights, ctx.weights = ctx.weights, None
        grad_x, grad_w = None, [None] * len(weights)
        if ctx.needs_input_grad[0]:
            w = _stack(weights, p)
            grad_x = torch._grouped_mm(grad_out, w, offs=offs)  # [M, N] x [E, N, K] -> [M, K]
        if any(ctx.needs_input_grad[3:]):
            # 2-D x 2-D grouped GEMM, groups along the token dim: dW_eᵀ = x_eᵀ dy_e ([E, K, N]); an expert with
            # no rows gets zeros.
            stacked = torch._grouped_mm(x.t(), grad_out, offs=offs).transpose(1, 2)  # [E, N, K]
            sizes = [t.shape[0] for t in weights[:p]]
            grad_w = [g for e in stacked for g in e.split(sizes, dim=0)]
        return (grad_x, None, None, *grad_w)


def _stack(weights, parts_per_expert: int) -> torch.Tensor:
    if parts_per_expert == 1:
        return torch.stack(weights)
    experts = len(weights) // parts_per_expert
    return torch.stack([torch.cat(weights[e * parts_per_expert : (e + 1) * parts_per_expert]) for e in range(experts)])


def grouped_linear(x: torch.Tensor, offs: torch.Tensor, weights, parts_per_expert: int = 1) -> torch.Tensor:
    """Differentiable grouped GEMM over per-expert weight Parameters (see ``_GroupedLinear``)."""
    return _GroupedLinear.apply(x, offs, parts_per_expert, *weights)


# ---------------------------------------------------------------------------------------------------
# the executor
# ---------------------------------------------------------------------------------------------------


@register_plugin("experts", "grouped_mm")
class GroupedMMExperts(GatherScatterExperts):
    """Same parameters as ``gather``; one grouped GEMM per projection for all experts (see the module doc)."""

    # Below this many (token, expert) slots per expert, stacking every expert's weights costs more than running the
    # few experts that received tokens (decoding): the gather loop is used.
    min_slots_per_expert = 1.0

    def __init__(self, config):
        super().__init__(config)
        self.hidden_act = config.hidden_act
        self.fused_kernels = config.fused_kernels

    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = topk_idx.shape
        num_experts = len(self)
        fp8 = isinstance(self[0].gate_proj, (fp8_linear.FP8TrainingLinear, fp8_linear.FP8Linear))
        hidden, inter = hidden_states.shape[-1], self[0].gate_proj.out_features
        small = num_tokens * top_k < self.min_slots_per_expert * num_experts
        if not fp8 and (small or not grouped_mm_available(hidden_states, hidden, inter, 2 * inter)):
            return super().forward(hidden_states, topk_idx, topk_weight)

        # permute once: slots sorted by expert; counts stay on the device
        slots = SortedSlots(topk_idx, num_experts)
        x_sorted = hidden_states[slots.token_of_slot]

        if fp8:
            y = fp8_linear.fp8_grouped_expert_mlp(self, x_sorted, slots.tokens_per_expert, act_fn=self[0].act_fn)
        else:
            offs = slots.tokens_per_expert.cumsum(0).to(torch.int32)
            gate_up = grouped_linear(
                x_sorted, offs, [w for e in self for w in (e.gate_proj.weight, e.up_proj.weight)], parts_per_expert=2
            )
            h = _swiglu(gate_up[:, :inter], gate_up[:, inter:], self[0].act_fn, self.hidden_act, self.fused_kernels)
            y = grouped_linear(h, offs, [e.down_proj.weight for e in self])
        return slots.combine(y, topk_weight, hidden_states)


def _swiglu(gate, up, act_fn, hidden_act: str, fused_kernels) -> torch.Tensor:
    if hidden_act == "silu" and kernels.use_fused(fused_kernels, gate):
        return kernels.swiglu(gate, up)
    return act_fn(gate) * up

