"""The private transformers and torch APIs this package relies on, in one place.

Everything else in the package uses public APIs. The few hooks below are not public: transformers may rename or
re-sign them in any release. Each is reached only through this module, and :func:`check` verifies, for the
installed versions, that every one exists with the parameters we call it with; ``tests/test_compat.py`` runs it, so
an incompatible release fails one test whose message names the API instead of breaking somewhere deep in loading,
pushing, generation or training.

=========================================================  ===========================================================
private API                                                what we use it for
=========================================================  ===========================================================
``PreTrainedModel._load_pretrained_model``                 header checks of every checkpoint file before transformers
                                                           reads tensors, the MTP report after (``checkpoint``)
``PreTrainedModel._upload_modified_files``                 our model card replaces transformers' placeholder
                                                           ``README.md`` before ``push_to_hub`` uploads
``GenerationMixin._get_candidate_generator``               ``generate(..., use_mtp=True)``: our MTP drafter inside
                                                           transformers' assisted-decoding loop
dataclass fields of transformers' ``DeepseekV3Config``     the defaults of the official fields, to validate a config
                                                           before transformers' own ``__init__`` runs
``torch._C._current_graph_task_id``                        whether the autograd engine is running a backward pass
                                                           (activation-checkpoint recomputation must not count tokens)
=========================================================  ===========================================================
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from transformers import DeepseekV3Config as TransformersDeepseekV3Config
from transformers.generation import GenerationMixin
from transformers.modeling_utils import PreTrainedModel


class IncompatibleVersionError(RuntimeError):
    """An installed transformers or torch lacks a private API this package relies on; the message names it."""


# name -> (owner, attribute, parameters we pass by name)
_HOOKS = {
    "PreTrainedModel._load_pretrained_model": (PreTrainedModel, "_load_pretrained_model", ("model", "state_dict", "checkpoint_files", "load_config")),
    "PreTrainedModel._upload_modified_files": (PreTrainedModel, "_upload_modified_files", ("working_dir", "repo_id")),
    "GenerationMixin._get_candidate_generator": (GenerationMixin, "_get_candidate_generator", ("generation_config",)),
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
    if not callable(getattr(torch._C, "_current_graph_task_id", None)):
        problems.append("torch._C._current_graph_task_id does not exist")
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


def in_backward_pass() -> bool:
    """True while the autograd engine runs a backward pass (never inside a compiled graph, see the router)."""
    return torch._C._current_graph_task_id() != -1


__all__ = ["IncompatibleVersionError", "base_load_pretrained_model", "check", "in_backward_pass", "official_field_defaults"]
