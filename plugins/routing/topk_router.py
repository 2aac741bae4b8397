"""What every top-k router shares: the gating weight and the per-expert token counts of training."""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v3.registry import RouterPlugin


class TopKRouter(RouterPlugin):
    """Holds ``weight`` [E, hidden] (the official ``mlp.gate.weight``) and, while training, counts the
    tokens routed to each expert in ``tokens_per_expert`` until someone reads and resets them."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_alpha = config.aux_loss_alpha
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_routed_experts, dtype=torch.float32), persistent=False)

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., E] in fp32: routing decisions must not depend on the activation dtype."""
        return nn.functional.linear(hidden_states.float(), self.weight.float())

    def count_tokens(self, topk_idx: torch.Tensor) -> None:
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(topk_idx.reshape(-1), minlength=self.n_routed_experts)
                self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)

    def scale_weights(self, topk_weight: torch.Tensor) -> torch.Tensor:
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weight * self.routed_scaling_factor

    def balance_loss(self, probs: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """``α Σ_i f_i P_i`` per row of ``probs`` [S, T, E] (a sequence, or the whole batch as one row), averaged.

        ``f_i = E/(K·T) · #tokens choosing i`` and ``P_i = mean_t probs[t, i]`` (DESIGN §4).
        """
        rows, tokens, experts = probs.shape
        chosen = torch.zeros_like(probs).scatter_(-1, topk_idx.view(rows, tokens, -1), 1.0)
        f = chosen.sum(dim=1) * (experts / (self.top_k * tokens))
        p = probs.mean(dim=1)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()
