"""Aux-loss-free router (``topk_method: "noaux_tc"``): sigmoid affinities (``scoring_func``, default ``sigmoid``),
bias-corrected group-limited top-k.

Selection uses ``s_i + b_i`` with ``b`` = ``e_score_correction_bias`` (fp32, adjusted outside the gradient by
the bias-balancing update); the gate value uses ``s_i`` alone. A group scores the sum of its two best
``s + b``; the ``topk_group`` best groups are kept and the top ``num_experts_per_tok`` experts chosen inside them.
While training with ``aux_loss_alpha > 0`` it also returns the complementary sequence-wise balance loss.

The bias moves only in ``update_bias``, once per optimizer step, from the loads that ``update_expert_bias``
(``modeling_deepseek_v3.training``) sums over every rank.
A router that trains for ``warn_after_forwards`` forwards with γ > 0 and no update warns: the bias would stay
frozen, which is almost always a forgotten ``ExpertBiasUpdateCallback``. Forwards inside compiled graphs are not
counted (a Python counter there would recompile every training step).
"""

from __future__ import annotations

import warnings

import torch

from modeling_deepseek_v3.registry import register_plugin

from .topk_router import TopKRouter


@register_plugin("router", "noaux_tc")
class NoAuxTCRouter(TopKRouter):
    group_limited = True

    def __init__(self, config):
        super().__init__(config)
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.config = config  # γ is read at forward time, so a changed `config.router_bias_update_speed` counts
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_routed_experts, dtype=torch.float32))

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.n_routed_experts // config.n_group < 2:
            raise ValueError(
                f"Config field `n_group` ({config.n_group}) leaves fewer than 2 experts per group of "
                f"`n_routed_experts`={config.n_routed_experts}; router `noaux_tc` scores a group by its top-2 experts."
            )

    def _apply(self, fn, recurse=True):
        # The bias is updated by ±γ steps far below bf16 resolution: it stays fp32 whatever dtype the model takes.
        fp32_bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32 and fp32_bias.dtype == torch.float32:
            self.e_score_correction_bias = fp32_bias.to(self.e_score_correction_bias.device)
        return self

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, update_speed: float) -> None:
        """``b_i += γ·sign(mean_load − load_i)``: overloaded experts (load above the mean) lose γ, underloaded ones gain
        γ, exactly balanced ones keep theirs. ``load`` [E] must be the same on every rank (summed over all of them),
        so the biases stay identical everywhere. No step for γ = 0, nor when nothing was routed (every load is then
        the mean, 0). Reads nothing on the host."""
        if load.shape != self.e_score_correction_bias.shape:
            raise ValueError(
                f"`load` must hold one count per routed expert ({self.n_routed_experts}), got shape {tuple(load.shape)}."
            )
        if update_speed > 0:
            load = load.float()
            step = update_speed * torch.sign(load.mean() - load)
            self.e_score_correction_bias += step.to(self.e_score_correction_bias.device, self.e_score_correction_bias.dtype)

    # Generous on purpose: gradient accumulation legitimately runs hundreds of micro-batches between two updates.
    warn_after_forwards = 1000

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        batch_size, seq_len, _ = hidden_states.shape
        logits = self.router_logits(hidden_states).view(-1, self.n_routed_experts)  # [N, E] fp32
        scores = self.scores(logits)
        scores_for_choice = scores + self.e_score_correction_bias.float()
        grouped = scores_for_choice.view(-1, self.n_group, self.n_routed_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.n_routed_experts)
        scores_for_choice = scores_for_choice.masked_fill(~expert_mask, float("-inf"))
        topk_idx = scores_for_choice.topk(self.top_k, dim=-1, sorted=False).indices  # [N, K]
        topk_weight = self.scale_weights(scores.gather(1, topk_idx))
        self.count_tokens(topk_idx, token_mask)
        self._warn_if_never_updated()

        aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            # Sequence-wise: P uses the affinities normalised over all experts, per token; padding excluded.
            probs = scores / scores.sum(dim=-1, keepdim=True)
            aux_loss = self.balance_loss(probs.view(batch_size, seq_len, -1), topk_idx, token_mask)
        return logits, topk_weight, topk_idx, aux_loss

    def _warn_if_never_updated(self) -> None:
        if torch.compiler.is_compiling():  # the count is not kept inside compiled graphs (see count_tokens)
            return
        if self.forwards_since_update == self.warn_after_forwards + 1 and self.config.router_bias_update_speed > 0:
            # Every router of a model reaches the count in the same forward; Python's warning registry shows the
            # message once per call site.
            warnings.warn(
                f"The noaux_tc router ran {self.warn_after_forwards} training forwards with router_bias_update_speed="
                f"{self.config.router_bias_update_speed} but its e_score_correction_bias was never updated: call "
                "`model.update_expert_bias()` once per optimizer step (with transformers.Trainer, add "
                "`modeling_deepseek_v3.ExpertBiasUpdateCallback()`), or set router_bias_update_speed=0 to freeze it.",
                UserWarning,
                stacklevel=2,
            )
