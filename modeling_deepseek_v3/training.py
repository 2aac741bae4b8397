"""Training concerns kept out of the model math: the aux-loss-free bias update and its Trainer callback.

During training every router counts the real (non-padding) tokens it sends to each expert
(``tokens_per_expert``). Once per optimizer step, ``update_expert_bias`` sums the counts over every rank (one
all-reduce for all layers), hands each router its total (``router.update_bias(load, γ)``: the router owns how its
bias moves, ``b_i += γ · sign(mean_load − load_i)`` for the aux-loss-free one), resets the counts, and returns the
per-layer loads and ``MaxVio = max_i load_i / mean_load − 1``. Since the counts cover everything since the previous
call, calling it once per optimizer step counts every micro-batch of a gradient-accumulation step exactly once.

Under transformers' distributed engine the routers are replicated on every rank and each routes its own batch, so
the world-wide sum is the load of the union of the batches — what one process would count on all of them —
except that the ranks of a tensor-parallel group share one batch: the sum is divided by their number
(``distributed.batch_replicas``). Every rank then applies the same step, and the biases stay identical.

``ExpertBiasUpdateCallback`` does that call for ``transformers.Trainer`` and puts the MaxVio statistics into the
Trainer's logs (and so into ``trainer.state.log_history``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from .distributed import batch_replicas
from .registry import RouterPlugin


@dataclass
class ExpertBalanceStats:
    """Loads of one bias update: ``load[layer]`` [E] token counts (summed over ranks) and ``max_vio[layer]``."""

    load: dict[str, torch.Tensor] = field(default_factory=dict)
    max_vio: dict[str, float] = field(default_factory=dict)

    @property
    def mean_max_vio(self) -> float:
        return sum(self.max_vio.values()) / len(self.max_vio) if self.max_vio else 0.0

    @property
    def max_max_vio(self) -> float:
        return max(self.max_vio.values()) if self.max_vio else 0.0


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel (and similar wrappers) hide the config behind `.module`.
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def routers(model: nn.Module) -> dict[str, RouterPlugin]:
    """The routers of ``model`` that count loads, by module name (MTP layers' routers included)."""
    return {
        name: module
        for name, module in _unwrap(model).named_modules()
        if isinstance(module, RouterPlugin) and hasattr(module, "tokens_per_expert")
    }


@torch.no_grad()
def update_expert_bias(model: nn.Module, update_speed: float | None = None, process_group=None) -> ExpertBalanceStats:
    """Apply one aux-loss-free bias step from the counts gathered since the last call, then reset them.

    ``update_speed`` (γ) defaults to ``model.config.router_bias_update_speed``; 0 only measures and resets.
    Counts are summed over ``process_group`` when ``torch.distributed`` is initialised; by default over the world,
    divided by the ranks that hold the same batch, so that every token counts once. Every rank applies the same
    update and the biases stay identical across ranks. Every rank must call it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"update_expert_bias needs the model (an nn.Module), got {type(model).__name__}.")
    model = _unwrap(model)
    found = routers(model)
    gamma = _update_speed(model, update_speed, found)
    stats = ExpertBalanceStats()
    if not found:
        return stats
    names = list(found)
    # One all-reduce for all layers, on the device the routers live on (NCCL needs CUDA tensors, gloo CPU ones).
    device = next(found[n].weight.device for n in names)
    counts = torch.stack([found[n].tokens_per_expert.to(device=device, dtype=torch.float32) for n in names])  # [L, E]
    if dist.is_available() and dist.is_initialized():
        replicas = batch_replicas(model) if process_group is None else 1
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
        if replicas > 1:
            counts /= replicas  # whole counts: every replica of a batch added the same ones
    for name, load in zip(names, counts):
        found[name].update_bias(load, gamma)  # on the device, no host read
        found[name].reset_counts()
    # The statistics: one copy of every layer's counts to the host per optimizer step, the step's only host read.
    loads = counts.cpu()
    means = loads.mean(dim=1)
    max_vio = torch.where(means > 0, loads.max(dim=1).values / means - 1, 0.0).tolist()
    for name, load, vio in zip(names, loads, max_vio):
        stats.load[name] = load
        stats.max_vio[name] = vio
    return stats


def _update_speed(model: nn.Module, update_speed, found: dict) -> float:
    """γ: ``update_speed``, else the config's ``router_bias_update_speed``; a finite real number ≥ 0."""
    if update_speed is None:
        update_speed = getattr(getattr(model, "config", None), "router_bias_update_speed", None)
        if update_speed is None:
            # not a DeepSeek-V3 model: the callback was added to a Trainer of another architecture, most likely
            what = (
                "no router that counts expert loads, so there is no aux-loss-free bias to update: use them with a "
                "DeepSeek-V3 model" if not found else "such routers but no `config.router_bias_update_speed`: pass `update_speed`"
            )
            raise ValueError(f"update_expert_bias / ExpertBiasUpdateCallback: {type(model).__name__} has {what}.")
    if isinstance(update_speed, torch.Tensor) and update_speed.numel() == 1:
        update_speed = update_speed.item()  # once per optimizer step, outside the compiled step
    if isinstance(update_speed, bool) or not isinstance(update_speed, (int, float)):
        raise ValueError(f"`router_bias_update_speed` (γ) must be a real number, got {update_speed!r}.")
    if not (math.isfinite(update_speed) and update_speed >= 0):
        raise ValueError(f"`router_bias_update_speed` (γ) must be finite and non-negative, got {update_speed}.")
    return float(update_speed)


class ExpertBiasUpdateCallback(TrainerCallback):
    """Calls ``model.update_expert_bias()`` once per optimizer step and logs the load balance.

    At every Trainer log it adds ``max_vio_mean`` (MaxVio averaged over layers and over the optimizer steps since
    the previous log) and ``max_vio_max`` (the largest per-layer MaxVio of those steps); with
    ``log_per_layer=True`` also ``max_vio/<router name>`` per layer. ``history`` keeps, for every optimizer step,
    ``{"step": ..., <router name>: MaxVio, ...}`` (for plots).

    The values land in the ``logs`` dict every later callback sees and in ``trainer.state.log_history``.
    Reporting callbacks that the Trainer registered before this one (``report_to`` integrations) have already
    been called by then; put this callback first (``trainer.callback_handler.callbacks.insert(0, cb)``) if they
    must see the values too.
    """

    def __init__(self, log_per_layer: bool = False):
        self.log_per_layer = log_per_layer
        self.history: list[dict[str, float]] = []
        self._pending: list[ExpertBalanceStats] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            stats = update_expert_bias(model)
            if stats.max_vio:
                self._pending.append(stats)
                self.history.append({"step": state.global_step, **stats.max_vio})
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._pending or "loss" not in logs:  # training logs only, not eval metrics
            return control
        pending, self._pending = self._pending, []
        values = {
            "max_vio_mean": sum(s.mean_max_vio for s in pending) / len(pending),
            "max_vio_max": max(s.max_max_vio for s in pending),
        }
        if self.log_per_layer:
            for name in pending[-1].max_vio:
                values[f"max_vio/{name}"] = sum(s.max_vio[name] for s in pending) / len(pending)
        logs.update(values)
        # Trainer.log appends a copy of `logs` to the history before calling the callbacks: update that entry too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        return control


__all__ = ["ExpertBalanceStats", "ExpertBiasUpdateCallback", "update_expert_bias", "routers"]
