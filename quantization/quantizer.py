"""The ``fp8_block`` quantizer plugin: DeepSeek-V3's FP8 recipe applied to a built model.

The model calls ``get_plugin("quantizer", config.quantizer)(config).apply(model)`` once it is built. The
plugin swaps, in place, every eligible ``nn.Linear``:

* attention projections under ``self_attn``: ``q_proj``, ``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``,
  ``kv_b_proj``, ``o_proj``;
* ``gate_proj``, ``up_proj``, ``down_proj`` of the dense MLP (``mlp.``) and the shared experts
  (``mlp.shared_experts.``);
* the routed experts (``mlp.experts``, stacked tensors): in ``"train"`` mode they keep their high-precision
  tensors and the model's experts implementation becomes ``"deepseek_fp8"`` (three grouped FP8 GEMMs); in
  ``"inference"`` mode the module is replaced by ``FP8Experts`` (FP8 storage with block scales).

Embeddings, ``lm_head``, the router (``mlp.gate``), norms and the MTP projection ``eh_proj`` stay in high
precision, as in the paper and the released checkpoint.

Modes (``config.fp8_mode``, default ``"train"``): ``"train"`` swaps in ``FP8TrainingLinear`` (master weights in
the model dtype, all three GEMMs in FP8 — also usable for inference); ``"inference"`` swaps in ``FP8Linear``
(weights stored as e4m3 + ``weight_scale_inv``, the checkpoint format, half the weight memory).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..registry import ExpertsPlugin, QuantizerPlugin, register_plugin
from . import formats
from .experts import FP8_EXPERTS_IMPLEMENTATION, FP8Experts
from .linear import FP8Linear, FP8TrainingLinear, check_dequantize_dtype


ATTENTION_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

_ELIGIBLE = re.compile(
    r"^(?:.*\.)?(?:"
    rf"self_attn\.(?:{'|'.join(ATTENTION_PROJECTIONS)})"
    rf"|mlp\.(?:shared_experts\.|experts\.\d+\.)?(?:{'|'.join(MLP_PROJECTIONS)})"  # experts.<e>.: official names
    r")$"
)


def is_fp8_eligible(module_name: str) -> bool:
    """Whether the Linear at ``module_name`` (a ``named_modules`` name) runs in FP8 in DeepSeek-V3."""
    return bool(_ELIGIBLE.match(module_name))


@register_plugin("quantizer", "fp8_block")
class FP8BlockQuantizer(QuantizerPlugin):
    """E4M3 with 1×128 activation tiles and 128×128 weight blocks (see docs/equations.md, FP8)."""

    modes = ("train", "inference")

    @classmethod
    def check_config(cls, config) -> None:
        if config.fp8_mode not in cls.modes:
            raise ValueError(f"Config field `fp8_mode` must be one of {list(cls.modes)}, got {config.fp8_mode!r}.")

    def __init__(self, config=None, mode: str | None = None):
        """``config`` None: the defaults (``fp8_mode="train"``, no power-of-two scales), for a bare module tree."""
        super().__init__(config)
        mode = mode or (config.fp8_mode if config is not None else "train")
        if mode not in self.modes:
            raise ValueError(f"Config field `fp8_mode` must be one of {list(self.modes)}, got {mode!r}.")
        self.mode = mode
        self.power_of_two_scales = config.fp8_power_of_two_scales if config is not None else False

    def is_eligible(self, module_name: str) -> bool:
        return is_fp8_eligible(module_name)

    def apply(self, model: nn.Module) -> nn.Module:
        """Swap every eligible high-precision Linear in place; return ``model``. Idempotent."""
        for name, module in list(model.named_modules()):
            if isinstance(module, ExpertsPlugin) and not isinstance(module, FP8Experts) and self.mode == "inference":
                model.set_submodule(name, FP8Experts.from_experts(module))
            if not self.is_eligible(name) or isinstance(module, FP8Linear):
                continue
            if self.mode == "train":
                if type(module) is nn.Linear:
                    model.set_submodule(name, FP8TrainingLinear.from_linear(module, self.power_of_two_scales))
            elif isinstance(module, nn.Linear):  # nn.Linear or FP8TrainingLinear -> checkpoint-format weights
                model.set_submodule(name, FP8Linear.from_linear(module, self.power_of_two_scales))
        if self.mode == "train" and hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(FP8_EXPERTS_IMPLEMENTATION)
        return model

    @staticmethod
    def dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
        """Undo ``apply``: every FP8 layer back to a plain ``nn.Linear`` (FP8 weights dequantized)."""
        check_dequantize_dtype(dtype)  # before the first layer is swapped, not halfway through the model
        for name, module in list(model.named_modules()):
            if isinstance(module, (FP8Linear, FP8Experts)):
                model.set_submodule(name, module.dequantize(dtype))
            elif isinstance(module, FP8TrainingLinear):
                model.set_submodule(name, module.to_linear())
        config = getattr(model, "config", None)
        if getattr(config, "_experts_implementation", None) == FP8_EXPERTS_IMPLEMENTATION:
            model.set_experts_implementation(config.experts_backend)
        return model


# ---------------------------------------------------------------------------------------------------
# offline conversion of state dicts to and from the official FP8 layout
# ---------------------------------------------------------------------------------------------------


def quantize_state_dict(state_dict: dict[str, torch.Tensor], power_of_two_scales: bool = False) -> dict[str, torch.Tensor]:
    """High-precision state dict -> official FP8 layout: each eligible ``<module>.weight`` becomes e4m3 and
    gains ``<module>.weight_scale_inv``; everything else is passed through unchanged."""
    out = {}
    for key, tensor in state_dict.items():
        module_name, _, leaf = key.rpartition(".")
        if leaf == "weight" and is_fp8_eligible(module_name) and tensor.dtype != formats.FP8_DTYPE:
            if tensor.dim() != 2:
                # every eligible projection is a Linear's matrix; passing this one through would leave it unquantized
                raise ValueError(f"`{key}` has shape {list(tensor.shape)}, but the weight of a Linear is a 2-D matrix.")
            out[key], out[f"{module_name}.weight_scale_inv"] = formats.quantize_weight_128x128(
                tensor, power_of_two_scales, name=key
            )
        else:
            out[key] = tensor
    return out


def dequantize_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Official FP8 layout -> high precision: ``weight * weight_scale_inv`` per 128×128 block, scales dropped."""
    check_dequantize_dtype(dtype)
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight_scale_inv"):
            continue
        scale = state_dict.get(key[: -len("weight")] + "weight_scale_inv") if key.endswith(".weight") else None
        if scale is not None and tensor.dtype == formats.FP8_DTYPE:
            out[key] = formats.dequantize_weight_128x128(tensor, scale, dtype)
        else:
            out[key] = tensor
    return out
