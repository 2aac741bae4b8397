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
        num_tokens, top_k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)  # [N*K]
        order = flat_expert.argsort(stable=True)
        token_of_slot = order // top_k  # the token each sorted slot came from
        counts = torch.bincount(flat_expert, minlength=len(self)).tolist()
        sorted_inputs = hidden_states[token_of_slot]  # [N*K, hidden], grouped by expert

        outputs, start = [], 0
        for expert, count in zip(self, counts):
            if count:
                outputs.append(expert(sorted_inputs[start : start + count]))
                start += count
        # Weights are fp32 (the router's); multiply before casting back, as the reference does.
        weighted = torch.cat(outputs) * topk_weight.reshape(-1)[order, None]
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, token_of_slot, weighted.to(hidden_states.dtype))
