"""Training concerns kept out of the model math: the aux-loss-free bias update and its Trainer callback.

During training every router counts the tokens it sends to each expert (``tokens_per_expert``). Once per
optimizer step, ``update_expert_bias`` turns the counts into ``b_i += γ · sign(mean_load − load_i)`` for the
routers that have an ``e_score_correction_bias`` (DESIGN §4), all-reduced over the data-parallel group, and
resets them; it returns the per-layer loads and ``MaxVio = max_i load_i / mean_load − 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .registry import RouterPlugin


@dataclass
class ExpertBalanceStats:
    """Loads of one bias update: ``load[layer]`` [E] token counts and ``max_vio[layer]``."""

    load: dict[str, torch.Tensor] = field(default_factory=dict)
    max_vio: dict[str, float] = field(default_factory=dict)

    @property
    def mean_max_vio(self) -> float:
        return sum(self.max_vio.values()) / len(self.max_vio) if self.max_vio else 0.0

    @property
    def max_max_vio(self) -> float:
        return max(self.max_vio.values()) if self.max_vio else 0.0


def routers(model: nn.Module) -> dict[str, RouterPlugin]:
    return {name: module for name, module in model.named_modules() if isinstance(module, RouterPlugin)}


@torch.no_grad()
def update_expert_bias(model: nn.Module, update_speed: float | None = None, process_group=None) -> ExpertBalanceStats:
    """Apply one aux-loss-free bias step from the counts gathered since the last call, then reset them.

    ``update_speed`` (γ) defaults to ``model.config.router_bias_update_speed``; 0 only measures and resets.
    Counts are summed over ``process_group`` (default: the world) when ``torch.distributed`` is initialised,
    so every rank applies the same update.
    """
    gamma = model.config.router_bias_update_speed if update_speed is None else update_speed
    if gamma < 0:
        raise ValueError(f"`router_bias_update_speed` (γ) must be non-negative, got {gamma}.")
    found = routers(model)
    stats = ExpertBalanceStats()
    if not found:
        return stats
    names = list(found)
    counts = torch.stack([found[n].tokens_per_expert.float() for n in names])  # [layers, E]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    for name, load in zip(names, counts):
        router = found[name]
        mean_load = load.mean()
        stats.load[name] = load.cpu()
        stats.max_vio[name] = float(load.max() / mean_load - 1) if mean_load > 0 else 0.0
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None and gamma > 0 and mean_load > 0:
            bias += gamma * torch.sign(mean_load - load).to(bias.device, bias.dtype)
        router.tokens_per_expert.zero_()
    return stats


class ExpertBiasUpdateCallback(TrainerCallback):
    """Calls ``model.update_expert_bias()`` once per optimizer step and logs mean and max MaxVio."""

    def __init__(self):
        self._last: ExpertBalanceStats | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._last = update_expert_bias(model)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._last is not None and self._last.max_vio:
            logs["max_vio_mean"] = self._last.mean_max_vio
            logs["max_vio_max"] = self._last.max_max_vio
        return control


__all__ = ["ExpertBalanceStats", "ExpertBiasUpdateCallback", "update_expert_bias"]
