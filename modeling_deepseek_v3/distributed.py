"""Our side of transformers' distributed engine (``from_pretrained(..., distributed_config=DistributedConfig(...))``).

The engine builds the device mesh, shards by the plans of ``parallel_plans``, exchanges tokens between expert ranks
and applies FSDP2. This module adds what it cannot know about DeepSeek-V3:

- ``check_distributed_config``: the sizes checked against the model config and the world size, and plan overrides
  against our names, in the launching process before any process group or mesh exists, so a bad layout fails
  with one message naming the values instead of a collective hanging or a shard-shape error deep in loading.
- ``batch_replicas``: how many ranks of a sharded model hold the same batch (the ranks of a tensor-parallel group),
  so that per-expert token counts summed over the world count every token once.
- ``sync_initialized_parameters``: the parameters ``from_pretrained`` initialised (the checkpoint lacks them) made the
  same on the ranks that hold the same copy, which each drew at random on its own.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from . import expert_placement, parallel_plans
from .fp8_config import OFFICIAL_QUANT_METHOD, QUANT_METHOD

# from_pretrained keywords that say where a config is read from
_HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


def world_size() -> int | None:
    """The number of processes of this launch: the process group's size, else torchrun's ``WORLD_SIZE``, else None."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"The environment variable WORLD_SIZE must be a positive number of processes, got {value!r}.")
    return int(value)


def as_distributed_config(value):
    """A ``DistributedConfig`` from itself or from a dict (whose invalid sizes are reported with the dict)."""
    from transformers import DistributedConfig

    if isinstance(value, DistributedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"`distributed_config` must be a transformers DistributedConfig or a dict of its fields, got {type(value).__name__}.")
    # transformers' from_dict drops keys it does not know: a misspelt size would silently run unsharded
    unknown = sorted(set(value) - set(DistributedConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"distributed_config={value}: unknown field(s) {unknown}; DistributedConfig has "
            f"{sorted(DistributedConfig.__dataclass_fields__)}."
        )
    # transformers compares the sizes with `< 1` (a string fails unnamed) and tests the flags' truth ("no" is true)
    _check_field_types(value, f"distributed_config={value}")
    try:
        config = DistributedConfig.from_dict(value)
    except ValueError as error:
        raise ValueError(f"distributed_config={value}: {error}") from error
    if value.get("enable_expert_parallel") and config.ep_size == 1:
        # the deprecated flag takes ep_size from tp_size: without a tensor-parallel size it silently shards nothing
        raise ValueError(
            f"distributed_config={value}: enable_expert_parallel without ep_size resolves to ep_size={config.tp_size} "
            "(the tp_size), i.e. no expert parallelism; give ep_size instead (e.g. {'ep_size': 2, 'fsdp_size': 2})."
        )
    return config


_SIZE_FIELDS = ("tp_size", "fsdp_size", "dp_replicate_size", "pp_size", "ep_size")
_FLAG_FIELDS = ("enable_sequence_parallel", "enable_expert_parallel", "fsdp_cpu_offload", "fsdp_mixed_precision")


def _check_field_types(fields, where: str) -> None:
    """The sizes are whole numbers (a bool is not one: ``True`` would silently be 1) and the flags booleans."""
    get = fields.get if isinstance(fields, dict) else lambda name: getattr(fields, name, None)
    for name in _SIZE_FIELDS:
        size = get(name)
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
            raise ValueError(f"{where}: `{name}` must be a whole number of processes, got {size!r} ({type(size).__name__}).")
    for name in _FLAG_FIELDS:
        flag = get(name)
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{where}: `{name}` must be true or false, got {flag!r}.")
    implementation = get("ep_implementation")
    if implementation is not None and not isinstance(implementation, str):
        raise ValueError(f"{where}: `ep_implementation` must be a string, got {implementation!r}.")
    tp_plan = get("tp_plan")
    if tp_plan is not None and not isinstance(tp_plan, dict) and tp_plan != "auto":
        # anything but a dict is read as "use the model's plan", so a misspelt value would silently mean "auto"
        raise ValueError(f"{where}: `tp_plan` must be a dict of rules, 'auto' or None, got {tp_plan!r}.")


def resolve_model_config(config_class, pretrained_model_name_or_path, kwargs: dict):
    """The model config ``from_pretrained`` will build: the ``config`` keyword, else read from the checkpoint."""
    config = kwargs.get("config")
    if isinstance(config, config_class):
        return config
    hub = {k: kwargs[k] for k in _HUB_KEYWORDS if k in kwargs}
    # the model's own fields given to from_pretrained override the file's, so the layout is checked against the config
    # the model will be built from (e.g. `n_group=...` for the placement check)
    overrides = {k: v for k, v in kwargs.items() if k in config_class.field_names}
    source = config if isinstance(config, (str, os.PathLike)) else pretrained_model_name_or_path
    return config_class.from_pretrained(source, **hub, **overrides)


def check_distributed_config(model_class, config, distributed_config, world: int | None) -> None:
    """Raise ``ValueError`` naming the values when ``distributed_config`` cannot shard ``model_class(config)`` over
    ``world`` processes. Reads nothing from other processes."""
    dc = as_distributed_config(distributed_config)
    _check_field_types(dc, "DistributedConfig")
    sizes = {"pp_size": dc.pp_size, "dp_replicate_size": dc.dp_replicate_size, "fsdp_size": dc.fsdp_size, "tp_size": dc.tp_size}
    needed = 1
    for size in sizes.values():
        needed *= size
    if needed == 1:
        return  # transformers runs an unsharded model: nothing is distributed
    product = " × ".join(f"{name}={size}" for name, size in sizes.items())
    if world is None:
        raise ValueError(
            f"DistributedConfig sizes {product} need {needed} processes, but this one was not started by a launcher "
            f"(no process group, no WORLD_SIZE): run it with `torchrun --nproc-per-node {needed} ...`."
        )
    if dc.ep_size > 1:
        if config.n_routed_experts % dc.ep_size:
            raise ValueError(
                f"DistributedConfig ep_size={dc.ep_size} does not divide the model's n_routed_experts="
                f"{config.n_routed_experts}: every expert-parallel rank holds the same number of experts."
            )
        if world % dc.ep_size:
            raise ValueError(f"DistributedConfig ep_size={dc.ep_size} does not divide the world size {world}.")
    if needed != world:
        raise ValueError(f"DistributedConfig sizes {product} multiply to {needed}, but the world size is {world}.")
    _check_weights_shardable(config, product)
    if dc.tp_size > 1 and isinstance(dc.tp_plan, dict) and not dc.tp_plan:
        # DistributedConfig documents an empty tp_plan as "no tensor-parallel rule" (the deprecated
        # enable_expert_parallel resolves to it), but transformers' engine refuses a TP size without rules once the
        # process group and the model exist ("has no `tp_plan`")
        raise ValueError(
            f"DistributedConfig tp_size={dc.tp_size} with an empty tp_plan (what enable_expert_parallel=True without "
            "ep_size resolves to): transformers' engine refuses a tensor-parallel size without plan rules after the "
            "process group has started. Leave tp_plan unset (our plan splits MLA by heads; ep_size still splits the "
            f"experts), or give the ranks batches of their own with fsdp_size={dc.tp_size} instead of tp_size."
        )
    if dc.tp_size > 1 and config.num_attention_heads % dc.tp_size:
        # the plan splits the attention projections by heads; an uneven split fails in the first forward, after loading
        raise ValueError(
            f"DistributedConfig tp_size={dc.tp_size} does not divide the model's num_attention_heads="
            f"{config.num_attention_heads}: each tensor-parallel rank computes a whole number of heads."
        )
    if dc.ep_size > 1:
        _check_ep_implementation(dc.ep_implementation)
    grouped = config.plugin("topk_method").group_limited  # the router's class says so, whatever its name
    if dc.ep_size > 1 and grouped and not expert_placement.groups_align_with_ranks(config.n_group, dc.ep_size):
        warnings.warn(
            f"ep_size={dc.ep_size} and n_group={config.n_group}: neither divides the other, so routing groups straddle "
            f"expert-parallel ranks and group-limited routing (topk_group={config.topk_group}) no longer keeps a token "
            f"on {config.topk_group} groups' ranks: it can reach {expert_placement.max_destination_ranks(config, dc.ep_size)} "
            f"of the {dc.ep_size} ranks.",
            UserWarning,
            stacklevel=3,
        )
    overrides = {name: getattr(dc, name) for name in ("ep_plan", "tp_plan", "fsdp_plan") if isinstance(getattr(dc, name), dict)}
    _check_plan_styles(overrides)
    if overrides:
        names = parallel_plans.wildcard_names(_meta_model(model_class, config))
        for plan_name, plan in overrides.items():
            if unknown := parallel_plans.unmatched_rules(plan, names):
                raise ValueError(
                    f"DistributedConfig {plan_name} names {unknown}, which {model_class.__name__} does not have "
                    "(rules name modules or parameters from the top model, `*` for a layer number, e.g. "
                    "'model.layers.*.mlp.experts')."
                )


def _check_weights_shardable(config, product: str) -> None:
    """Weights stored in FP8 (an FP8 folder) do not go through the engine's sharded load: after loading, the
    quantizer reads every layer's scale grid at once, and under the engine they are DTensors of different meshes
    (the load fails there, with either `dequantize`); dequantizing then replaces layers the engine has already
    sharded and FSDP-wrapped. The same weights in bf16 shard like any others."""
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    if method in (OFFICIAL_QUANT_METHOD, QUANT_METHOD):
        raise ValueError(
            f"DistributedConfig sizes {product}: the checkpoint's weights are stored in FP8 (quantization_config "
            f"quant_method={method!r}, as the released DeepSeek-V3 folders), which the sharded load does not take. "
            "Convert the folder to bf16 once, shard by shard (`deepseek-v3-convert SRC DST --to bf16`), and load that "
            "with the DistributedConfig; FP8 training of it is `quantizer='fp8_block', fp8_mode='train'`."
        )


def _check_ep_implementation(name: str) -> None:
    """transformers checks the name only when it installs the experts' forward, after the process group and the load."""
    from transformers.distributed.expert_parallel import EPImplementationInterface

    names = list(EPImplementationInterface())
    if name not in names:
        raise ValueError(
            f"DistributedConfig ep_implementation={name!r} names no registered implementation; the registered ones are "
            f"{names} (register another with transformers' EPImplementationInterface.register)."
        )


def _check_plan_styles(plans: dict) -> None:
    """Each rule's style is one transformers knows (it checks them after the process group has started)."""
    # the styles are registered as their modules are imported, which the engine does only once it runs
    from transformers.distributed import expert_parallel, tensor_parallel  # noqa: F401
    from transformers.distributed.fsdp import ALL_FSDP_STYLES
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    for plan_name, plan in plans.items():
        styles = ALL_FSDP_STYLES if plan_name == "fsdp_plan" else ALL_PARALLEL_STYLES
        if unknown := {rule: style for rule, style in plan.items() if not isinstance(style, str) or style not in styles}:
            raise ValueError(
                f"DistributedConfig {plan_name} gives unknown style(s) {unknown}; the {plan_name} styles are {sorted(styles)}."
            )


def _meta_model(model_class, config):
    """The model's module tree on the meta device (no memory), with just enough layers to show every name a plan can
    use: the dense ones, one MoE layer and the MTP modules."""
    small = config.__class__.from_dict(config.to_dict())
    small.num_hidden_layers = min(config.num_hidden_layers, config.first_k_dense_replace + 1)
    with torch.device("meta"):
        return model_class(small)


@torch.no_grad()
def sync_initialized_parameters(model, missing_keys) -> None:
    """Make the parameters ``from_pretrained`` initialised (``missing_keys``: a classification head over a causal-LM
    checkpoint, MTP modules the checkpoint lacks) identical on the ranks that hold the same copy of them.

    Each rank draws its own random values, which is harmless where a rank holds its own shard, but a parameter that
    the engine leaves whole (a plain tensor on every rank, as the head under tensor parallelism) or replicates along
    a mesh dimension would differ between the ranks sharing a batch: they would compute different outputs. Rank 0's
    values (of the world, or of each replicating group) are broadcast. Every rank must call it (from_pretrained does)."""
    from torch.distributed.tensor import DTensor

    dc = getattr(model.config, "distributed_config", None)
    if not missing_keys or dc is None or not (dist.is_available() and dist.is_initialized()):
        return
    if dc.pp_size > 1:
        return  # a stage's parameters live on that stage only: there is no world-wide copy to agree on
    parameters = dict(model.named_parameters())
    for name in sorted(missing_keys):  # the same order on every rank
        parameter = parameters.get(name)
        if parameter is None:
            continue
        if not isinstance(parameter, DTensor):
            dist.broadcast(parameter.data, src=0)
            continue
        local = parameter.to_local()
        for dim, placement in enumerate(parameter.placements):
            if placement.is_replicate():
                group = parameter.device_mesh.get_group(dim)
                dist.broadcast(local, src=dist.get_global_rank(group, 0), group=group)


def batch_replicas(model) -> int:
    """How many ranks hold each batch of ``model`` (its tensor-parallel group: those ranks run the same tokens
    through the replicated routers). 1 for a model transformers did not shard."""
    dc = getattr(model.config, "distributed_config", None)
    if dc is None:
        return 1
    if dc.pp_size > 1:
        raise ValueError(
            f"pp_size={dc.pp_size}: transformers' pipeline parallelism runs inference only; each stage holds some of the "
            "routers, so there are no whole-model loads to balance. Train with ep_size/fsdp_size/tp_size instead."
        )
    return dc.tp_size


__all__ = [
    "check_distributed_config",
    "resolve_model_config",
    "batch_replicas",
    "sync_initialized_parameters",
    "world_size",
    "as_distributed_config",
]
