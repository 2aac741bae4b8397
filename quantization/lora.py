"""LoRA over the kept-FP8 layers, for PEFT: adapters in bf16/fp32 train over a frozen FP8 base.

PEFT builds a LoRA layer for the module types it knows; ``FP8Linear`` (e4m3 ``weight`` + fp32 ``weight_scale_inv``
per 128×128 block) is not one of them. ``register_fp8_lora_layers(config)`` registers ``FP8LoraLinear`` for it
through PEFT's custom-module mechanism (``LoraConfig._register_custom_module``), and a refusal for ``FP8Experts``
that says what to do instead (PEFT's parameter LoRA adds ``ΔW`` to the stored tensor, which for FP8 bytes scaled by
block is meaningless).

``FP8LoraLinear`` computes ``y = FP8Linear(x) + scaling · B(A(dropout(x)))``. The base stays frozen: its bytes are
never written while training, and the gradient reaching ``x`` through it is the FP8 Dgrad of
``linear.FrozenFP8LinearFunction`` (on the CPU the reference dequantizes one 128-wide slab at a time, so no
high-precision copy of the weight is ever built). The adapters keep their own dtype (fp32 unless the model is cast),
never the FP8 storage dtype.

Merging (``merge`` / PEFT's ``merge_and_unload``) goes to the layer's ``merge_target``:

* ``"fp8"`` (default): ``W' = dequant(W) + ΔW`` in fp32, re-quantized per 128×128 block (``amax/448`` scales, as
  the checkpoint format defines). The added error is e4m3 rounding of ``W'``: per element at most half a step,
  ``|ε| ≤ 2⁻⁴·|w'|`` in the normal range and ``≤ 2⁻¹⁰·s`` for the block's smallest values (subnormals, ``s`` the
  block scale). The block scale moves with ``ΔW``, so the whole block is re-rounded; an update smaller than half a
  step of its element can vanish. ``merge_report`` holds the measured errors after a merge.
* ``"dense"``: ``W'`` is written into a plain ``nn.Linear`` of ``merge_dtype`` (bf16 by default), with no FP8
  rounding; ``modeling_deepseek_v3.lora.merge_and_unload(..., fp8="dequantize")`` then dequantizes the rest of the
  model so the folder is a plain high-precision checkpoint.

``unmerge`` restores the exact FP8 layer the merge started from (it is kept while merged).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .experts import FP8Experts
from .linear import FP8Linear, check_dequantize_dtype, quantize_weight

MERGE_TARGETS = ("fp8", "dense")

# LoraConfig fields FP8LoraLinear does not implement, with the value that switches each off.
_UNSUPPORTED_OPTIONS = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "velora_config": None,
                        "kasa_config": None}


class FP8LoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer over an ``FP8Linear`` (see the module doc)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, lora_alpha: int = 1,
                 target_name: str = "", **kwargs) -> None:
        for option, off in _UNSUPPORTED_OPTIONS.items():
            if getattr(config, option, off) not in (off, None):
                raise ValueError(
                    f"LoRA over the FP8 layer {target_name or type(base_layer).__name__!r}: LoraConfig field `{option}` "
                    f"is not supported over FP8 weights; leave it at {off!r}."
                )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self.merge_target = "fp8"
        self.merge_dtype = torch.bfloat16
        self.merge_report: dict[str, float] = {}
        self._unmerged_base: nn.Module | None = None
        self.target_name = target_name  # the module's name in the model, for errors
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT gives new adapters the base weight's dtype; e4m3 is a storage format, not one to train adapters in, so
        # only the device is taken (the adapters keep the default dtype until the model is cast).
        weight = getattr(base_layer, "weight", None)
        return (weight.device if weight is not None else None), None

    def set_merge_target(self, target: str, dtype: torch.dtype = torch.bfloat16) -> None:
        """Where ``merge`` writes ``W + ΔW``: ``"fp8"`` (re-quantized FP8Linear) or ``"dense"`` (``nn.Linear`` of ``dtype``)."""
        if target not in MERGE_TARGETS:
            raise ValueError(f"FP8LoraLinear merge target must be one of {list(MERGE_TARGETS)}, got {target!r}.")
        check_dequantize_dtype(dtype)  # when it is chosen, not when the merge finally runs
        self.merge_target, self.merge_dtype = target, dtype

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling · B A`` in fp32, ``[out, in]``."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        exact = _dense_weight(base)
        for adapter in adapter_names:
            exact = exact + self.get_delta_weight(adapter).to(exact.device)
        # always checked (one host read per layer and merge): the FP8 route cannot quantize a non-finite block and
        # the dense one would write it into the merged model
        if not torch.isfinite(exact).all():
            raise ValueError(
                f"NaN or inf in the merged weights of {self.target_name or 'an FP8 LoRA layer'} (adapter(s) "
                f"{adapter_names}): the adapter is broken; nothing was merged."
            )
        merged = _fp8_like(base, exact) if self.merge_target == "fp8" else _dense_like(base, exact, self.merge_dtype)
        self.merge_report = _merge_errors(_dense_weight(merged), exact, exact - _dense_weight(base))
        if self._unmerged_base is None:
            self._unmerged_base = base  # unmerge restores these exact bytes, not a re-rounded W' − ΔW
        self.base_layer = merged
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if self._unmerged_base is None:
            return
        self.base_layer, self._unmerged_base = self._unmerged_base, None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            update = lora_b(lora_a(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype))))
            result = result + (update * self.scaling[adapter]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight in fp32 (dequantized when it is stored in FP8)."""
    if isinstance(layer, FP8Linear):
        return layer.dequantize_weight(torch.float32)
    return layer.weight.detach().float()


def _fp8_like(base: nn.Module, weight: torch.Tensor) -> FP8Linear:
    """A fresh ``FP8Linear`` holding ``weight`` quantized per 128×128 block, with ``base``'s bias and scale rounding."""
    power_of_two = getattr(base, "power_of_two_scales", False)
    bias = base.bias
    new = FP8Linear(weight.shape[1], weight.shape[0], bias is not None, weight.device, power_of_two,
                    bias.dtype if bias is not None else torch.bfloat16)
    q, s = quantize_weight(weight.contiguous(), power_of_two, "merged weight")
    with torch.no_grad():
        new.weight.copy_(q)
        new.weight_scale_inv.copy_(s)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _dense_like(base: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    bias = base.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.requires_grad_(False)


def _merge_errors(stored: torch.Tensor, exact: torch.Tensor, delta: torch.Tensor) -> dict[str, float]:
    """How far the stored merged weight is from the exact ``W + ΔW``: relative to ``W + ΔW`` and to ``ΔW``."""
    error = (stored - exact).norm()
    return {
        "weight_relative_error": float(error / exact.norm().clamp(min=1e-30)),
        "update_relative_error": float(error / delta.norm().clamp(min=1e-30)),
    }


def refuse_fp8_experts(target: nn.Module, adapter_name: str, config: LoraConfig, target_name: str = "",
                       parameter_name: str | None = None, **kwargs) -> nn.Module:
    """PEFT dispatch for ``FP8Experts``: LoRA cannot be added to experts stored in FP8, say what works instead."""
    what = f"parameter {target_name}" if parameter_name else f"module {target_name}"
    raise ValueError(
        f"LoRA on {what}: the routed experts of this model are stored in FP8 (FP8Experts, e4m3 with 128x128 block "
        "scales), and an adapter cannot be added to FP8 bytes. (PEFT turns target_modules named gate_proj, up_proj "
        "or down_proj into these stacked expert parameters for DeepSeek-V3.) Target the attention projections "
        "(FP8Linear) instead, or load the checkpoint with DeepseekV3FP8Config(dequantize=True) to put LoRA on the "
        "stacked experts (target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'])."
    )


def register_fp8_lora_layers(config: LoraConfig) -> LoraConfig:
    """Register, on ``config``, the LoRA layer for ``FP8Linear`` and the refusal for ``FP8Experts``; return it."""
    config._register_custom_module({FP8Linear: FP8LoraLinear, FP8Experts: refuse_fp8_experts})
    return config


__all__ = ["FP8LoraLinear", "MERGE_TARGETS", "refuse_fp8_experts", "register_fp8_lora_layers"]
