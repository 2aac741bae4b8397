"""Classic top-k router (``topk_method: "greedy"``; softmax affinities unless ``scoring_func`` says ``sigmoid``) with
the batch-wise auxiliary balance loss ``α Σ f_i P_i``: the ablation baseline the paper compares aux-loss-free
balancing against."""

from __future__ import annotations

from modeling_deepseek_v3.registry import register_plugin

from .topk_router import TopKRouter


@register_plugin("router", "greedy")
class GreedyRouter(TopKRouter):
    default_scoring_func = "softmax"
    sequence_wise_loss = False

    def forward(self, hidden_states, token_mask=None):
        logits = self.router_logits(hidden_states).view(-1, self.n_routed_experts)  # [N, E] fp32
        scores = self.scores(logits)
        topk_score, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        topk_weight = self.scale_weights(topk_score)
        self.count_tokens(topk_idx, token_mask)
        aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            # Batch-wise: the whole batch is one row; padding is left out of both f and P.
            mask = None if token_mask is None else token_mask.reshape(1, -1)
            probs = scores if self.scoring_func == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            aux_loss = self.balance_loss(probs.unsqueeze(0), topk_idx, mask)
        return logits, topk_weight, topk_idx, aux_loss
