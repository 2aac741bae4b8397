"""LoRA with PEFT on DeepSeek-V3: target checks, the FP8 layers, merging into the official checkpoint layout.

Needs the ``finetune`` extra (``pip install modeling-deepseek-v3[finetune]``)::

    from peft import LoraConfig, get_peft_model
    from modeling_deepseek_v3.lora import prepare_lora_config, merge_and_unload

    config = prepare_lora_config(model, LoraConfig(r=8, target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                         "kv_b_proj", "o_proj"],
                                                   target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    peft_model = get_peft_model(model, config)
    ...                                                   # train
    merged = merge_and_unload(peft_model)                 # our DeepseekV3ForCausalLM, adapters folded in
    merged.save_pretrained("out")                         # official layout

``prepare_lora_config`` checks every name of ``target_modules`` / ``target_parameters`` against the model (PEFT
skips a name that matches nothing as long as another one matches) and registers the LoRA layer for the kept-FP8
``FP8Linear`` (``quantization.lora``), so the same config works over a model loaded with
``DeepseekV3FP8Config(dequantize=False)``. The DeepSeek-V3 TRL trainers (``modeling_deepseek_v3.trl``) call it on
their ``peft_config``. Reloading a saved adapter over an FP8 base needs the registration too:
``PeftModel.from_pretrained(model, folder, config=prepare_lora_config(model, LoraConfig.from_pretrained(folder)))``.

The routed experts are stacked tensors, ``mlp.experts.gate_up_proj`` [E, 2·I, H] and ``mlp.experts.down_proj``
[E, H, I]; PEFT's ``target_parameters`` gives each expert its own rank-r update. Checkpoints name them per expert
(``mlp.experts.{e}.gate_proj.weight`` ...), and a merged model saves them that way again.
"""

from __future__ import annotations

import logging
import re

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from .layers import DeepseekV3Experts
from .quantization.experts import FP8Experts
from .quantization.linear import FP8Linear
from .quantization.lora import FP8LoraLinear, check_dense_dtype, register_fp8_lora_layers
from .quantization.quantizer import FP8BlockQuantizer
from .registry import ExpertsPlugin

logger = logging.getLogger(__name__)

FP8_MERGES = ("requantize", "dequantize")
STACKED_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# An official checkpoint's per-expert tensor names: they exist in the files, not in the (stacked) model.
_PER_EXPERT_NAME = re.compile(r"(^|\.)experts\.\d+(\.|$)|(^|\.)experts\.(gate|up|down)_proj(\.weight)?$")


def prepare_lora_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Check ``config``'s targets against ``model`` (a ``ValueError`` naming each one that matches nothing, or that
    LoRA cannot adapt), register the FP8 LoRA layers, and return ``config``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_lora_config needs the model (an nn.Module), got {type(model).__name__}.")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"prepare_lora_config needs a peft.LoraConfig, got {type(config).__name__}.")
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = _all_linear(model)  # PEFT's own expansion knows nn.Linear only, not FP8Linear
    _check_target_modules(model, config.target_modules)
    _check_target_parameters(model, config.target_parameters)
    return register_fp8_lora_layers(config)


def _linear_leaf_names(model: nn.Module) -> list[str]:
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))})


def _all_linear(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear)) and m is not head}


def _check_target_modules(model: nn.Module, targets) -> None:
    if targets is None:
        return
    modules = dict(model.named_modules())
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, name) for name in modules):
            raise ValueError(
                f"LoRA target_modules pattern {targets!r} matches no module of {type(model).__name__}. A string is a "
                "regular expression matched against whole module names (e.g. r'.*\\.q_a_proj'); pass a list for "
                "module names (e.g. ['q_a_proj'])."
            )
        return
    for target in sorted(targets):
        matched = [m for name, m in modules.items() if name == target or name.endswith("." + target)]
        if not matched:
            raise ValueError(
                f"LoRA target module {target!r} matches no module of {type(model).__name__}. "
                + _expert_hint(target)
                + f"Linear layers it has: {_linear_leaf_names(model)}."
            )
        if any(isinstance(m, ExpertsPlugin) for m in matched):
            raise ValueError(
                f"LoRA target module {target!r} is the routed experts module, whose weights are stacked tensors, not "
                f"Linear layers: adapt them with target_parameters={list(STACKED_EXPERT_PARAMETERS)}."
            )


def _expert_hint(name: str) -> str:
    if _PER_EXPERT_NAME.search(name):
        return (
            "The routed experts are stacked in the model (mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj "
            "[E, H, I]); the per-expert names exist only in checkpoint files. Use "
            f"target_parameters={list(STACKED_EXPERT_PARAMETERS)}. "
        )
    return ""


def _check_target_parameters(model: nn.Module, targets) -> None:
    if not targets:
        return
    owners = {}  # "module.param" -> owning module
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    for target in sorted(targets):
        matched = {key: m for key, m in owners.items() if key == target or key.endswith("." + target)}
        if not matched:
            raise ValueError(
                f"LoRA target parameter {target!r} matches no parameter of {type(model).__name__}. "
                + _expert_hint(target)
                + f"Stacked expert parameters: {list(STACKED_EXPERT_PARAMETERS)}."
            )
        for key, module in matched.items():
            if isinstance(module, FP8Experts):
                raise ValueError(
                    f"LoRA target parameter {key!r} is stored in FP8 (FP8Experts): an adapter cannot be added to FP8 "
                    "bytes scaled per block. Load with DeepseekV3FP8Config(dequantize=True) for LoRA on the experts, or "
                    "target the FP8Linear attention projections with target_modules."
                )
            if isinstance(module, ExpertsPlugin) and not isinstance(module, DeepseekV3Experts):
                raise ValueError(
                    f"LoRA target parameter {key!r} belongs to {type(module).__name__}, whose experts are not the stacked "
                    "DeepseekV3Experts tensors that target_parameters adapts per expert."
                )
            if isinstance(module, DeepseekV3Experts) and getattr(module, key.rpartition(".")[2]).dim() != 3:
                raise ValueError(f"LoRA target parameter {key!r} is not a stacked [experts, out, in] tensor.")


def set_fp8_merge(model: nn.Module, fp8: str = "requantize", dtype: torch.dtype = torch.bfloat16) -> list[FP8LoraLinear]:
    """Choose how every ``FP8LoraLinear`` of ``model`` merges: ``"requantize"`` back into FP8, or ``"dequantize"``
    into ``nn.Linear`` of ``dtype``. Returns those layers."""
    if fp8 not in FP8_MERGES:
        raise ValueError(f"`fp8` must be one of {list(FP8_MERGES)}, got {fp8!r}.")
    check_dense_dtype(dtype)
    layers = [m for m in model.modules() if isinstance(m, FP8LoraLinear)]
    for layer in layers:
        layer.set_merge_target("fp8" if fp8 == "requantize" else "dense", dtype)
    return layers


def merge_and_unload(peft_model: PeftModel, fp8: str = "requantize", dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Fold the adapters into the base and return it (our ``DeepseekV3ForCausalLM``), ready for ``save_pretrained``.

    Over an FP8 base, ``fp8="requantize"`` keeps every layer in FP8 (the merged ones re-quantized, see
    ``quantization.lora`` for the error that adds) and the model saves as an FP8 checkpoint; ``fp8="dequantize"``
    writes the merged layers in ``dtype`` without FP8 rounding, dequantizes every other FP8 layer to ``dtype`` and
    drops the quantization config, so the model saves as a plain ``dtype`` checkpoint that any DeepSeek-V3 loader
    (transformers' own class included) reads. Without FP8 layers both are PEFT's ``merge_and_unload``.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(
            f"merge_and_unload folds the adapters of a PeftModel (from get_peft_model or PeftModel.from_pretrained) into "
            f"its base, got {type(peft_model).__name__}."
        )
    layers = {id(layer): name for name, layer in peft_model.named_modules() if isinstance(layer, FP8LoraLinear)}
    merged_layers = set_fp8_merge(peft_model, fp8, dtype)
    model = peft_model.merge_and_unload()
    if merged_layers:
        errors = [layer.merge_report.get("update_relative_error", 0.0) for layer in merged_layers]
        worst = max(merged_layers, key=lambda layer: layer.merge_report.get("update_relative_error", 0.0))
        logger.info("Merged %d FP8 LoRA layers (%s); largest error relative to the adapter's update: %.3g (%s).",
                    len(merged_layers), fp8, max(errors), layers[id(worst)])
    if fp8 == "dequantize":
        dequantize_model(model, dtype)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Every FP8 layer of ``model`` back to high precision in ``dtype``, the quantization config dropped, and the model
    cast to ``dtype`` (the routers' fp32 bias stays fp32)."""
    check_dense_dtype(dtype)
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize(dtype)  # transformers' path: our quantizer's dequantize, then the config is removed
    else:
        FP8BlockQuantizer.dequantize(model, dtype)
        if getattr(model.config, "quantizer", None) is not None:
            model.config.quantizer = None
    return model.to(dtype)


__all__ = ["FP8_MERGES", "STACKED_EXPERT_PARAMETERS", "dequantize_model", "merge_and_unload", "prepare_lora_config",
           "set_fp8_merge"]
