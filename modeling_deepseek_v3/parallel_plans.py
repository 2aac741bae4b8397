"""The parallel plans of our parameters, as transformers' distributed engine reads them.

``from_pretrained(path, distributed_config=transformers.DistributedConfig(...))`` shards the model by four plans
keyed by module or parameter name relative to the base model (``*`` = any layer number), which the config class
carries as ``base_model_{ep,tp,fsdp,pp}_plan``:

- expert parallel: every MoE layer's stacked experts (the MTP modules' too, they sit in ``layers.*``) are split
  along the expert dimension (``grouped_gemm``: rank r of the EP group holds the contiguous experts
  ``[r·E/ep, (r+1)·E/ep)``), and the experts module is reached through the token exchange that
  ``DistributedConfig.ep_implementation`` names (``ep_dispatch_experts``). The routers stay replicated: every rank
  routes its own tokens with the full gate and the full ``e_score_correction_bias``.
- tensor parallel: MLA by attention heads (each rank holds ``num_attention_heads / tp`` heads of ``q_b_proj``,
  ``kv_b_proj`` and ``o_proj``; the low-rank down-projections and the latent cache are whole on every rank), the
  dense MLPs and the shared experts column-/row-wise, the routed experts by their intermediate dimension when EP
  is off. transformers' own DeepseekV3 keeps MLA replicated.
- FSDP: one unit per decoder layer (MTP modules included), the embedding apart, the final norm kept whole; the
  engine adds a unit of its own for each module kept in fp32 (the router, for ``e_score_correction_bias``).
- pipeline: embedding, decoder layers, norm; the decoder loop passes the hidden states through the layers a stage
  does not own (the engine replaces those by identities).

``unmatched_rules`` says which rules name nothing in a model, so a plan stays in step with the parameter names.
"""

from __future__ import annotations

import re

EP_PLAN = {
    "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
    "layers.*.mlp.experts.down_proj": "grouped_gemm",
    "layers.*.mlp.experts": "ep_dispatch_experts",
}

TP_PLAN = {
    # MLA by heads: the query and key/value up-projections column-wise (each rank computes its heads), the output
    # projection row-wise; the latent down-projections stay whole (the latent KV cache is shared by all heads),
    # kv_a_proj_with_mqa all-reducing the gradient of its rotary part, which reaches the heads without passing
    # through a column-wise layer. The query projection (q_proj or q_b_proj) is added by `tp_plan`.
    "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
    "layers.*.self_attn.kv_b_proj": "colwise",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
    "layers.*.mlp.experts.down_proj": "rowwise",
    "layers.*.mlp.experts": "moe_tp_experts",
    "layers.*.mlp.shared_experts.gate_proj": "colwise",
    "layers.*.mlp.shared_experts.up_proj": "colwise",
    "layers.*.mlp.shared_experts.down_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
}



def tp_plan(q_lora_rank: int | None) -> dict:
    """``TP_PLAN`` with the query projection of the config's variant: ``q_proj`` without q-LoRA, ``q_b_proj``
    with it (column-wise either way: the projection whose output is the per-head queries)."""
    query = "layers.*.self_attn.q_proj" if q_lora_rank is None else "layers.*.self_attn.q_b_proj"
    return {query: "colwise", **TP_PLAN}


FSDP_PLAN = {
    "embed_tokens": "free_full_weight",
    "layers.*": "free_full_weight",
    "norm": "keep_full_weight",
}

PP_PLAN = {
    "embed_tokens": (["input_ids"], ["inputs_embeds"]),
    "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
    "norm": (["hidden_states"], ["hidden_states"]),
}

_LAYER_NUMBER = re.compile(r"\.\d+(\.|$)")


def wildcard(name: str) -> str:
    """``name`` with its layer numbers written ``*``, as plan rules name modules and parameters."""
    return _LAYER_NUMBER.sub(lambda m: ".*" + m.group(1), name)


def wildcard_names(module) -> set[str]:
    """Every module and parameter name of ``module`` with layer numbers written ``*``, as plan rules name them."""
    names = [n for n, _ in module.named_modules()] + [n for n, _ in module.named_parameters()]
    return {wildcard(name) for name in names}


def unmatched_rules(plan: dict, names: set[str]) -> list[str]:
    """The rules of ``plan`` that name no module or parameter in ``names`` (see ``wildcard_names``)."""
    return sorted(rule for rule in plan if rule not in names)


__all__ = ["EP_PLAN", "TP_PLAN", "tp_plan", "FSDP_PLAN", "PP_PLAN", "wildcard", "wildcard_names", "unmatched_rules"]
