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
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from . import compat, parallel_plans
from .layers import DeepseekV3Experts
from .quantization.experts import FP8Experts
from .quantization.formats import FP8_DTYPE
from .quantization.linear import FP8Linear, check_dequantize_dtype
from .quantization.lora import FP8LoraLinear, register_fp8_lora_layers
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
    # the parameters the user listed, not those "all-linear" adds (which exclude_modules may leave out entirely)
    listed_parameters = bool(config.target_parameters)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # PEFT's own expansion knows nn.Linear only, not FP8Linear
        config.target_modules, config.target_parameters = _all_linear(model, config.target_parameters)
    _check_scaling(config)
    _check_target_modules(model, config)
    _check_target_parameters(model, config)
    config.target_parameters = _select_target_parameters(model, config, listed_parameters)
    _check_init(model, config)
    _check_patterns(model, config)
    _check_modules_to_save(model, config.modules_to_save, config.task_type)
    return register_fp8_lora_layers(config)


def _named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of ``model`` as it is without adapters: a layer PEFT has wrapped (a LoRA layer, a
    ``modules_to_save`` or trainable-token wrapper) reads as the module it wraps, under the wrapped name, and the
    adapters' own modules are left out. A second adapter (``add_adapter``, ``load_adapter``) targets those names and
    PEFT adds it to the layers already wrapped, so its config is checked against the same model as the first one."""
    modules = {}

    def visit(name: str, module: nn.Module) -> None:
        while isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
        modules[name] = module
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return modules


def _linear_leaf_names(model: nn.Module) -> list[str]:
    return sorted({name.rpartition(".")[2] for name, m in _named_modules(model).items() if isinstance(m, (nn.Linear, FP8Linear))})


def _peft_renamed_targets(model: nn.Module) -> set[str]:
    """The ``target_modules`` names PEFT rewrites for this model before matching anything: for DeepSeek-V3 (as for
    Qwen2-MoE) ``gate_proj``/``up_proj``/``down_proj`` become the routed experts' stacked parameters and ``gate`` the
    router's weight, wherever they occur, a full module path included (an adapter of the per-expert Linear layers
    of older transformers then still loads)."""
    return compat.peft_renamed_targets(getattr(getattr(model, "config", None), "model_type", None))


def _all_linear(model: nn.Module, target_parameters) -> tuple[set[str], list[str] | None]:
    """``"all-linear"`` as (target_modules, target_parameters): every Linear but the output head, and the stacked
    routed experts (Linear layers in the per-expert layout, which PEFT's own "all-linear" adapts too).

    The dense and shared-expert MLP projections cannot be target modules: PEFT would rewrite their names into the
    routed experts' parameters and leave the projections themselves without an adapter. They are adapted as
    target parameters (``<module>.weight``) instead, which PEFT does not rewrite."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, AuxiliaryTrainingWrapper):  # the head is in `modules_to_save` of an adapter already there
        head = head.original_module
    renamed = _peft_renamed_targets(model)
    modules, parameters = set(), list(target_parameters or [])
    for name, module in _named_modules(model).items():
        if not isinstance(module, (nn.Linear, FP8Linear)) or module is head:
            continue
        if name.rpartition(".")[2] not in renamed:
            modules.add(name)
        elif isinstance(module, FP8Linear):
            raise ValueError(
                f"LoRA target_modules='all-linear': {name} is stored in FP8 (FP8Linear), and PEFT rewrites target "
                f"modules named {sorted(renamed)} into the routed experts' parameters, so it could only be adapted as "
                "a target parameter, which would add the update to FP8 bytes scaled per block. List the modules to "
                "adapt instead (e.g. the attention projections), or load with DeepseekV3FP8Config(dequantize=True)."
            )
        else:
            parameters.append(f"{name}.weight")
    for module in _named_modules(model).values():
        if isinstance(module, DeepseekV3Experts):
            parameters.extend(p for p in STACKED_EXPERT_PARAMETERS if p not in parameters)
            break
    return modules, (parameters or None)


# Module types PEFT's LoRA adapts (FP8Linear through the layer registered by `register_fp8_lora_layers`).
def _lora_module_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D, FP8Linear)


def _check_matched_modules(
    model: nn.Module, config: LoraConfig, target: str, matched: dict[str, nn.Module], renamed: set[str]
) -> None:
    """Each module a target name or pattern reaches must be one LoRA adapts; PEFT's own error prints the module's
    whole repr (a decoder layer's runs to pages) and not its name."""
    supported = _lora_module_types()
    for name, module in matched.items():
        if name.rpartition(".")[2] in renamed:
            continue  # PEFT turns it into a target parameter (the router's weight, the stacked experts)
        if _excluded(config, name) or not _in_transformed_layers(config, name):
            # PEFT leaves it out: `exclude_modules` is how a tensor-parallel "all-linear" drops o_proj
            continue
        if isinstance(module, ExpertsPlugin):
            raise ValueError(
                f"LoRA target module {target!r} reaches {name}, the routed experts module, whose weights are stacked "
                f"tensors, not Linear layers: adapt them with target_parameters={list(STACKED_EXPERT_PARAMETERS)}."
            )
        if not isinstance(module, supported):
            raise ValueError(
                f"LoRA target module {target!r} reaches {name} ({type(module).__name__}), which LoRA cannot adapt (it "
                f"adapts Linear and Embedding layers). Linear layers of {type(model).__name__}: "
                f"{_linear_leaf_names(model)}."
            )
        _check_module_follows_tensor_parallel(model, name)


# Tensor-parallel styles whose split PEFT's LoRA layer follows: it shards lora_B like a column-wise base layer and
# the embedding's adapter like a row-wise embedding; a module the plan does not name is whole on every rank.
_LORA_TP_STYLES = (None, "colwise", "embedding_rowwise")
_LORA_TP_FAILURES = {
    "rowwise": "PEFT gives its lora_A this rank's input width as in_features, which transformers' row-wise forward "
    "reads as the whole width: the forward fails on a shape mismatch",
    "mla_kv_a_proj": "PEFT adds the adapter's output beside the layer's own, after the all-reduce the style puts on the "
    "gradient of the rotary key: the adapter's gradients would miss the other ranks' share (silently wrong training)",
    "colwise_gather_output": "PEFT adds this rank's slice of the adapter's output to the gathered output: the forward "
    "fails on a shape mismatch",
}


def _split_sizes(model: nn.Module) -> dict[str, int]:
    """The ``ep_size`` and ``tp_size`` above 1 that transformers' engine split ``model`` with."""
    distributed_config = getattr(getattr(model, "config", None), "distributed_config", None)
    sizes = {name: getattr(distributed_config, name, 1) for name in ("ep_size", "tp_size")}
    return {name: size for name, size in sizes.items() if isinstance(size, int) and size > 1}


def _tensor_parallel(model: nn.Module) -> tuple[int, dict]:
    """The ``tp_size`` transformers' engine split ``model`` with (1 when it did not) and the plan it applied."""
    size = _split_sizes(model).get("tp_size", 1)
    return (size, dict(getattr(model, "tp_plan", None) or {})) if size > 1 else (1, {})


def _check_module_follows_tensor_parallel(model: nn.Module, name: str) -> None:
    """Under ``tp_size`` PEFT reads the engine's plan by module name (as this does) and splits the adapter of a
    column-wise layer like the layer; an adapter over another style is wrong in shape or in its gradient (the same
    with transformers' own class on the layers its plan splits that way)."""
    size, plan = _tensor_parallel(model)
    style = plan.get(parallel_plans.wildcard(name))
    if size == 1 or style in _LORA_TP_STYLES:
        return
    supported = sorted({n.rpartition(".")[2] for n, m in _named_modules(model).items()
                        if isinstance(m, (nn.Linear, FP8Linear, nn.Embedding))
                        and plan.get(parallel_plans.wildcard(n)) in _LORA_TP_STYLES}
                       - _peft_renamed_targets(model))
    reason = _LORA_TP_FAILURES.get(style, "PEFT's LoRA layer follows the colwise and embedding_rowwise styles only")
    raise ValueError(
        f"LoRA target module {name}: DistributedConfig(tp_size={size}) splits it with the {style!r} tensor-parallel "
        f"style, and {reason}. Under tensor parallelism LoRA adapts the modules split column-wise or kept whole on "
        f"every rank ({supported}): leave it out (e.g. exclude_modules={[name.rpartition('.')[2]]} beside "
        "\"all-linear\"), or load with fsdp_size instead of tp_size (FSDP gathers whole weights for each forward) to "
        "adapt it."
    )


def _check_scaling(config: LoraConfig) -> None:
    """A ``lora_alpha`` of 0 makes the scaling 0: the adapters add nothing and receive no gradient, so training
    would run and change nothing."""
    for where, alpha in [("lora_alpha", config.lora_alpha), *(
        (f"alpha_pattern[{key!r}]", value) for key, value in (config.alpha_pattern or {}).items()
    )]:
        if alpha == 0:
            raise ValueError(
                f"LoRA `{where}` is 0: the adapter's update is scaled by lora_alpha / r, so it would add nothing and "
                "get no gradient (training would change nothing). Use a non-zero value, e.g. lora_alpha = 2·r."
            )


def _check_patterns(model: nn.Module, config: LoraConfig) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key must match a module or parameter name, as PEFT matches it (a
    regular expression for the end of the name); PEFT ignores a key that matches nothing."""
    modules = _named_modules(model)
    names = [*modules, *(f"{name}.{param}" if name else param for name, module in modules.items()
                         for param, _ in module.named_parameters(recurse=False))]
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, field_name, None) or {}:
            try:
                found = any(re.match(rf"(.*\.)?({key})$", name) for name in names)
            except re.error as error:
                raise ValueError(f"LoRA `{field_name}` key {key!r} is not a valid regular expression: {error}.") from None
            if not found:
                raise ValueError(
                    f"LoRA `{field_name}` key {key!r} matches no module or parameter of {type(model).__name__}, so it "
                    f"would change nothing. Keys end a module name (e.g. 'q_a_proj' or r'layers\\.0\\..*o_proj'); "
                    f"Linear layers it has: {_linear_leaf_names(model)}."
                )


# The names PEFT's task models (PeftModelForSequenceClassification, ...ForTokenClassification) add to the config's
# `modules_to_save` themselves, so that the new head trains whatever a model calls it; the adapter config is saved
# with them. Our heads are `score`: `classifier` matches nothing, and is PEFT's, not a misspelt name of the user's.
_PEFT_TASK_HEAD_NAMES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def _check_modules_to_save(model: nn.Module, modules_to_save, task_type=None) -> None:
    """PEFT trains and saves every module whose name ends with an entry of ``modules_to_save``, and skips an entry
    that matches nothing: that module would silently stay frozen and out of the saved adapter."""
    if not modules_to_save:
        return
    if isinstance(modules_to_save, str):
        raise ValueError(f"LoRA `modules_to_save` must be a list of module names, got the string {modules_to_save!r}.")
    names = list(_named_modules(model))
    peft_heads = _PEFT_TASK_HEAD_NAMES.get(task_type, ())
    for entry in modules_to_save:
        if entry not in peft_heads and not any(name.endswith(entry) for name in names):
            raise ValueError(
                f"LoRA `modules_to_save` entry {entry!r} matches no module of {type(model).__name__}, so nothing would "
                "be trained and saved for it (e.g. 'lm_head', 'embed_tokens')."
            )


def _check_target_modules(model: nn.Module, config: LoraConfig) -> None:
    targets = config.target_modules
    if targets is None:
        return
    modules = _named_modules(model)
    renamed = _peft_renamed_targets(model)
    if isinstance(targets, str):
        matched = {name: m for name, m in modules.items() if re.fullmatch(targets, name)}
        if not matched:
            raise ValueError(
                f"LoRA target_modules pattern {targets!r} matches no module of {type(model).__name__}. A string is a "
                "regular expression matched against whole module names (e.g. r'.*\\.q_a_proj'); pass a list for "
                "module names (e.g. ['q_a_proj'])."
            )
        _check_matched_modules(model, config, targets, matched, renamed)
        return
    for target in sorted(targets):
        matched = {name: m for name, m in modules.items() if name == target or name.endswith("." + target)}
        if not matched:
            raise ValueError(
                f"LoRA target module {target!r} matches no module of {type(model).__name__}. "
                + _expert_hint(target)
                + f"Linear layers it has: {_linear_leaf_names(model)}."
            )
        if any(isinstance(m, ExpertsPlugin) for m in matched.values()):
            raise ValueError(
                f"LoRA target module {target!r} is the routed experts module, whose weights are stacked tensors, not "
                f"Linear layers: adapt them with target_parameters={list(STACKED_EXPERT_PARAMETERS)}."
            )
        _check_matched_modules(model, config, target, matched, renamed)


def _expert_hint(name: str) -> str:
    if _PER_EXPERT_NAME.search(name):
        return (
            "The routed experts are stacked in the model (mlp.experts.gate_up_proj [E, 2I, H] and mlp.experts.down_proj "
            "[E, H, I]); the per-expert names exist only in checkpoint files. Use "
            f"target_parameters={list(STACKED_EXPERT_PARAMETERS)}. "
        )
    return ""


def _check_target_parameters(model: nn.Module, config: LoraConfig) -> None:
    targets = config.target_parameters
    if not targets:
        return
    owners = _parameter_owners(model)
    for target in sorted(targets):
        matched = {key: m for key, m in owners.items() if key == target or key.endswith("." + target)}
        if not matched:
            regex = " target_parameters are names, not regular expressions." if re.search(r"[*+?\[\]()|^$\\]", target) else ""
            raise ValueError(
                f"LoRA target parameter {target!r} matches no parameter of {type(model).__name__}.{regex} "
                + _expert_hint(target)
                + f"Stacked expert parameters: {list(STACKED_EXPERT_PARAMETERS)}."
            )
        for key, module in matched.items():
            if _excluded(config, key.rpartition(".")[0]) or not _in_transformed_layers(config, key.rpartition(".")[0]):
                continue  # left out by `_select_target_parameters` below
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
            if isinstance(module, DeepseekV3Experts):
                _check_experts_not_split(model, key)
            _check_parameter_not_split(model, key)
            param = getattr(module, key.rpartition(".")[2])
            if isinstance(module, FP8Linear) or param.dtype == FP8_DTYPE:
                # PEFT's parameter LoRA adds ΔW to the stored tensor: to e4m3 bytes that are scaled per block
                raise ValueError(
                    f"LoRA target parameter {key!r} is stored in FP8 ({type(module).__name__}): an adapter cannot be "
                    "added to FP8 bytes scaled per block. Target the module instead "
                    f"(target_modules=[{key.rpartition('.')[0].rpartition('.')[2]!r}]), which puts the FP8 LoRA layer "
                    "over it."
                )
            if param.dim() not in (2, 3):
                raise ValueError(
                    f"LoRA target parameter {key!r} has shape {list(param.shape)}: LoRA adapts a matrix [out, in] or "
                    "stacked matrices [experts, out, in]."
                )


def _check_experts_not_split(model: nn.Module, key: str) -> None:
    """PEFT's parameter LoRA adds one [E, out, in] update to the whole stacked tensor. Split by transformers'
    distributed engine over expert-parallel ranks (each holds a block of experts) or tensor-parallel ranks (each a
    slice of every expert), the tensor is a DTensor the update cannot be added to: the forward failed mixing a
    DTensor with PEFT's plain tensors (ep_size) or get_peft_model found no `weight` (tp_size). FSDP alone gathers
    whole experts for each forward, so the update applies there."""
    split = _split_sizes(model)
    if split:
        sizes = ", ".join(f"{name}={size}" for name, size in split.items())
        raise ValueError(
            f"LoRA target parameter {key!r}: the routed experts are split over ranks by DistributedConfig({sizes}), "
            "and PEFT's per-expert update cannot be added to a sharded stacked tensor. Load with fsdp_size only "
            "(FSDP gathers whole experts for each forward) for LoRA on the experts, or leave them out of "
            "target_parameters."
        )


def _check_parameter_not_split(model: nn.Module, key: str) -> None:
    """PEFT's parameter LoRA adds a whole [out, in] update to the weight, which a tensor-parallel rank holds a slice
    of (a DTensor): the forward failed mixing a DTensor with PEFT's plain update."""
    size, plan = _tensor_parallel(model)
    module_name = key.rpartition(".")[0]
    style = plan.get(parallel_plans.wildcard(key)) or plan.get(parallel_plans.wildcard(module_name))
    if size > 1 and style is not None:
        raise ValueError(
            f"LoRA target parameter {key!r}: DistributedConfig(tp_size={size}) splits it with the {style!r} "
            "tensor-parallel style, and PEFT's update of the whole tensor cannot be added to a rank's slice. Load with "
            "fsdp_size instead of tp_size (FSDP gathers whole weights for each forward), or leave it out of "
            "target_parameters."
        )


def _parameter_owners(model: nn.Module) -> dict[str, nn.Module]:
    """``{"module.param": owning module}`` of ``model`` as it is without adapters."""
    owners = {}
    for module_name, module in _named_modules(model).items():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = module
    return owners


def _matched_parameters(model: nn.Module, targets) -> list[str]:
    """The full names of the parameters ``targets`` reaches, matched as PEFT matches them (the name or its end)."""
    return sorted(key for key in _parameter_owners(model)
                  if any(key == target or key.endswith("." + target) for target in targets))


def _excluded(config: LoraConfig, module_name: str) -> bool:
    """``module_name`` is left out by ``exclude_modules``, read as PEFT reads it for target modules."""
    exclude = getattr(config, "exclude_modules", None)
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, module_name) is not None
    return any(module_name == entry or module_name.endswith("." + entry) for entry in exclude)


def _in_transformed_layers(config: LoraConfig, module_name: str) -> bool:
    """``module_name`` sits in a layer of ``layers_to_transform`` (all of them when unset), the layer index found
    as PEFT finds it for target modules: the first numbered name segment, or the one after ``layers_pattern``."""
    indexes = getattr(config, "layers_to_transform", None)
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = getattr(config, "layers_pattern", None)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    key = module_name + "."
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        matches = (re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key) for pattern in patterns)
        match = next((m for m in matches if m is not None), None)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def _select_target_parameters(model: nn.Module, config: LoraConfig, listed: bool = True):
    """``target_parameters`` with ``exclude_modules`` and ``layers_to_transform`` applied. PEFT applies them to
    target modules only and adapts every parameter a target name reaches, in every layer (for transformers' own class
    too), so ``layers_to_transform=[3]`` with the stacked experts would still adapt the experts of every MoE layer and
    MTP module, and ``exclude_modules`` would not keep an adapter off the dense MLPs ``"all-linear"`` adapts through
    their weights. When they leave some parameters out, the kept ones are listed by their full names (which PEFT
    matches exactly, and which the saved adapter config carries, so a reload adapts the same ones)."""
    targets = config.target_parameters
    if not targets:
        return targets
    matched = _matched_parameters(model, targets)
    kept = [key for key in matched
            if not _excluded(config, key.rpartition(".")[0]) and _in_transformed_layers(config, key.rpartition(".")[0])]
    if len(kept) == len(matched):
        return targets
    if not kept and not listed:
        return None  # "all-linear" with every MLP and the experts excluded (under tensor parallelism, say)
    if not kept:
        selection = " and ".join(f"{field}={getattr(config, field)!r}" for field in ("exclude_modules", "layers_to_transform")
                                 if getattr(config, field, None) not in (None, []))
        raise ValueError(
            f"LoRA target_parameters {sorted(targets)}: {selection} leave out every parameter they reach "
            f"({', '.join(matched)}), so none would be adapted."
        )
    return kept


# `init_lora_weights` values whose initialisation reads the adapted layer's weight matrix (an SVD, a QR, a
# quantization of it): PEFT reads `.weight` of the module holding a target parameter, which the stacked experts do
# not have (their tensors are `gate_up_proj` and `down_proj`, one matrix per expert), and fails with an
# AttributeError naming neither the option nor the parameter.
_WEIGHT_READING_INITS = ("pissa", "corda", "olora", "loftq", "orthogonal", "lora_ga")


def _check_init(model: nn.Module, config: LoraConfig) -> None:
    init = config.init_lora_weights
    if not isinstance(init, str) or not init.lower().startswith(_WEIGHT_READING_INITS) or not config.target_parameters:
        return
    owners = _parameter_owners(model)
    stacked = [key for key in _matched_parameters(model, config.target_parameters)
               if isinstance(owners[key], DeepseekV3Experts)]
    if stacked:
        more = f" and {len(stacked) - 1} more" if len(stacked) > 1 else ""
        raise ValueError(
            f"LoRA `init_lora_weights={init!r}` initialises an adapter from its layer's weight matrix, which PEFT "
            f"cannot do for the stacked routed-expert tensor {stacked[0]!r}{more}, one matrix per expert. Use "
            "init_lora_weights=True or 'gaussian' with the experts, or leave them out of target_parameters "
            "(with target_modules='all-linear': exclude_modules=['experts'])."
        )


def set_fp8_merge(model: nn.Module, fp8: str = "requantize", dtype: torch.dtype = torch.bfloat16) -> list[FP8LoraLinear]:
    """Choose how every ``FP8LoraLinear`` of ``model`` merges: ``"requantize"`` back into FP8, or ``"dequantize"``
    into ``nn.Linear`` of ``dtype``. Returns those layers."""
    if fp8 not in FP8_MERGES:
        raise ValueError(f"`fp8` must be one of {list(FP8_MERGES)}, got {fp8!r}.")
    check_dequantize_dtype(dtype)
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
    cast to ``dtype`` (the routers' fp32 bias stays fp32): the model's own ``dequantize`` (either kind of FP8 model),
    a plain cast for a model that holds no FP8 layers."""
    check_dequantize_dtype(dtype)
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantizer", None) is None:
        return model.to(dtype)
    return model.dequantize(dtype)


__all__ = ["FP8_MERGES", "STACKED_EXPERT_PARAMETERS", "dequantize_model", "merge_and_unload", "prepare_lora_config",
           "set_fp8_merge"]
