"""FP8 routed experts over the stacked expert tensors ``gate_up_proj`` [E, 2·I, H] and ``down_proj`` [E, H, I].

Two pieces, both running each projection of all experts as ONE grouped FP8 GEMM over the tokens sorted by expert
(1×128 activation tiles, 128×128 weight blocks, fp32 accumulation, the token counts kept on the device):

* ``deepseek_fp8_experts_forward`` — an implementation of transformers' experts interface, registered as
  ``"deepseek_fp8"``. It runs on the high-precision stacked master weights and is differentiable: Fprop, Dgrad
  and Wgrad are FP8 (``FP8GroupedLinearFunction``), gradients reach ``gate_up_proj``/``down_proj`` in their own
  dtype. The ``fp8_block`` quantizer in ``"train"`` mode selects it.
* ``FP8Experts`` — the experts stored in FP8 as the released checkpoint stores them (``*_scale_inv`` per 128×128
  block, one grid per expert), for inference: loading an FP8 checkpoint without dequantizing, or the
  ``fp8_block`` quantizer in ``"inference"`` mode.

The scale grid of ``gate_up_proj`` is the gate's grid stacked over the up's: ``[E, 2·ceil(I/128), ceil(H/128)]``.
When ``I`` is a multiple of 128 (DeepSeek-V3: 2048) that is exactly the grid of the concatenated matrix and one
GEMM covers both; otherwise gate and up run as two GEMMs on their halves, in training (``deepseek_fp8``) as in
inference, so both quantize the same blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..expert_slots import SortedSlots, check_routed_inputs
from ..registry import ExpertsPlugin, register_plugin
from . import formats
from .formats import BLOCK, ceil_div
from .linear import KeepsStorageDtype, check_dequantize_dtype, check_frozen_storage, fp8_grouped_linear_frozen, fp8_grouped_linear_trainable, quantize_expert_weights

FP8_EXPERTS_IMPLEMENTATION = "deepseek_fp8"


@register_plugin("experts", FP8_EXPERTS_IMPLEMENTATION)
def deepseek_fp8_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Training-grade FP8 experts (see the module doc). ``self`` is the stacked experts module."""
    check_routed_inputs(hidden_states, top_k_index, top_k_weights, self.hidden_dim)
    power_of_two = self.config.fp8_power_of_two_scales
    slots = SortedSlots(top_k_index, self.num_experts)
    x = slots.gather(hidden_states)
    counts, inter = slots.tokens_per_expert, self.gate_up_proj.shape[1] // 2
    if inter % BLOCK == 0:  # no 128×128 block straddles the gate and the up rows: one GEMM
        gate_up = fp8_grouped_linear_trainable(x, counts, self.gate_up_proj, power_of_two)
    else:
        # gate and up get their own blocks, as in the checkpoint and in FP8Experts (a block holding rows of both would
        # scale the gate by the up's amax, so training would compute other numbers than the model it saves)
        halves = self.gate_up_proj.split(inter, dim=1)
        gate_up = torch.cat([fp8_grouped_linear_trainable(x, counts, w, power_of_two) for w in halves], dim=-1)
    out = fp8_grouped_linear_trainable(self._apply_gate(gate_up), counts, self.down_proj, power_of_two)
    return slots.combine(out, top_k_weights, hidden_states)


class FP8Experts(KeepsStorageDtype, ExpertsPlugin):
    """Routed experts stored in FP8 (inference only; see the module doc for the layout). Casting the model leaves
    the FP8 weights and their scales in their dtypes."""

    storage_dtype_names = ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")

    def __init__(self, config, device=None, dense_class: type | None = None):
        super().__init__()
        self.config = config
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = inter = config.moe_intermediate_size
        self.power_of_two_scales = config.fp8_power_of_two_scales
        self.dense_class = dense_class  # what `dequantize` rebuilds
        e, h = self.num_experts, self.hidden_dim

        def frozen(*shape, dtype):
            return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)

        self.gate_up_proj = frozen(e, 2 * inter, h, dtype=formats.FP8_DTYPE)
        self.gate_up_proj_scale_inv = frozen(e, 2 * ceil_div(inter, BLOCK), ceil_div(h, BLOCK), dtype=torch.float32)
        self.down_proj = frozen(e, h, inter, dtype=formats.FP8_DTYPE)
        self.down_proj_scale_inv = frozen(e, ceil_div(h, BLOCK), ceil_div(inter, BLOCK), dtype=torch.float32)
        from transformers.activations import ACT2FN

        self.act_fn = ACT2FN[config.hidden_act]

    @classmethod
    def from_experts(cls, experts: nn.Module) -> "FP8Experts":
        """The FP8 form of a high-precision stacked experts module (empty when it lives on the meta device, for the
        loader to fill)."""
        device = experts.gate_up_proj.device
        new = cls(experts.config, device=device, dense_class=type(experts))
        if device.type == "meta":
            return new
        inter = new.intermediate_dim
        gate, up = experts.gate_up_proj.detach().split(inter, dim=1)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # autocast's cat refuses float8 tensors
            for weight, scale, parts in (
                (new.gate_up_proj, new.gate_up_proj_scale_inv, (gate, up)),
                (new.down_proj, new.down_proj_scale_inv, (experts.down_proj.detach(),)),
            ):
                quantized = [quantize_expert_weights(p, new.power_of_two_scales) for p in parts]
                weight.copy_(torch.cat([q for q, _ in quantized], dim=1))
                scale.copy_(torch.cat([s for _, s in quantized], dim=1))
        return new

    def _halves(self):
        """``(weight, scale)`` of gate and up as separate [E, I, H] operands."""
        inter, grid = self.intermediate_dim, ceil_div(self.intermediate_dim, BLOCK)
        return [
            (self.gate_up_proj[:, :inter], self.gate_up_proj_scale_inv[:, :grid]),
            (self.gate_up_proj[:, inter:], self.gate_up_proj_scale_inv[:, grid:]),
        ]

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj, down_proj)`` in ``dtype``: each expert's blocks times their scales."""
        check_dequantize_dtype(dtype)

        def dq(weight, scale):
            return torch.stack([formats.dequantize_weight_128x128(w, s, dtype) for w, s in zip(weight, scale)])

        gate_up = torch.cat([dq(w, s) for w, s in self._halves()], dim=1)
        return gate_up, dq(self.down_proj, self.down_proj_scale_inv)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        """The high-precision stacked experts module this one was made from, holding the dequantized weights."""
        check_dequantize_dtype(dtype)
        if self.dense_class is None:
            raise TypeError("This FP8Experts was not built from a stacked experts module: there is no class to dequantize to.")
        with torch.device("meta"):
            dense = self.dense_class(self.config)
        gate_up, down = self.dequantized(dtype)
        dense.gate_up_proj = nn.Parameter(gate_up)
        dense.down_proj = nn.Parameter(down)
        return dense

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        check_routed_inputs(hidden_states, top_k_index, top_k_weights, self.hidden_dim)
        check_frozen_storage(self, "FP8Experts")
        slots = SortedSlots(top_k_index, self.num_experts)
        x = slots.gather(hidden_states)
        counts, p2 = slots.tokens_per_expert, self.power_of_two_scales
        if self.intermediate_dim % BLOCK == 0:  # the stacked grid is the concatenated matrix's grid: one GEMM
            gate_up = fp8_grouped_linear_frozen(x, counts, self.gate_up_proj, self.gate_up_proj_scale_inv, p2)
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = (fp8_grouped_linear_frozen(x, counts, w.contiguous(), s.contiguous(), p2) for w, s in self._halves())
        out = fp8_grouped_linear_frozen(self.act_fn(gate) * up, counts, self.down_proj, self.down_proj_scale_inv, p2)
        return slots.combine(out, top_k_weights, hidden_states)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, fp8=e4m3 128x128"


__all__ = ["FP8Experts", "FP8_EXPERTS_IMPLEMENTATION", "deepseek_fp8_experts_forward"]
