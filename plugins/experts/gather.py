"""Routed experts as ``E`` SwiGLU MLPs at the official names ``mlp.experts.{e}.{gate,up,down}_proj``.

Execution gathers the (token, slot) pairs sorted by expert once, runs each expert on its contiguous slice,
weights the results and scatter-adds them back: one pass over the experts that received tokens, no loop
over tokens, and no token dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v3.layers import DeepseekV3MLP
from modeling_deepseek_v3.registry import ExpertsPlugin, register_plugin


@register_plugin("experts", "gather")
class GatherScatterExperts(ExpertsPlugin, nn.ModuleList):
    def __init__(self, config):
        super().__init__()
        for _ in range(config.n_routed_experts):
            self.append(DeepseekV3MLP(config, intermediate_size=config.moe_intermediate_size))

    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        slots = SortedSlots(topk_idx, len(self))
        sorted_inputs = hidden_states[slots.token_of_slot]  # [N*K, hidden], grouped by expert
        outputs, start = [], 0
        for expert, count in zip(self, slots.tokens_per_expert.tolist()):
            if count:
                outputs.append(expert(sorted_inputs[start : start + count]))
                start += count
        return slots.combine(torch.cat(outputs), topk_weight, hidden_states)


class SortedSlots:
    """The (token, choice) slots of a routing decision, sorted by expert: computed once per layer, shared by the
    executors so that each only decides how to run the experts on ``hidden[token_of_slot]``."""

    def __init__(self, topk_idx: torch.Tensor, num_experts: int):
        self.top_k = topk_idx.shape[1]
        flat_expert = topk_idx.reshape(-1)  # [N*K]
        self.order = flat_expert.argsort(stable=True)
        self.token_of_slot = self.order // self.top_k  # the token each sorted slot came from
        self.tokens_per_expert = torch.bincount(flat_expert, minlength=num_experts)  # [E], on the device

    def combine(self, expert_out: torch.Tensor, topk_weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weight the sorted expert outputs [N*K, hidden] by their gate values and sum them back per token."""
        # Weights are fp32 (the router's); multiply before casting back, as the reference does.
        weighted = expert_out * topk_weight.reshape(-1)[self.order, None]
        return torch.zeros_like(like).index_add_(0, self.token_of_slot, weighted.to(like.dtype))
