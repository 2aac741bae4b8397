"""Multi-head Latent Attention (DeepSeek-V2/V3, DESIGN §4).

Per token only ``c_kv = kv_a_layernorm(W_dkv h)`` (``kv_lora_rank`` numbers) and the shared rotary key
``k_rope`` (``qk_rope_head_dim`` numbers) are cached, through transformers' Cache API: the cache's "keys"
slot holds ``c_kv`` [B, 1, S, kv_lora_rank] and its "values" slot holds ``k_rope`` [B, 1, S, rope].

Two execution modes give the same result:
- expanded: up-project per-head keys and values from ``c_kv`` with ``kv_b_proj``, then ordinary attention;
- absorbed: fold ``W_uk`` into the query and ``W_uv`` into the output, so attention runs as multi-query
  attention directly over the latent cache (one shared "head" of width ``kv_lora_rank + rope``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_deepseek_v3.layers import DeepseekV3RMSNorm, apply_rotary, linear_weight, yarn_softmax_scale
from modeling_deepseek_v3.registry import AttentionPlugin, register_plugin


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q kᵀ · scale + mask) v with keys/values shared by ``module.num_key_value_groups`` heads.

    query [B, H, T, d], key [B, H_kv, S, d], value [B, H_kv, S, dv] -> ([B, T, H, dv], weights [B, H, T, S]).
    """
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def attention_interface(config):
    """The attention kernel transformers registers for ``config._attn_implementation`` (eager: ours)."""
    implementation = config._attn_implementation or "eager"
    return eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


@register_plugin("attention", "mla")
class MultiHeadLatentAttention(AttentionPlugin):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = config.attention_dropout
        self.absorb = bool(config.mla_absorb)
        self.is_causal = True
        self.scaling = yarn_softmax_scale(config, self.qk_head_dim)

        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(self.q_lora_rank)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)

    @property
    def num_key_value_groups(self) -> int:
        # Expanded: every head has its own key/value. Absorbed: one latent "head" shared by all heads (MQA).
        return self.num_heads if self.absorb else 1

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape

        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(batch_size, seq_len, self.num_heads, self.qk_head_dim).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        c_kv, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).view(batch_size, 1, seq_len, self.kv_lora_rank)
        k_rope = k_rope.view(batch_size, 1, seq_len, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        q_rope = apply_rotary(q_rope, cos, sin, self.config.rope_interleave)
        k_rope = apply_rotary(k_rope, cos, sin, self.config.rope_interleave)

        if past_key_values is not None:
            c_kv, k_rope = past_key_values.update(c_kv, k_rope, self.layer_idx)  # [B, 1, S, r], [B, 1, S, rope]

        attend = self._attend_absorbed if self.absorb else self._attend_expanded
        out, weights = attend(q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs)  # out [B, T, H*v]
        return self.o_proj(out), weights

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk`` [H, nope, r] and ``W_uv`` [H, v, r], the two halves of ``kv_b_proj``."""
        w = linear_weight(self.kv_b_proj).view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs):
        batch_size, _, seq_len, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(batch_size, -1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_rope.expand(-1, self.num_heads, -1, -1)), dim=-1)  # [B, H, S, nope+rope]
        query = torch.cat((q_nope, q_rope), dim=-1)
        out, weights = attention_interface(self.config)(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return out.reshape(batch_size, seq_len, -1), weights

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs):
        batch_size, _, seq_len, _ = q_nope.shape
        w_uk, w_uv = self._up_projections()
        # q_nope·k_nope = q_nope·(W_uk c) = (W_ukᵀ q_nope)·c: score against the latent directly.
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(q_nope.dtype))
        query = torch.cat((q_latent, q_rope), dim=-1)  # [B, H, T, r+rope]
        key = torch.cat((c_kv, k_rope), dim=-1)  # [B, 1, S, r+rope]
        out_latent, weights = attention_interface(self.config)(
            self, query, key, c_kv, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )  # [B, T, H, r]
        out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv.to(out_latent.dtype))
        return out.reshape(batch_size, seq_len, -1), weights
