"""Multi-token prediction module (docs/equations.md, MTP), stored as the official layer ``num_hidden_layers + depth``.

Module k combines the previous depth's hidden state ``h^{k-1}`` with the embedding of token ``t_{i+k}``:
``h' = eh_proj([enorm(emb); hnorm(h^{k-1})])``, runs one full decoder layer on it, and hands the result to
``shared_head.norm`` and the main model's output head. The embedding and the head are the main model's
(the caller embeds and projects), so this module holds no copy of them.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v3.layers import DeepseekV3DecoderLayer, DeepseekV3RMSNorm
from modeling_deepseek_v3.registry import MTPPlugin, register_plugin


class SharedHead(nn.Module):
    """``shared_head.norm``; the projection ``shared_head.head`` is the main model's ``lm_head``."""

    def __init__(self, config):
        super().__init__()
        self.norm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)


@register_plugin("mtp", "sequential")
class SequentialMTPModule(DeepseekV3DecoderLayer, MTPPlugin):
    def __init__(self, config, depth: int):
        super().__init__(config, layer_idx=config.num_hidden_layers + depth)
        self.depth = depth
        self.enorm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.hnorm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        hidden_prev,
        next_token_embeds,
        position_embeddings,
        attention_mask=None,
        past_key_values=None,
        return_normed: bool = False,
        **kwargs,
    ):
        """``(h^k, aux_loss)`` with ``h^k`` [B, T, hidden] before ``shared_head.norm``; with ``return_normed``
        ``(h^k, shared_head.norm(h^k), aux_loss)``. The norm is applied here rather than by the caller so that
        wrappers that act around this module's forward (FSDP unsharding its parameters, offload hooks) also cover it."""
        # [B, T, 2·hidden] -> [B, T, hidden]; position t carries h_t and the embedding of token t+depth+1.
        hidden = self.eh_proj(torch.cat((self.enorm(next_token_embeds), self.hnorm(hidden_prev)), dim=-1))
        hidden, aux_loss = super().forward(hidden, position_embeddings, attention_mask, past_key_values, **kwargs)
        return (hidden, self.shared_head.norm(hidden), aux_loss) if return_normed else (hidden, aux_loss)
