"""The private transformers, huggingface_hub, PEFT, accelerate and torch APIs this package relies on, in one place.

Everything else in the package uses public APIs. The few hooks below are not public: transformers, huggingface_hub,
PEFT or accelerate may rename or re-sign them in any release. Each is reached only through this module, and
:func:`check` verifies, for the installed versions, that every one exists with the parameters we call it with;
``tests/test_compat.py`` runs it, so an incompatible release fails one test whose message names the API instead of
breaking somewhere deep in loading, pushing, generation or training.

=========================================================  ===========================================================
private API                                                what we use it for
=========================================================  ===========================================================
``PreTrainedModel._load_pretrained_model``                 header checks of every checkpoint file before transformers
                                                           reads tensors, the MTP report after (``checkpoint``)
``PreTrainedModel._upload_modified_files``                 our model card replaces transformers' placeholder
                                                           ``README.md`` before ``push_to_hub`` uploads
``PreTrainedModel._grouped_mm_can_dispatch``               ``grouped_mm`` refused (named) for expert widths torch's
                                                           grouped GEMM cannot align; the default then falls back
``PreTrainedModel._can_set_experts_implementation``        says our model takes ``set_experts_implementation`` (its
                                                           experts module lives in ``layers.py``, not the model's file)
``GenerationMixin._get_candidate_generator``               ``generate(..., use_mtp=True)``: our MTP drafter inside
                                                           transformers' assisted-decoding loop
``GenerationMixin._assisted_decoding``                     ``generate(..., use_mtp=True)`` over a static cache runs
                                                           our loop instead (``speculative``); any other cache goes
                                                           on to transformers' loop
``GenerationMixin._valid_auto_compile_criteria``           whether that loop compiles its forward, decided as
                                                           transformers' decoding loop decides it
``GenerationMixin._optimize_model_for_decode``             generate's switch of ``grouped_mm`` experts to ``batched_mm``
                                                           for decoding, skipped for experts stored in FP8
``StaticLayer.cumulative_length``                          a static cache layer's length as a device tensor, which
                                                           that loop lowers to forget rejected drafts (no host read)
``GenerationConfig._mask_length``                          the prompt's length generate records when it drops an
                                                           all-ones mask: assisted decoding over a cached prefix skips
                                                           that prefix as transformers' prefill does
``GenericFor{Sequence,Token}Classification``              the generic heads' forward without ``can_return_tuple``,
``.forward.__wrapped__``                                   which our classification heads run and extend
dataclass fields of transformers' ``DeepseekV3Config``     the defaults of the official fields, to validate a config
                                                           before transformers' own ``__init__`` runs
``output_capturing._active_collector``                     the MTP draft step runs with output capturing off, so a
                                                           compiled draft step does not read a ``ContextVar``
PEFT's ``_MODEL_TO_CONVERSION_PATTERN``,                   the ``target_modules`` names PEFT rewrites into the routed
``_MOE_TARGET_MODULE_MAPPING``, ``_MOE_FUSED_TARGETS``     experts' parameters for this model type (``lora``); checked
                                                           only where PEFT is installed
``huggingface_hub.serialization._base.parse_size_to_int``  the shard splitter's reading of ``max_shard_size``, to refuse
                                                           a size it cannot parse before the save starts
``torch._C._nn._parse_to``                                 the dtype of a ``model.to(...)`` call, read as ``nn.Module.to``
                                                           reads it (a float8 cast is refused)
``torch._C._current_graph_task_id``                        whether the autograd engine is running a backward pass
                                                           (activation-checkpoint recomputation must not count tokens)
``torch.nn.Module._forward_hooks``                         the forward hooks on a module, to tell whether a TRL
                                                           trainer's balance-loss tap hooks the model (``training``)
accelerate's ``module._hf_hook.weights_map``               the offload store of a module accelerate offloaded, whose
                                                           tensors are meta outside its forward (saving, scale checks)
torch's ``CheckpointWrapper._checkpoint_wrapped_module``   whether activation checkpointing wraps the layers (accelerate's
                                                           FSDP ``activation_checkpointing``): training builds no cache
=========================================================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from huggingface_hub.serialization import _base as hub_serialization
from transformers import DeepseekV3Config as TransformersDeepseekV3Config
from transformers.cache_utils import StaticLayer
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import output_capturing


class IncompatibleVersionError(RuntimeError):
    """An installed transformers or torch lacks a private API this package relies on; the message names it."""


# name -> (owner, attribute, parameters we pass by name)
_HOOKS = {
    "PreTrainedModel._load_pretrained_model": (PreTrainedModel, "_load_pretrained_model", ("model", "state_dict", "checkpoint_files", "load_config")),
    "PreTrainedModel._upload_modified_files": (PreTrainedModel, "_upload_modified_files", ("working_dir", "repo_id")),
    "PreTrainedModel._grouped_mm_can_dispatch": (PreTrainedModel, "_grouped_mm_can_dispatch", ()),
    "PreTrainedModel._can_set_experts_implementation": (PreTrainedModel, "_can_set_experts_implementation", ()),
    "GenerationMixin._get_candidate_generator": (GenerationMixin, "_get_candidate_generator", ("generation_config",)),
    "GenerationMixin._assisted_decoding": (
        GenerationMixin, "_assisted_decoding",
        ("input_ids", "logits_processor", "stopping_criteria", "generation_config", "synced_gpus", "streamer",
         "inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer"),
    ),
    "GenerationMixin._valid_auto_compile_criteria": (
        GenerationMixin, "_valid_auto_compile_criteria", ("model_kwargs", "generation_config")
    ),
    "GenerationMixin._optimize_model_for_decode": (GenerationMixin, "_optimize_model_for_decode", ()),
}


def check() -> None:
    """Raise :class:`IncompatibleVersionError` naming every private API that the installed versions lack."""
    problems = []
    for name, (owner, attribute, parameters) in _HOOKS.items():
        function = getattr(owner, attribute, None)
        if not callable(function):
            problems.append(f"{name} does not exist")
            continue
        signature = inspect.signature(function)
        absent = [p for p in parameters if p not in signature.parameters]
        if absent:
            problems.append(f"{name} has no parameter(s) {absent} (signature {signature})")
    if not dataclasses.is_dataclass(TransformersDeepseekV3Config):
        problems.append("transformers.DeepseekV3Config is not a dataclass (its field defaults are read from it)")
    if not _static_layer_length_is_a_tensor():
        problems.append("StaticLayer.cumulative_length is not the layer's length as a tensor")
    if "_mask_length" not in inspect.get_annotations(GenerationConfig):
        problems.append("GenerationConfig._mask_length does not exist")
    for head in (GenericForSequenceClassification, GenericForTokenClassification):
        if not callable(getattr(head.forward, "__wrapped__", None)):
            problems.append(f"{head.__name__}.forward is not a decorated function (it has no __wrapped__)")
    collector = getattr(output_capturing, "_active_collector", None)
    if not all(callable(getattr(collector, method, None)) for method in ("get", "set", "reset")):
        problems.append("transformers.utils.output_capturing._active_collector (get/set/reset) does not exist")
    problems += _peft_problems()
    if not callable(getattr(hub_serialization, "parse_size_to_int", None)):
        problems.append("huggingface_hub.serialization._base.parse_size_to_int does not exist")
    if not callable(getattr(getattr(torch._C, "_nn", None), "_parse_to", None)):
        problems.append("torch._C._nn._parse_to does not exist")
    if not callable(getattr(torch._C, "_current_graph_task_id", None)):
        problems.append("torch._C._current_graph_task_id does not exist")
    if not _forward_hooks_are_listed():
        problems.append("torch.nn.Module._forward_hooks is not the dict of a module's forward hooks")
    if not _offload_store_is_read():
        problems.append("accelerate's module._hf_hook.weights_map is not the offload store of an AlignDevicesHook")
    if not _checkpoint_wrapper_is_recognised():
        problems.append("torch's checkpoint_wrapper no longer marks the module it wraps as `_checkpoint_wrapped_module`")
    if problems:
        import transformers

        raise IncompatibleVersionError(
            f"modeling_deepseek_v3 relies on private APIs that transformers {transformers.__version__} / torch "
            f"{torch.__version__} lack: {'; '.join(problems)}. Install a supported version (see pyproject.toml)."
        )


def base_load_pretrained_model():
    """transformers' own ``PreTrainedModel._load_pretrained_model`` (ours wraps it)."""
    return PreTrainedModel._load_pretrained_model


def official_field_defaults() -> dict:
    """``{field name: default}`` of transformers' ``DeepseekV3Config`` (the official fields)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(TransformersDeepseekV3Config)
        if f.default is not dataclasses.MISSING
    }


def _static_layer_length_is_a_tensor() -> bool:
    layer = StaticLayer(max_cache_len=4)
    layer.lazy_initialization(torch.zeros(1, 1, 0, 2), torch.zeros(1, 1, 0, 2))
    length = getattr(layer, "cumulative_length", None)
    if not torch.is_tensor(length):
        return False
    layer.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    return layer.get_seq_length() is length and int(length) == 3


def _forward_hooks_are_listed() -> bool:
    module, hook = torch.nn.Module(), print
    module.register_forward_hook(hook)
    return list(forward_hooks(module)) == [hook]


def forward_hooks(module: torch.nn.Module) -> list:
    """The forward hooks registered on ``module`` (``register_forward_hook``), in order."""
    return list(getattr(module, "_forward_hooks", {}).values())


def _offload_store_is_read() -> bool:
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    module, store = torch.nn.Linear(1, 1), {"weight": torch.zeros(1, 1)}
    add_hook_to_module(module, AlignDevicesHook(weights_map=store))
    return offload_store(module) is store


def offload_store(module: torch.nn.Module):
    """The mapping accelerate's offload hook of ``module`` reads its tensors from while it runs (None without one)."""
    return getattr(getattr(module, "_hf_hook", None), "weights_map", None)


def prefill_mask_length(generation_config) -> int:
    """The attention mask's length that ``generate`` recorded when it dropped an all-ones mask (-1 when it did not):
    its prefill compares it with the input's length to tell a whole prompt from its new tokens only."""
    return getattr(generation_config, "_mask_length", -1)


def undecorated_forward(head: type):
    """``head.forward`` (a transformers generic head) without its output decorator ``can_return_tuple``."""
    return head.forward.__wrapped__


def auto_compile_applies(model, model_kwargs: dict, generation_config) -> bool:
    """Whether transformers' decoding loop would compile the forward for these ``generate`` arguments (a static cache,
    an accelerator or ``compile_config``'s all-devices flag, no ``disable_compile``)."""
    return model._valid_auto_compile_criteria(model_kwargs, generation_config)


def static_layer_length(layer: StaticLayer) -> torch.Tensor:
    """A static cache layer's length, the device tensor its writes and the causal mask start from (lowering it in
    place forgets the last positions: the next write overwrites them)."""
    return layer.cumulative_length


def without_output_capture(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with transformers' output-capturing hooks inactive. Once installed, those hooks
    run on every decoder layer and read the active collector; set here (to none), they read a plain global inside
    ``torch.compile`` instead of a ``ContextVar``, which it cannot trace, as transformers' own compiled forward does."""
    token = output_capturing._active_collector.set(None)
    try:
        return function(*args, **kwargs)
    finally:
        output_capturing._active_collector.reset(token)


_PEFT_MOE_TABLES = ("_MODEL_TO_CONVERSION_PATTERN", "_MOE_TARGET_MODULE_MAPPING", "_MOE_FUSED_TARGETS")


def _peft_moe_tables():
    from peft.utils import transformers_weight_conversion

    return transformers_weight_conversion


def _peft_problems() -> list[str]:
    try:
        tables = _peft_moe_tables()
    except ImportError:  # PEFT is optional (the `finetune` extra); without it nothing here uses the tables
        return []
    return [f"peft.utils.transformers_weight_conversion.{name} is not a dict" for name in _PEFT_MOE_TABLES
            if not isinstance(getattr(tables, name, None), dict)]


def peft_renamed_targets(model_type: str | None) -> set[str]:
    """The ``target_modules`` names that PEFT rewrites, for a model of ``model_type``, into the parameters of the
    stacked MoE layout before it matches anything (as PEFT decides it: the model type has both a name mapping and
    fused targets)."""
    tables = _peft_moe_tables()
    pattern = tables._MODEL_TO_CONVERSION_PATTERN.get(model_type)
    if pattern is None or not tables._MOE_FUSED_TARGETS.get(pattern):
        return set()
    return set(tables._MOE_TARGET_MODULE_MAPPING.get(pattern, {}))


def parse_shard_size(size: str) -> int:
    """Bytes in a ``max_shard_size`` string such as ``'5GB'``, as huggingface_hub's shard splitter reads it (raises
    ``ValueError``, or ``OverflowError`` for an infinite number, where that splitter would fail)."""
    return hub_serialization.parse_size_to_int(size)


def dtype_of_to_call(*args, **kwargs) -> torch.dtype | None:
    """The dtype a ``module.to(*args, **kwargs)`` call casts to (``None`` if it casts none), parsed as torch's own
    ``nn.Module.to`` parses its arguments (a dtype, a tensor, a device and a dtype, keywords)."""
    return torch._C._nn._parse_to(*args, **kwargs)[1]


def _checkpoint_wrapper_is_recognised() -> bool:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    return checkpoint_wrapped(checkpoint_wrapper(torch.nn.Linear(1, 1))) and not checkpoint_wrapped(torch.nn.Linear(1, 1))


def checkpoint_wrapped(module: torch.nn.Module) -> bool:
    """Whether ``module`` is torch's activation-checkpointing wrapper (``checkpoint_wrapper``), which accelerate's
    FSDP ``activation_checkpointing`` and torch's ``apply_activation_checkpointing`` put around each layer. Read as
    accelerate reads it (no import: it runs inside compiled training steps too)."""
    return hasattr(module, "_checkpoint_wrapped_module")


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass (never inside a compiled graph, see the router)."""
    return torch._C._current_graph_task_id() != -1


__all__ = [
    "IncompatibleVersionError", "auto_compile_applies", "base_load_pretrained_model", "check", "checkpoint_wrapped",
    "dtype_of_to_call",
    "forward_hooks", "in_backward_pass", "offload_store", "official_field_defaults", "parse_shard_size",
    "peft_renamed_targets", "prefill_mask_length", "static_layer_length", "undecorated_forward", "without_output_capture",
]
