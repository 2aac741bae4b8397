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

The same host read also says whether every router's bias is still finite. A nan or inf bias is added to every
token's selection scores, so its router sends every token to the same experts, and ±γ steps cannot repair it:
``update_expert_bias`` raises, naming the layers.

``ExpertBiasUpdateCallback`` does that call for ``transformers.Trainer`` and puts the MaxVio statistics into the
Trainer's logs (and so into ``trainer.state.log_history``). At the start of training it refuses what would make
those steps or the paper's losses silently wrong: a second bias callback in the same Trainer, and label smoothing
when the model has an MTP module or a balance loss (see ``_check_label_smoothing``).

The biases are buffers of the base model, so a full save (``save_pretrained``, a Trainer checkpoint of the model)
holds them, but a PEFT adapter does not: an adapter reloaded over the original base would route with the biases the
training started from. ``save_expert_biases`` / ``load_expert_biases`` write and read them as one small safetensors
file (``expert_bias.safetensors``, the checkpoint's own tensor names) beside the adapter. For a PEFT model the
callback does that itself: it writes the file into every Trainer checkpoint and into ``output_dir`` when training
ends, and reads it back from the checkpoint a run resumes from.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import compat
from .distributed import batch_replicas
from .registry import RouterPlugin

logger = logging.getLogger(__name__)

EXPERT_BIAS_FILE = "expert_bias.safetensors"
_BIAS = "e_score_correction_bias"


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
    offloaded = [n for n in names if getattr(getattr(found[n], _BIAS, None), "is_meta", False)]
    if offloaded:
        # accelerate with `offload_buffers=True` keeps the bias in its offload store and hands the router a copy while
        # it runs: a step on the module's (meta) tensor would be lost
        raise ValueError(
            f"update_expert_bias: the routing bias (`{_BIAS}`) of {', '.join(offloaded)} is on the meta device (offloaded "
            "by accelerate with `offload_buffers=True`, or never loaded), where no bias step can be applied. Load the "
            "model with `offload_buffers=False` (the default: buffers stay on the device their module runs on)."
        )
    # One all-reduce for all layers, on the device the routers live on (NCCL needs CUDA tensors, gloo CPU ones). A
    # router accelerate offloaded (a device_map with "cpu" or "disk" entries) has its weight on the meta device except
    # while it runs: its counts are on the device it ran on.
    counted = [found[n].tokens_per_expert for n in names]
    device = next((found[n].weight.device for n in names if not found[n].weight.is_meta), counted[0].device)
    counts = torch.stack([c.to(device=device, dtype=torch.float32) for c in counted])  # [L, E]
    if dist.is_available() and dist.is_initialized():
        replicas = batch_replicas(model) if process_group is None else 1
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
        if replicas > 1:
            counts /= replicas  # whole counts: every replica of a batch added the same ones
    for name, load in zip(names, counts):
        found[name].update_bias(load, gamma)  # on the device, no host read
        found[name].reset_counts()
    # One copy to the host per optimizer step, the step's only host read: every layer's counts (the statistics) and,
    # as one more column, whether its bias is finite after the step.
    finite = torch.stack([_bias_is_finite(found[n], device) for n in names])  # [L] 1.0 / 0.0
    host = torch.cat([counts, finite.unsqueeze(1)], dim=1).cpu()
    loads, finite = host[:, :-1], host[:, -1]
    means = loads.mean(dim=1)
    max_vio = torch.where(means > 0, loads.max(dim=1).values / means - 1, 0.0)
    max_vio, finite = torch.stack([max_vio, finite]).tolist()  # already on the host: no second device read
    not_finite = [name for name, ok in zip(names, finite) if not ok]
    if not_finite:
        raise RuntimeError(
            f"update_expert_bias: the routing bias (`e_score_correction_bias`) of {', '.join(not_finite)} is not "
            "finite (nan or inf). It is added to every token's selection scores, so such a router sends every token "
            "to the same experts, and no bias step can repair it. A step only ever adds ±γ (finite), so the bias was "
            "written so: by a checkpoint or by hand. Restore finite biases (e.g. reload them from a good checkpoint, "
            "or zero them) before training on."
        )
    for name, load, vio in zip(names, loads, max_vio):
        stats.load[name] = load
        stats.max_vio[name] = vio
    return stats


def _bias_is_finite(router: nn.Module, device: torch.device) -> torch.Tensor:
    """1.0 when ``router`` has no bias or only finite values in it, else 0.0: a 0-d fp32 tensor on ``device``."""
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:  # a router without a bias (greedy) counts loads for MaxVio only
        return torch.ones((), device=device)
    return torch.isfinite(bias).all().to(device=device, dtype=torch.float32)


def _update_speed(model: nn.Module, update_speed, found: dict) -> float:
    """γ: ``update_speed``, else the config's ``router_bias_update_speed``; a finite real number ≥ 0."""
    source = "`update_speed`"
    if update_speed is None:
        source = "`config.router_bias_update_speed`"
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
    # numbers.Real covers Python's int and float and NumPy's scalars; a bool is a flag, not a speed
    if isinstance(update_speed, bool) or not isinstance(update_speed, numbers.Real):
        raise ValueError(
            f"{source} (γ of the router bias step) must be a real number, got {update_speed!r} "
            f"({type(update_speed).__name__})."
        )
    if not (math.isfinite(update_speed) and update_speed >= 0):
        raise ValueError(f"{source} (γ of the router bias step) must be finite and non-negative, got {update_speed}.")
    return float(update_speed)


def _base_model(model: nn.Module) -> nn.Module:
    """The model whose parameter names a checkpoint uses: inside a PEFT model (``get_base_model``) or a DDP wrapper."""
    model = _unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    return _unwrap(get_base()) if callable(get_base) and hasattr(model, "peft_config") else model


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(_unwrap(model), "peft_config") and callable(getattr(_unwrap(model), "get_base_model", None))


def _biased_routers(model: nn.Module) -> dict[str, nn.Module]:
    """``{checkpoint name of the bias: router}`` for every router of ``model`` that has a routing bias."""
    return {
        f"{name}.{_BIAS}": router
        for name, router in routers(_base_model(model)).items()
        if isinstance(getattr(router, _BIAS, None), torch.Tensor)
    }


def save_expert_biases(model: nn.Module, folder: str | os.PathLike) -> str:
    """Write every router's ``e_score_correction_bias`` (fp32, under the checkpoint's tensor names) into
    ``folder/expert_bias.safetensors`` and return its path. The file is replaced atomically (written beside it, then
    renamed). For a PEFT model, whose adapter files do not hold the biases."""
    found = _biased_routers(model)
    if not found:
        raise ValueError(f"save_expert_biases: {type(_base_model(model)).__name__} has no router with a routing bias ({_BIAS}).")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, EXPERT_BIAS_FILE)
    tmp = path + ".tmp"
    try:
        save_file({name: router.e_score_correction_bias.detach().float().cpu().contiguous() for name, router in found.items()},
                  tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@torch.no_grad()
def load_expert_biases(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the biases of ``folder/expert_bias.safetensors`` (``save_expert_biases``) into ``model``'s routers, e.g.
    after ``PeftModel.from_pretrained(base, folder)``. The file must name exactly the model's routers, with their
    shapes and finite values: a ``ValueError`` names the file and the tensor otherwise, and no bias is changed."""
    path = os.path.join(folder, EXPERT_BIAS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"load_expert_biases: no {EXPERT_BIAS_FILE} in {folder} (save_expert_biases writes it; the bias callback "
            "writes it into every Trainer checkpoint of a PEFT model and into output_dir when training ends)."
        )
    found = _biased_routers(model)
    with safe_open(path, framework="pt") as file:
        names = set(file.keys())
        missing, unexpected = sorted(set(found) - names), sorted(names - set(found))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not hold the routing biases of this model: "
                + "; ".join(part for part in (
                    f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
                    f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "",
                ) if part)
                + " (was it saved from a model of another config?)."
            )
        values = {name: file.get_tensor(name) for name in found}
    for name, value in values.items():
        bias = found[name].e_score_correction_bias
        if value.shape != bias.shape:
            raise ValueError(f"{path}: `{name}` has shape {list(value.shape)}, the model's bias {list(bias.shape)}.")
        if not value.dtype.is_floating_point or not torch.isfinite(value).all():
            raise ValueError(f"{path}: `{name}` must hold finite floating-point values (dtype {value.dtype}).")
    for name, value in values.items():
        found[name].e_score_correction_bias.copy_(value)


# The Trainer makes a new TrainerState at every `train()` call; the first bias callback to see it marks it.
_STATE_MARK = "_deepseek_v3_expert_bias_callback"


def _check_one_bias_callback(state) -> None:
    """A second bias callback would apply its step to the counts the first one has just reset: nothing, whose MaxVio
    of 0 it would log over the real values at every step. Refused, whether two instances or one added twice."""
    if getattr(state, _STATE_MARK, False):
        raise ValueError(
            "This Trainer has ExpertBiasUpdateCallback twice (two instances, or one added twice). The first applies "
            "the bias step and resets the routers' counts, so the second would find none and log `max_vio_mean` 0 "
            "and `max_vio_max` 0 over the real values at every step. Keep one: drop the other from `callbacks=` or "
            "call `trainer.pop_callback(ExpertBiasUpdateCallback)` once (the TRL trainers of this package add one "
            "only when none is passed)."
        )
    setattr(state, _STATE_MARK, True)  # not a dataclass field: never saved with the state


def _check_label_smoothing(args, model: nn.Module) -> None:
    """With ``label_smoothing_factor`` set, ``transformers.Trainer`` pops ``labels`` before the forward and smooths
    the cross-entropy of the logits itself; our forward, without labels, computes no loss, so the MTP loss and the
    balance loss never reach the optimised loss. Refused when the model has either; without them label smoothing
    loses nothing."""
    factor = getattr(args, "label_smoothing_factor", 0)
    if not factor:
        return
    config = getattr(_unwrap(model), "config", None)
    mtp = bool(getattr(config, "num_nextn_predict_layers", 0)) and (getattr(config, "mtp_loss_weight", 0) or 0) > 0
    balance = (getattr(config, "aux_loss_alpha", 0) or 0) > 0
    if not (mtp or balance) or _balance_loss_tapped(model):
        # the TRL trainers of this package take the balance loss from the backbone, labels or not, and never run
        # the MTP modules: label smoothing there costs nothing of ours
        return
    lost = [
        *(["the MTP loss (`mtp_loss_weight` · mtp_loss: the MTP modules would never train)"] if mtp else []),
        *(["the routers' balance loss (`aux_loss_alpha`)"] if balance else []),
    ]
    alternative = (
        ", or train with modeling_deepseek_v3.trl_trainers.DeepseekV3SFTTrainer, which adds the balance loss under "
        "label smoothing too" + (" (but never runs the MTP modules)" if mtp else "")
        if balance else " (no trainer of this package trains the MTP modules with label smoothing)"
    )
    raise ValueError(
        f"`label_smoothing_factor`={factor}: transformers.Trainer then takes `labels` out of the inputs and smooths "
        f"the cross-entropy of the logits itself, so the model, called without labels, leaves "
        f"{' and '.join(lost)} out of the optimised loss. Set `label_smoothing_factor=0`{alternative}."
    )


def _balance_loss_tapped(model: nn.Module) -> bool:
    """Whether a ``BalanceLossTap`` (the TRL trainers of this package) hooks the model's backbone."""
    from .balance_hooks import BalanceLossTap  # imports the model classes, which import this module

    return any(
        isinstance(getattr(hook, "__self__", None), BalanceLossTap)
        for module in model.modules()
        for hook in compat.forward_hooks(module)
    )


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

    ``on_train_begin`` raises a ``ValueError`` for a second bias callback in the same Trainer and for
    ``label_smoothing_factor`` on a model with an MTP module or a balance loss (both would go silently wrong).

    For a PEFT model, whose adapter saves do not hold the biases, it writes ``expert_bias.safetensors``
    (``save_expert_biases``) into every checkpoint the Trainer saves and into ``output_dir`` when training ends, and a
    run resumed from a checkpoint reads the biases back from it; after ``PeftModel.from_pretrained(base, folder)``,
    ``load_expert_biases(model, folder)`` restores them (``merge_and_unload`` keeps them in the merged model).
    """

    def __init__(self, log_per_layer: bool = False):
        if not isinstance(log_per_layer, bool):  # a string such as "no" would switch it on
            raise TypeError(f"ExpertBiasUpdateCallback: `log_per_layer` must be True or False, got {log_per_layer!r}.")
        self.log_per_layer = log_per_layer
        self.history: list[dict[str, float]] = []
        self._pending: list[ExpertBalanceStats] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _check_one_bias_callback(state)
        if model is not None:
            _check_label_smoothing(args, model)
            if state.global_step > 0 and _is_peft_model(model) and _biased_routers(model):
                self._resume_biases(args, state, model)
        return control

    @staticmethod
    def _resume_biases(args, state, model) -> None:
        # A resumed run restored the adapter and the optimizer from the checkpoint, and the state's global_step: the
        # biases were saved beside them, in the checkpoint of that step.
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isfile(os.path.join(checkpoint, EXPERT_BIAS_FILE)):
            load_expert_biases(model, checkpoint)
            return
        logger.warning(
            "Resuming a PEFT model at step %d, but %s holds no %s: the routers keep the biases of the base model, "
            "not the ones the earlier steps moved. If the checkpoint is elsewhere, call "
            "modeling_deepseek_v3.load_expert_biases(model, checkpoint) before trainer.train(resume_from_checkpoint=...).",
            state.global_step, checkpoint, EXPERT_BIAS_FILE,
        )

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is not None and args.should_save and _is_peft_model(model) and _biased_routers(model):
            save_expert_biases(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and args.should_save and _is_peft_model(model) and _biased_routers(model):
            path = save_expert_biases(model, args.output_dir)
            logger.warning(
                "The adapter does not hold the routing biases the bias steps moved; they are in %s. After "
                "PeftModel.from_pretrained(base, folder), call modeling_deepseek_v3.load_expert_biases(model, folder) "
                "with the folder holding that file (or merge the adapter: merge_and_unload keeps them).", path,
            )
        return control

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


__all__ = [
    "EXPERT_BIAS_FILE",
    "ExpertBalanceStats",
    "ExpertBiasUpdateCallback",
    "load_expert_biases",
    "routers",
    "save_expert_biases",
    "update_expert_bias",
]
