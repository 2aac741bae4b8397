"""Model cards: a ``huggingface_hub.ModelCard`` built from the config with the template in ``model_cards/``.

``save_pretrained`` writes one as ``README.md`` (unless the folder holds a card someone wrote), and ``push_to_hub``
replaces transformers' placeholder card with it before uploading.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from .checkpoint_io import GENERATED_CARD_MARKER
from .quantization.linear import FP8Linear

CARD_MARKER = GENERATED_CARD_MARKER
_TRANSFORMERS_GENERIC_CARD = "This is the model card of a 🤗 transformers model that has been pushed on the Hub"
CARD_TEMPLATE = "deepseek_v3.md"


def card_template_path() -> str:
    """The template in ``model_cards/``, installed as the package data of ``modeling_deepseek_v3.model_cards``."""
    return str(files("modeling_deepseek_v3.model_cards") / CARD_TEMPLATE)


def is_generated_card(text: str) -> bool:
    """Whether a README is one a tool wrote (ours or transformers' placeholder) rather than the user."""
    return CARD_MARKER in text or _TRANSFORMERS_GENERIC_CARD in text


def count_parameters(model) -> dict[str, int]:
    """Total / activated-per-token parameters of the main model and the MTP modules' own parameters.

    Scales (``weight_scale_inv``) are not counted: they are not weights. Routed experts count
    ``num_experts_per_tok / n_routed_experts`` toward the activated total.
    """
    config = model.config
    main = activated = mtp = 0
    for name, param in model.named_parameters():
        if name.endswith("weight_scale_inv"):
            continue
        n = param.numel()
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if parts[i + 1].isdigit() and int(parts[i + 1]) >= config.num_hidden_layers:
                mtp += n
                continue
        main += n
        if ".mlp.experts." in name:
            activated += n * config.num_experts_per_tok / config.n_routed_experts
        else:
            activated += n
    return {"total": main, "activated": int(round(activated)), "mtp": mtp}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _hub_id(name: str | None) -> str | None:
    """``name`` if it looks like a Hub repository id rather than a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def build_model_card(model, repo_id: str | None = None):
    """A ``huggingface_hub.ModelCard`` for ``model`` from the template in ``model_cards/``."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    quant = getattr(config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else (quant or {})
    is_fp8 = quant.get("quant_method") == "fp8" or any(isinstance(m, FP8Linear) for m in model.modules())
    counts = count_parameters(model)
    base_model = _hub_id(getattr(config, "name_or_path", None))
    tags = ["deepseek_v3", "modeling_deepseek_v3", "moe", "mla"]
    if config.num_nextn_predict_layers:
        tags.append("mtp")
    if is_fp8:
        tags.append("fp8")
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags,
                              base_model=base_model)
    rope = getattr(config, "rope_parameters", None) or {}
    context = f"{config.max_position_embeddings:,} tokens"
    if rope.get("rope_type", "default") != "default":
        context += f" ({rope['rope_type']}, factor {rope.get('factor')})"
    plugin_fields = ["attention_backend", "mla_mode", "topk_method", "scoring_func", "experts_backend", "mtp_backend",
                     "quantizer", "router_bias_update_speed", "aux_loss_alpha", "mtp_loss_weight"]
    card = ModelCard.from_template(
        card_data,
        template_path=card_template_path(),
        model_name=repo_id or base_model or "DeepSeek-V3 model",
        repo_id=repo_id or base_model or "path/to/this/folder",
        total_params=_human(counts["total"]),
        activated_params=_human(counts["activated"]),
        mtp_params=_human(counts["mtp"]),
        mtp_depth=config.num_nextn_predict_layers,
        num_layers=config.num_hidden_layers,
        dense_layers=min(config.first_k_dense_replace, config.num_hidden_layers),
        moe_layers=max(config.num_hidden_layers - config.first_k_dense_replace, 0),
        n_routed_experts=config.n_routed_experts,
        experts_per_token=config.num_experts_per_tok,
        n_shared_experts=config.n_shared_experts,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        context=context,
        quantization=("FP8 E4M3, 128×128 block scales (`weight_scale_inv`); embeddings, norms, router, head and "
                      "MTP `eh_proj` in BF16") if is_fp8 else str(getattr(config, "dtype", None) or "float32"),
        is_fp8=is_fp8,
        plugins=[(f, getattr(config, f, None)) for f in plugin_fields],
    )
    card.text = card.text.rstrip() + "\n\n" + CARD_MARKER + "\n"
    return card


def prepare_push(model, working_dir: str, repo_id: str) -> None:
    """Before transformers uploads ``working_dir``: replace a placeholder README (transformers' generic card, or
    ours from an earlier save) by our card for ``repo_id``, keeping the tags the placeholder carried."""
    from huggingface_hub import ModelCard

    readme = Path(working_dir) / "README.md"
    if readme.exists() and not is_generated_card(readme.read_text(encoding="utf-8")):
        return  # the repository already has a card someone wrote
    extra_tags = []
    if readme.exists():
        extra_tags = list(ModelCard.load(readme).data.tags or [])
    card = build_model_card(model, repo_id=repo_id)
    for tag in extra_tags:
        if tag not in card.data.tags:
            card.data.tags.append(tag)
    card.save(readme)


__all__ = ["build_model_card", "card_template_path", "count_parameters", "is_generated_card", "prepare_push"]
