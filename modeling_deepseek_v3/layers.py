"""Building blocks shared by the model and its plugins: RMSNorm, rotary embedding, SwiGLU MLP, the
DeepSeekMoE block and the decoder layer.

Plugins may import this module; it composes plugins only through the config (``config.plugin(field)``),
never by importing them, so the dependency direction stays registry <- plugins <- model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from . import kernels
from .configuration_deepseek_v3 import DeepseekV3Config
from .expert_slots import SortedSlots, check_routed_inputs
from .registry import ExpertsPlugin


class DeepseekV3RMSNorm(nn.Module):
    """``fused_kernels``: the config field of that name (see ``modeling_deepseek_v3.kernels``), passed by whoever
    builds the norm; a norm built on its own stays on the plain path."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, fused_kernels: str = "off"):
        super().__init__()
        self.fused_kernels = fused_kernels
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.fused_kernels != "off" and kernels.use_fused(self.fused_kernels, hidden_states):
            return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        # Normalise in fp32 whatever the activation dtype, then scale in the input dtype (as the reference).
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class DeepseekV3RotaryEmbedding(nn.Module):
    """cos/sin tables for the ``qk_rope_head_dim`` rotary channels; YaRN and the other transformers rope
    types come from ``transformers.modeling_rope_utils``."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.config = config
        # what transformers' `dynamic_rope_update` reads and updates (dynamic NTK and longrope grow the table with
        # the sequence and shrink it back)
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DeepseekV3Config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [rope/2] of plain RoPE over the ``qk_rope_head_dim`` channels, and scaling 1. (The
        name is the one transformers' weight initialisation looks up to refill the buffers.)"""
        dim = config.qk_rope_head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (config.rope_parameters["rope_theta"] ** exponents), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, T] -> cos, sin [B, T, qk_rope_head_dim], both halves holding the same angles
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` [B, heads, T, d] by the angles in ``cos``/``sin`` [B, T, d].

    ``interleaved`` (the checkpoint's layout) pairs channels (0,1), (2,3), ...; the result is written in
    the half-split layout ``[rotated evens; rotated odds]``, which is the same rotation for queries and keys
    alike, so their dot products are unchanged and no de-interleaving copy is needed.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        cos, sin = cos[..., :half], sin[..., :half]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def causal_mask_for_last_queries(query_len: int, key_len: int, device=None) -> torch.Tensor:
    """[1, 1, T, S] bool (True = attend) for the last ``query_len`` of ``key_len`` positions: query i sees keys up to
    its own position ``key_len - query_len + i`` (a causal mask aligned to the bottom right)."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)
    return (torch.arange(key_len, device=device)[None, :] <= query_pos[:, None])[None, None]


def yarn_softmax_scale(config: DeepseekV3Config, head_dim: int) -> float:
    """``head_dim^-0.5``, times ``(0.1·mscale_all_dim·ln(factor) + 1)²`` under YaRN (see docs/equations.md, MLA)."""
    scale = head_dim**-0.5
    rope = config.rope_parameters
    factor = rope.get("factor", 1.0)
    mscale_all_dim = rope.get("mscale_all_dim", 0)
    if rope.get("rope_type", "default") != "default" and mscale_all_dim and factor > 1:
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class DeepseekV3MLP(nn.Module):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``. Dense layers, shared and routed experts."""

    def __init__(self, config: DeepseekV3Config, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused_kernels = config.fused_kernels if config.hidden_act == "silu" else "off"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kernels != "off" and kernels.use_fused(self.fused_kernels, x):
            return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class DeepseekV3Experts(ExpertsPlugin):
    """The routed experts of one MoE layer as stacked tensors, with transformers 5's DeepseekV3 names:
    ``gate_up_proj`` [E, 2·I, H] (each expert's gate rows, then its up rows) and ``down_proj`` [E, H, I].

    Checkpoints keep the official per-expert names; the conversion mapping registered in ``checkpoint`` stacks them
    at load and splits them at save. How the experts run is transformers' experts interface
    (``config._experts_implementation``, our config field ``experts_backend``): ``grouped_mm`` and ``batched_mm``
    are transformers' functions over these tensors, ``deepseek_fp8`` ours (``quantization.experts``), and
    ``eager`` is the ``forward`` below.
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused_swiglu = config.fused_kernels if config.hidden_act == "silu" else "off"

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``act(gate) * up`` of a [S, 2·I] gate/up product; transformers' grouped and batched functions call it too."""
        gate, up = gate_up.chunk(2, dim=-1)
        if self.fused_swiglu != "off" and kernels.use_fused(self.fused_swiglu, gate):
            return kernels.swiglu(gate, up)
        return self.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager: tokens sorted by expert once, then one pair of GEMMs per expert that received any. The loop bounds
        are read on the host (one sync per call); the other implementations avoid it."""
        check_routed_inputs(hidden_states, top_k_index, top_k_weights, self.hidden_dim)
        slots = SortedSlots(top_k_index, self.num_experts)
        x = slots.gather(hidden_states)
        out = x.new_zeros(x.shape[0], self.hidden_dim)
        start = 0
        for expert, end in enumerate(slots.offsets.tolist()):
            if end > start:
                h = self._apply_gate(nn.functional.linear(x[start:end], self.gate_up_proj[expert]))
                out[start:end] = nn.functional.linear(h, self.down_proj[expert])
            start = end
        return slots.combine(out, top_k_weights, hidden_states)


class DeepseekV3MoE(nn.Module):
    """DeepSeekMoE: ``h' = Σ shared FFN(u) + Σ_i g_i FFN_i(u)`` (the residual is added by the layer).

    The router is a plugin (``topk_method``); the routed experts are stacked tensors run through transformers'
    experts interface. Returns the output and the router's balance loss (None when it computes none).
    """

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.gate = config.plugin("topk_method")(config)
        self.experts = DeepseekV3Experts(config)
        self.shared_experts = (
            DeepseekV3MLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None):
        # token_mask [B, T]: True at real tokens; the router leaves padding out of its loads and balance loss.
        batch_size, seq_len, hidden_size = hidden_states.shape
        _, topk_weights, topk_indices, aux_loss = _router_output(self.gate, hidden_states, token_mask)
        routed = self.experts(hidden_states.reshape(-1, hidden_size), topk_indices, topk_weights)
        _check_experts_output(self.experts, routed, hidden_states)
        routed = routed.view(batch_size, seq_len, hidden_size)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states)
        return routed, aux_loss


def _router_output(router: nn.Module, hidden_states: torch.Tensor, token_mask: torch.Tensor | None) -> tuple:
    """The router plugin's output as docs/plugins.md gives it, checked by shape and dtype only (free, inside compiled
    graphs too): a plugin's wrong output failed deep inside transformers' experts functions, or ran (float ids)."""
    output = router(hidden_states, token_mask=token_mask)
    name = f"router plugin {getattr(router, 'plugin_name', type(router).__name__)!r} (`topk_method`)"
    if not isinstance(output, tuple) or len(output) != 4:
        got = f"a tuple of {len(output)}" if isinstance(output, tuple) else type(output).__name__
        raise ValueError(f"The {name} must return (router_logits, topk_weights, topk_indices, aux_loss), got {got}.")
    _, weights, indices, aux_loss = output
    rows = hidden_states.shape[0] * hidden_states.shape[1]
    if not (isinstance(indices, torch.Tensor) and isinstance(weights, torch.Tensor)):
        raise ValueError(f"The {name} must return topk_weights and topk_indices as tensors, got "
                         f"{type(weights).__name__} and {type(indices).__name__}.")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"The {name} returned topk_indices of dtype {indices.dtype}: they must be integer expert ids.")
    if indices.dim() != 2 or indices.shape[0] != rows or weights.shape != indices.shape:
        raise ValueError(f"The {name} must return topk_weights and topk_indices both [tokens={rows}, top_k], got "
                         f"{list(weights.shape)} and {list(indices.shape)}.")
    if aux_loss is not None and not (isinstance(aux_loss, torch.Tensor) and aux_loss.dim() == 0):
        got = list(aux_loss.shape) if isinstance(aux_loss, torch.Tensor) else type(aux_loss).__name__
        raise ValueError(f"The {name} must return aux_loss as None or a 0-dim tensor, got {got}.")
    return output


def _check_experts_output(experts: nn.Module, routed, hidden_states: torch.Tensor) -> None:
    """An experts function's output is [tokens, hidden] (a wrong one failed in a reshape, naming neither the
    function nor the shape it should have). The dtype is left alone: under autocast it differs from the residual's."""
    rows, width = hidden_states.shape[0] * hidden_states.shape[1], hidden_states.shape[2]
    if isinstance(routed, torch.Tensor) and tuple(routed.shape) == (rows, width):
        return
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    got = list(routed.shape) if isinstance(routed, torch.Tensor) else type(routed).__name__
    raise ValueError(f"The routed experts ({type(experts).__name__}, experts implementation {implementation!r}) must "
                     f"return [tokens={rows}, hidden={width}], got {got}.")


class DeepseekV3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: attention plugin, then a dense MLP (``layer_idx < first_k_dense_replace``) or MoE.

    Returns ``(hidden_states, aux_loss)``: the router's balance loss travels up through the outputs (None for a
    dense layer or when the router computes none)."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.self_attn = config.plugin("attention_backend")(config, layer_idx)
        is_dense = layer_idx < config.first_k_dense_replace
        self.mlp = DeepseekV3MLP(config) if is_dense else DeepseekV3MoE(config)
        self.input_layernorm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.post_attention_layernorm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        token_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, DeepseekV3MoE):
            mlp_out, aux_loss = self.mlp(normed, token_mask=token_mask)
        else:
            mlp_out, aux_loss = self.mlp(normed), None
        return hidden_states + mlp_out, aux_loss


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The dense weight of a Linear-like layer, dequantized if the layer stores it quantized."""
    dequantize = getattr(linear, "dequantize_weight", None)
    return dequantize() if callable(dequantize) else linear.weight


__all__ = [
    "DeepseekV3RMSNorm",
    "DeepseekV3RotaryEmbedding",
    "DeepseekV3MLP",
    "DeepseekV3Experts",
    "DeepseekV3MoE",
    "DeepseekV3DecoderLayer",
    "apply_rotary",
    "yarn_softmax_scale",
    "causal_mask_for_last_queries",
    "linear_weight",
]
