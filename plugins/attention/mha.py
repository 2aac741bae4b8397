"""Plain multi-head attention of MLA's width: the ablation baseline for MLA (see docs/equations.md, MLA).

Queries and keys have ``qk_nope_head_dim + qk_rope_head_dim`` channels per head, the last
``qk_rope_head_dim`` of them rotary; values have ``v_head_dim``. Full per-head keys and values are cached,
``num_heads · (qk_head_dim + v_head_dim)`` numbers per token per layer, which is what MLA avoids.
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_deepseek_v3.layers import apply_rotary, yarn_softmax_scale
from modeling_deepseek_v3.registry import AttentionPlugin, register_plugin

from .mla import attention_interface, check_one_key_value_head_per_head


@register_plugin("attention", "mha")
class MultiHeadAttention(AttentionPlugin):
    num_key_value_groups = 1

    @classmethod
    def check_config(cls, config) -> None:
        check_one_key_value_head_per_head(config, "mha")

    @staticmethod
    def cache_widths(config) -> tuple[int, int]:
        """The last dims of what this attention caches as keys and values: per-head keys and values."""
        return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.scaling = yarn_softmax_scale(config, self.qk_head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_heads * self.v_head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_pass, x_rope = x.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat((x_pass, apply_rotary(x_rope, cos, sin, self.config.rope_interleave)), dim=-1)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch_size, seq_len, self.num_heads, -1).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch_size, seq_len, self.num_heads, -1).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch_size, seq_len, self.num_heads, -1).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._rotate(query, cos, sin), self._rotate(key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        out, weights = attention_interface(self.config)(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(batch_size, seq_len, -1)), weights
