"""What every top-k router shares: the gating weight, the per-expert token counts of training, and the
balance loss ``α Σ_i f_i P_i`` over real (non-padding) tokens."""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v3 import compat
from modeling_deepseek_v3.registry import RouterPlugin


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass, i.e. when activation checkpointing re-runs a
    layer's forward to recompute what it did not save. The recomputation routes the same tokens again; counting
    them a second time would double every load (FSDP2 detects its own backward the same way).

    Inside a compiled graph the forward's Python runs once, at trace time, and a checkpointed region's
    recomputation is part of the compiled backward, so it never re-enters this code: False there (the engine's
    task id is not traceable)."""
    if torch.compiler.is_compiling():
        return False
    return compat.in_backward_pass()


class TopKRouter(RouterPlugin):
    """Holds ``weight`` [E, hidden] (the official ``mlp.gate.weight``) and, while training, counts the
    tokens routed to each expert in ``tokens_per_expert`` until ``update_expert_bias`` reads and resets them, sums
    them over the ranks and hands the total to ``update_bias``.

    The counts are deliberately a plain tensor attribute, not a registered buffer: they are per-rank training
    state. DistributedDataParallel broadcasts rank 0's buffers before every forward, which would overwrite each
    rank's own counts before they are all-reduced, and a checkpoint has no use for them (they are zero after every
    optimizer step).
    """

    # The affinity function when the config leaves `scoring_func` unset (each router has the paper's).
    default_scoring_func = "sigmoid"
    # Whether `balance_loss` runs per sequence (True) or over the whole batch (False).
    sequence_wise_loss = True

    @classmethod
    def check_config(cls, config) -> None:
        # `seq_aux` (DeepSeek's own configuration code writes it) asks for a sequence-wise (true) or batch-wise
        # (false) balance loss; the router decides that here, so the field is accepted only where it agrees.
        seq_aux = getattr(config, "seq_aux", None)
        if seq_aux is None:
            return
        if not isinstance(seq_aux, bool):
            raise ValueError(f"Config field `seq_aux` must be true or false, got {seq_aux!r}.")
        if seq_aux != cls.sequence_wise_loss:
            ours = "sequence-wise" if cls.sequence_wise_loss else "batch-wise"
            raise ValueError(
                f"Config field `seq_aux` ({str(seq_aux).lower()}) asks for a {'sequence' if seq_aux else 'batch'}-wise "
                f"balance loss, but router `topk_method`={config.topk_method!r} computes a {ours} one; drop the field "
                "or pick the router whose loss you want (noaux_tc: sequence-wise, greedy: batch-wise)."
            )

    def __init__(self, config):
        super().__init__()
        self.scoring_func = config.scoring_func
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.aux_loss_alpha = config.aux_loss_alpha
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        self._tokens_per_expert: torch.Tensor | None = None
        # Training forwards counted since the last bias update (read by the "nobody updates the bias" warning).
        self.forwards_since_update = 0

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[E] fp32 tokens routed to each expert by training forwards since the last reset (padding excluded)."""
        if self._tokens_per_expert is None:
            device = self.weight.device if self.weight.device.type != "meta" else "cpu"
            return torch.zeros(self.n_routed_experts, dtype=torch.float32, device=device)
        return self._tokens_per_expert

    def reset_counts(self) -> None:
        self._tokens_per_expert = None
        self.forwards_since_update = 0

    def update_bias(self, load: torch.Tensor, update_speed: float) -> None:
        """One balancing step from ``load`` [E], the tokens routed to each expert since the last step over the whole
        batch (every rank's). A router that balances through its loss alone has no bias to move: nothing happens."""

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Token-to-expert affinities from the router logits [N, E] by the config's ``scoring_func``: ``sigmoid``
        (each expert scored on its own, DeepSeek-V3) or ``softmax`` (a distribution over the experts, DeepSeek-V2)."""
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., E] in fp32: routing decisions must not depend on the activation dtype (autocast
        would otherwise run this GEMM in bf16 whatever its inputs are)."""
        with torch.autocast(hidden_states.device.type, enabled=False):
            return nn.functional.linear(hidden_states.float(), self.weight.float())

    def count_tokens(self, topk_idx: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add this forward's selections (tokens where ``token_mask`` is True) to ``tokens_per_expert``."""
        if not self.training or in_backward_pass():
            return
        with torch.no_grad():
            # A scatter-add (padding slots weigh 0) instead of boolean indexing + bincount: neither of those can
            # size its output without reading the device, and this runs in every MoE layer of every training step.
            weights = torch.ones(topk_idx.shape, dtype=torch.float32, device=topk_idx.device)
            if token_mask is not None:
                weights = weights * token_mask.reshape(-1, 1).to(weights.device, weights.dtype)
            counts = weights.new_zeros(self.n_routed_experts).scatter_add_(0, topk_idx.reshape(-1), weights.reshape(-1))
            if self._tokens_per_expert is None:
                self._tokens_per_expert = counts
            else:
                self._tokens_per_expert = self._tokens_per_expert.to(counts.device) + counts
        if not torch.compiler.is_compiling():
            # A Python int the graph reads is a guard on its value: counted inside a compiled training step it would
            # recompile the step at every forward. Compiled forwards are not counted (nor warned about).
            self.forwards_since_update += 1

    def scale_weights(self, topk_weight: torch.Tensor) -> torch.Tensor:
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weight * self.routed_scaling_factor

    def balance_loss(self, probs: torch.Tensor, topk_idx: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``α Σ_i f_i P_i`` per row of ``probs`` [S, T, E] (a sequence, or the whole batch as one row), averaged
        over the rows that hold at least one real token.

        Over the ``T_s`` real tokens of row s (``token_mask`` [S, T], True = real; None = all real):
        ``f_i = E/(K·T_s) · #tokens choosing i`` and ``P_i = (1/T_s) Σ_t probs[t, i]`` (docs/equations.md). Padding tokens
        are routed like any other but carry no data, so they take no part in the balance they would distort.
        """
        rows, tokens, experts = probs.shape
        chosen = torch.zeros_like(probs).scatter_(-1, topk_idx.view(rows, tokens, -1), 1.0)
        if token_mask is None:
            weight = probs.new_ones(rows, tokens, 1)
        else:
            weight = token_mask.reshape(rows, tokens, 1).to(probs.dtype)
        real_tokens = weight.sum(dim=1)  # [S, 1]
        denominator = real_tokens.clamp(min=1.0)
        f = (chosen * weight).sum(dim=1) * experts / (self.top_k * denominator)
        p = (probs * weight).sum(dim=1) / denominator
        per_row = (f * p).sum(dim=-1)  # [S]; zero for rows without real tokens
        rows_with_tokens = (real_tokens.squeeze(-1) > 0).sum().clamp(min=1)
        return self.aux_loss_alpha * per_row.sum() / rows_with_tokens
