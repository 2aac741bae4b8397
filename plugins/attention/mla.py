"""Multi-head Latent Attention (DeepSeek-V2/V3; see docs/equations.md, MLA).

Per token only ``c_kv = kv_a_layernorm(W_dkv h)`` (``kv_lora_rank`` numbers) and the shared rotary key
``k_rope`` (``qk_rope_head_dim`` numbers) are cached, through transformers' Cache API: the cache's "keys"
slot holds ``c_kv`` [B, 1, S, kv_lora_rank] and its "values" slot holds ``k_rope`` [B, 1, S, rope].

Two execution modes give the same result:
- expanded: up-project per-head keys and values from ``c_kv`` with ``kv_b_proj``, then ordinary attention;
- absorbed: fold ``W_uk`` into the query and ``W_uv`` into the output, so attention runs as multi-query
  attention directly over the latent cache (one shared "head" of width ``kv_lora_rank + rope``).

``config.mla_mode`` picks one, or ``"auto"`` (the default) picks per forward by a FLOP count: expanding costs
``S·H·r·(nope+v)`` for the up-projection of the S cached tokens, absorbing costs ``T·H·(2r − nope − v)`` more per
cached token in the attention itself plus ``T·H·r·(nope+v)`` to fold the T queries. Absorbed wins when few queries
meet a long cache (decoding, speculative verification), expanded when queries and keys are the same tokens
(prefill, training: there absorbing never pays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_deepseek_v3.configuration_deepseek_v3 import default_key_value_heads_hint
from modeling_deepseek_v3.layers import (
    DeepseekV3RMSNorm,
    apply_rotary,
    linear_weight,
    yarn_softmax_scale,
)
from modeling_deepseek_v3.registry import AttentionPlugin, register_plugin


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q kᵀ · scale + mask) v, per head.

    query [B, H, T, d], key [B, H, S, d], value [B, H, S, dv] -> ([B, T, H, dv], weights [B, H, T, S]).
    """
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


MLA_MODES = ("expanded", "absorbed", "auto")


def check_one_key_value_head_per_head(config, backend: str) -> None:
    """Every head attends with its own key and value (MLA up-projects them per head from the shared latent, and
    ``mha`` is plain multi-head attention): a smaller ``num_key_value_heads`` would be ignored here, and transformers'
    DeepseekV3 class would read it as grouped-query attention and fail on the folder."""
    if config.num_key_value_heads != config.num_attention_heads:
        raise ValueError(
            f"Config field `num_key_value_heads` ({config.num_key_value_heads}) must equal `num_attention_heads` "
            f"({config.num_attention_heads}) for attention_backend {backend!r}, which has no grouped-query attention "
            f"(every head gets its own key and value).{default_key_value_heads_hint(config)}"
        )


def absorbed_is_cheaper(query_len: int, key_len: int, kv_lora_rank: int, nope: int, v: int) -> bool:
    """Whether absorbed attention costs fewer FLOPs than expanded for ``query_len`` queries over ``key_len`` keys.

    Per head: expanded = ``S·r·(nope+v)`` (up-project every cached token) + ``T·S·(nope+rope+v)`` (attention);
    absorbed = ``T·r·(nope+v)`` (fold queries and outputs) + ``T·S·(2r+rope)`` (attention over the latent).
    """
    up = kv_lora_rank * (nope + v)
    return query_len * (key_len * (2 * kv_lora_rank - nope - v) + up) < key_len * up


@register_plugin("attention", "mla")
class MultiHeadLatentAttention(AttentionPlugin):
    # The attention kernels see per-head keys and values (expanded); the absorbed path runs its own kernel.
    num_key_value_groups = 1

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
        self._mode = None  # set `mode` on one module to override the config's `mla_mode` there
        self.is_causal = True
        self._absorbed_cache = None  # (key, W_uk, W_uv) of a quantized kv_b_proj, dequantized once
        self.scaling = yarn_softmax_scale(config, self.qk_head_dim)

        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekV3RMSNorm(self.q_lora_rank, fused_kernels=config.fused_kernels)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = DeepseekV3RMSNorm(self.kv_lora_rank, fused_kernels=config.fused_kernels)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)

    @classmethod
    def check_config(cls, config) -> None:
        check_one_key_value_head_per_head(config, "mla")
        if config.mla_mode not in MLA_MODES:
            raise ValueError(f"Config field `mla_mode` must be one of {list(MLA_MODES)}, got {config.mla_mode!r}.")

    @staticmethod
    def cache_widths(config) -> tuple[int, int]:
        """The last dims of what this attention caches as keys and values: the latent ``c_kv`` and ``k_rope``."""
        return config.kv_lora_rank, config.qk_rope_head_dim

    @property
    def mode(self) -> str:
        """The execution mode: this module's own if one was set, else the config's ``mla_mode``, read at every
        forward (so a mode set on the config after the model was built takes effect)."""
        return self.config.mla_mode if self._mode is None else self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value

    def _use_absorbed(self, query_len: int, key_len: int) -> bool:
        mode = self.mode
        if mode not in MLA_MODES:
            where = "Config field `mla_mode`" if self._mode is None else f"`mode` of attention layer {self.layer_idx}"
            raise ValueError(f"{where} must be one of {list(MLA_MODES)}, got {mode!r}.")
        if self.kv_b_proj.weight.is_meta:
            # Offloaded by accelerate (a `device_map` with "cpu" or "disk" entries): the weight is on the meta device
            # except while kv_b_proj itself runs, which only the expanded path does (the absorbed one reads the weight
            # directly). Both give the same result.
            return False
        layer = self.kv_b_proj
        if not isinstance(layer, nn.Linear) and not callable(getattr(layer, "dequantize_weight", None)):
            # Wrapped by an adapter (PEFT's LoRA): its forward adds the adapter's update, which the absorbed path, reading
            # the weight alone, would miss (and over an FP8 base it would read the wrapper's FP8 bytes without their
            # scales). The expanded path runs that forward.
            return False
        if mode != "auto":
            return mode == "absorbed"
        return absorbed_is_cheaper(query_len, key_len, self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        batch_size, seq_len, _ = hidden_states.shape

        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        # -1 heads: under tensor parallelism q_b_proj / kv_b_proj give this rank's heads only
        q = q.view(batch_size, seq_len, -1, self.qk_head_dim).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        c_kv, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv).view(batch_size, 1, seq_len, self.kv_lora_rank)
        k_rope = k_rope.view(batch_size, 1, seq_len, self.qk_rope_head_dim)

        cos, sin = position_embeddings
        q_rope = apply_rotary(q_rope, cos, sin, self.config.rope_interleave)
        k_rope = apply_rotary(k_rope, cos, sin, self.config.rope_interleave)

        if past_key_values is not None:
            c_kv, k_rope = past_key_values.update(c_kv, k_rope, self.layer_idx)  # [B, 1, S, r], [B, 1, S, rope]

        # Shapes are Python ints, so under torch.compile the choice is made at trace time (no graph break).
        attend = self._attend_absorbed if self._use_absorbed(seq_len, c_kv.shape[2]) else self._attend_expanded
        out, weights = attend(q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs)  # out [B, T, H*v]
        return self.o_proj(out), weights

    def _up_projections(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_uk`` [H, nope, r] and ``W_uv`` [H, v, r], the two halves of ``kv_b_proj``, in ``dtype``.

        A plain Linear's weight is only viewed (no copy, gradients flow). A quantized one (FP8: ``dequantize_weight``)
        would otherwise be dequantized at every decoding step of every layer, so its dense halves are cached and
        rebuilt only when the weight changes (new storage, in-place update, other dtype)."""
        layer = self.kv_b_proj
        if not callable(getattr(layer, "dequantize_weight", None)):
            weight = layer.weight
            if isinstance(weight, DTensor):  # tensor parallel: this rank's heads (rows), gradients reach the shard
                weight = weight.to_local()
            return self._split(weight if dtype is None else weight.to(dtype))
        dtype = dtype or torch.bfloat16
        cached = self._absorbed_cache
        if torch.compiler.is_compiling():
            # Version counters cannot be read inside a graph; a cache filled before compiling is trusted as is.
            return cached[1:] if cached is not None and cached[1].dtype == dtype else self._split(linear_weight(layer).to(dtype))
        key = tuple((t.data_ptr(), t._version) for t in (layer.weight, getattr(layer, "weight_scale_inv", layer.weight))) + (dtype,)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                w_uk, w_uv = self._split(layer.dequantize_weight(dtype))
            cached = self._absorbed_cache = (key, w_uk.contiguous(), w_uv.contiguous())
        return cached[1], cached[2]

    def _split(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs):
        batch_size, _, seq_len, _ = q_nope.shape
        # The latent as [B, S, r], a Linear's usual input: PEFT's OFT reads a 4-D input as a Conv2d's feature map.
        kv = self.kv_b_proj(c_kv[:, 0]).view(batch_size, -1, q_nope.shape[1], self.qk_nope_head_dim + self.v_head_dim)
        k_nope, value = kv.transpose(1, 2).split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_rope.expand(-1, q_nope.shape[1], -1, -1)), dim=-1)  # [B, H, S, nope+rope]
        query = torch.cat((q_nope, q_rope), dim=-1)
        out, weights = attention_interface(self.config)(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return out.reshape(batch_size, seq_len, -1), weights

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, attention_mask, **kwargs):
        batch_size, num_heads, seq_len, _ = q_nope.shape
        w_uk, w_uv = self._up_projections(q_nope.dtype)
        if isinstance(self.kv_b_proj.weight, DTensor):
            # Tensor parallel: this rank's heads read the whole latent, so its gradient is a partial sum over the
            # ranks. Expanded attention sums it in kv_b_proj's column-wise backward; here the latent bypasses that.
            mesh = self.kv_b_proj.weight.device_mesh
            c_kv = _SumGradOverRanks.apply(c_kv, mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp"))
        # q_nope·k_nope = q_nope·(W_uk c) = (W_ukᵀ q_nope)·c: score against the latent directly.
        q_latent = torch.einsum("bhtd,hdr->bthr", q_nope, w_uk)
        query = torch.cat((q_latent, q_rope.transpose(1, 2)), dim=-1)  # [B, T, H, r+rope]
        # All heads share the one latent key/value, so fold (T, H) into a single query axis of one head: the
        # latent cache is read once per step instead of being repeated per head as a GQA kernel would.
        query = query.reshape(batch_size, 1, seq_len * num_heads, -1)
        key = torch.cat((c_kv, k_rope), dim=-1)  # [B, 1, S, r+rope]
        mask = _fold_mask(attention_mask, seq_len, num_heads, key.shape[2], query.device)
        dropout = self.attention_dropout if self.training else 0.0
        if (self.config._attn_implementation or "eager") == "eager":
            scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            probs = nn.functional.dropout(probs, p=dropout, training=self.training)
            # The returned weights [B, H, T, S] are the tensor the output is computed from, so that they sit on the
            # autograd graph (a gradient reaches them, as with expanded attention).
            weights = probs.view(batch_size, seq_len, num_heads, -1).transpose(1, 2)
            out_latent = torch.matmul(weights.transpose(1, 2).reshape(batch_size, 1, seq_len * num_heads, -1), c_kv)
        else:
            out_latent = F.scaled_dot_product_attention(query, key, c_kv, attn_mask=mask, dropout_p=dropout, scale=self.scaling)
            weights = None
        out_latent = out_latent.view(batch_size, seq_len, num_heads, self.kv_lora_rank)
        out = torch.einsum("bthr,hvr->bthv", out_latent, w_uv)
        return out.reshape(batch_size, seq_len, -1), weights


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _fold_mask(attention_mask, query_len: int, num_heads: int, key_len: int, device) -> torch.Tensor | None:
    """The [B, 1|H, T, S] mask for queries folded to [B, 1, T·H, S] (t-major), bool (True = attend) or additive.

    transformers leaves the mask out (None) where SDPA's ``is_causal`` is exact: one query (it sees every key), or
    queries aligned to the first keys — as many keys as queries, or a prefill into an empty static cache whose
    S ≥ T slots are mostly still empty. ``is_causal`` is aligned to the top left (query i sees keys 0..i), which is
    right in all those cases and keeps a static cache's empty slots out; folded queries cannot use ``is_causal``,
    so that mask is built here, aligned the same way."""
    if attention_mask is None:
        if query_len == 1:
            return None
        positions = torch.arange(max(query_len, key_len), device=device)
        attention_mask = (positions[None, :key_len] <= positions[:query_len, None])[None, None]  # [1, 1, T, S]
    attention_mask = attention_mask[..., -key_len:]  # masks may be longer than the keys (never shorter)
    if query_len == 1 and attention_mask.shape[1] == 1:
        return attention_mask  # [B, 1, 1, S] broadcasts over the H folded queries: no copy
    batch = attention_mask.shape[0]
    expanded = attention_mask.transpose(1, 2).expand(batch, query_len, num_heads, attention_mask.shape[-1])
    return expanded.reshape(batch, 1, query_len * num_heads, attention_mask.shape[-1])
