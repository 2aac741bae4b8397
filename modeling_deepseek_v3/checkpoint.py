"""The released DeepSeek-V3 checkpoint layout, both ways (see docs/checkpoint-format.md).

Loading
    bf16/fp32 folders need nothing special: our parameters sit at the official names. FP8 folders carry
    ``quantization_config = {quant_method: "fp8", fmt: "e4m3", weight_block_size: [128, 128], ...}``.
    transformers maps ``"fp8"`` to its own ``FineGrainedFP8HfQuantizer``, whose layers are not ours and whose
    CPU path rejects sides that are not multiples of 128 (``kv_a_proj_with_mqa`` has 576 rows). So
    ``DeepseekV3Config`` turns that block into a :class:`DeepseekV3FP8Config`, whose ``quant_method`` is the
    key we register with transformers' quantizer registry (``register_quantization_config`` /
    ``register_quantizer``), while its ``to_dict`` writes the official block back unchanged. transformers'
    ``from_pretrained`` then drives :class:`DeepseekV3FP8HfQuantizer` through its normal machinery (index,
    ``dtype``, ``device_map``, meta-device init): before the weights are read it swaps every eligible Linear for
    ``quantization.FP8Linear`` (parameters ``weight`` e4m3 and ``weight_scale_inv`` fp32 — the checkpoint's own
    names, so no renaming is needed and the tensors load byte for byte).

    ``dequantize`` picks the mode, as with transformers' ``FineGrainedFP8Config``: ``False`` keeps FP8;
    ``True`` replaces each ``FP8Linear`` after loading by an ``nn.Linear`` of the load ``dtype`` holding
    ``weight * weight_scale_inv``; ``None`` (default) keeps FP8 when CUDA is available, dequantizes otherwise.
    Pass it as ``from_pretrained(path, quantization_config=DeepseekV3FP8Config(dequantize=True))``
    (``FineGrainedFP8Config(dequantize=True)`` is accepted too). A config that also selects the ``fp8_block``
    quantizer plugin settles it instead: ``fp8_mode='train'`` dequantizes (the plugin then wraps the layers again
    for FP8 training), ``fp8_mode='inference'`` keeps the FP8 bytes; a ``dequantize`` that contradicts it is an error.

    Only safetensors are read: a folder (or an index) whose weights are pickled is refused before anything is
    opened, since unpickling can run code.

    Before any tensor is read, every checkpoint file is checked from its header (:func:`validate_checkpoint_files`):
    truncated/corrupt files, shards the index names but that do not exist, FP8 weights without
    ``weight_scale_inv``, scale grids of the wrong shape, tensors whose shape differs from the model's, FP8 tensors
    that cannot be FP8 storage, an index that does not describe its shards — each is a ``CheckpointError`` naming the
    tensor and the file. After loading, the router biases must be finite.

    MTP modules load from layer ``num_hidden_layers + k``. The copies of ``embed_tokens`` / ``shared_head.head``
    that official checkpoints carry there are not parameters of ours (the MTP modules use the main model's
    tensors), so they are skipped; an MTP module the checkpoint lacks is freshly initialised with a warning.

Saving
    :func:`official_state_dict` adds the per-MTP-layer copies of the embedding and the head (vLLM and SGLang
    read them there). ``save_pretrained`` writes into a temporary sibling folder and renames into place, so an
    interrupted save never leaves a half-written checkpoint, and writes a model card (``README.md``, see
    ``model_card``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from . import compat, model_card
from .fp8_config import QUANT_METHOD, DeepseekV3FP8Config, as_quantization_config
from .checkpoint_io import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    atomic_save,
    check_index_matches,
    check_scale_values,
    load_index,
    read_safetensors_header,
    tensor_locations,
)
from .quantization.experts import FP8Experts
from .quantization.formats import BLOCK, FP8_DTYPE, ceil_div
from .quantization.linear import FP8Linear, FP8TrainingLinear, KeepsStorageDtype
from .quantization.quantizer import is_fp8_eligible
from .registry import ExpertsPlugin

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# the HfQuantizer of the official FP8 block (its config class lives in fp8_config)
# ---------------------------------------------------------------------------------------------------


class DeepseekV3FP8HfQuantizer(HfQuantizer):
    """Loads the official FP8 checkpoint into ``FP8Linear`` layers and ``FP8Experts`` (or dequantizes them, see the
    module doc)."""

    requires_calibration = False  # the checkpoint is already quantized; we never quantize on the fly here
    # Each quantized `weight` is stored with its `weight_scale_inv`: transformers' loader gives every converter of
    # the conversion mapping (the expert stacking) a twin for the scales, which `FP8Experts` keeps as
    # `gate_up_proj_scale_inv` / `down_proj_scale_inv`, and reverses both at save.
    serialized_names = {"weight": ["weight", "weight_scale_inv"]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.load_dtype = None

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError(
                "DeepSeek-V3 FP8 loading needs an FP8 checkpoint. To quantize a bf16 model, use the `fp8_block` quantizer "
                "plugin (`quantizer='fp8_block'`) or the offline converter `python -m modeling_deepseek_v3.quantization.converter`."
            )

    def resolve_dequantize(self, config) -> None:
        """Settle ``dequantize`` once the model's config is known (before any weight is read).

        The ``fp8_block`` quantizer plugin decides it: ``fp8_mode='train'`` trains high-precision master weights, so
        the FP8 checkpoint loads dequantized (and the plugin then wraps the layers again); ``fp8_mode='inference'``
        holds the checkpoint's own FP8 weights. Without the plugin, ``None`` keeps FP8 on a GPU and dequantizes on
        the CPU, where FP8 GEMMs do not pay off."""
        asked = self.quantization_config.dequantize
        mode = config.fp8_mode if config.quantizer == "fp8_block" else None
        needed = {"train": True, "inference": False}.get(mode)
        if needed is not None and asked is not None and asked != needed:
            raise ValueError(
                f"`quantizer='fp8_block'` with `fp8_mode={mode!r}` {'trains high-precision master weights, so an FP8 checkpoint loads into it dequantized' if needed else 'holds the FP8 weights of the checkpoint as they are'}, "
                f"but the quantization config asks for `dequantize={asked}`: drop one of the two."
            )
        if asked is None:
            self.quantization_config.dequantize = needed if needed is not None else not torch.cuda.is_available()
            if needed is None and self.quantization_config.dequantize:
                logger.info("No CUDA device: dequantizing the FP8 checkpoint at load (pass dequantize=False to keep FP8).")

    def update_dtype(self, dtype):
        self.load_dtype = dtype
        return dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def _process_model_before_weight_loading(self, model, **kwargs):
        self.resolve_dequantize(model.config)
        skip = list(self.quantization_config.modules_to_not_convert or ())
        _warn_unmatched_skips(model, skip)
        for name, module in list(model.named_modules()):
            if skip and not should_convert_module(name, skip):
                continue
            # an FP8TrainingLinear of the `fp8_block` plugin too: its checkpoint weights are FP8 like any other's
            if type(module) in (nn.Linear, FP8TrainingLinear) and is_fp8_eligible(name):
                model.set_submodule(name, FP8Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                                    device=module.weight.device))
            elif isinstance(module, ExpertsPlugin) and not isinstance(module, FP8Experts):
                model.set_submodule(name, FP8Experts.from_experts(module))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers' loader makes every floating-point tensor it reads a parameter that requires grad, FP8 bytes
        # included; FP8 storage gets no gradient and a forward with autograd on refuses it, so a plain `model(ids)`
        # failed: it is frozen again, as the layers are built
        for module in model.modules():
            if isinstance(module, KeepsStorageDtype):
                for name in module.storage_dtype_names:
                    getattr(module, name).requires_grad_(False)
        scales = {n: offloaded_values(model, n, p) for n, p in model.named_parameters() if n.endswith("scale_inv")}
        check_scale_values({n: s for n, s in scales.items() if not s.is_meta}, "the checkpoint")
        if self.quantization_config.dequantize:
            self._dequantize(model, self.load_dtype)
            if model.config.quantizer is not None:
                # the `fp8_block` plugin (fp8_mode='train') wraps the dequantized layers again, as at construction
                model.config.plugin("quantizer")(model.config).apply(model)
        return model

    def _dequantize(self, model, dtype=None):
        dtype = dtype or getattr(model.config, "dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        for name, module in list(model.named_modules()):
            if isinstance(module, (FP8Linear, FP8Experts)):
                model.set_submodule(name, module.dequantize(dtype))  # one layer at a time: FP8 storage freed as we go
        return model

    def get_state_dict_and_metadata(self, model):
        # transformers' save path asks the quantizer for the state dict of a quantized model
        return official_state_dict(model), {}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        # transformers' Trainer asks: adapters (PEFT LoRA, quantization.lora) train over the frozen FP8 weights
        return True


def register_with_transformers() -> None:
    """Register our config and quantizer under :data:`QUANT_METHOD`, and the expert stacking (idempotent).

    The stacking is transformers' own conversion mapping for ``deepseek_v3`` (per-expert
    ``mlp.experts.{e}.{gate,up}_proj.weight`` merged over experts and concatenated into ``mlp.experts.gate_up_proj``,
    ``down_proj`` merged into ``mlp.experts.down_proj``; split back on save). transformers applies a model type's
    mapping to classes outside its package only once it is registered by the user, so it is registered again,
    unchanged: transformers' own class keeps exactly the mapping it had.
    """
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DeepseekV3FP8Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DeepseekV3FP8HfQuantizer)
    register_checkpoint_conversion_mapping(
        "deepseek_v3", get_checkpoint_conversion_mapping("deepseek_v3"), overwrite=True
    )


register_with_transformers()


# ---------------------------------------------------------------------------------------------------
# MTP layout
# ---------------------------------------------------------------------------------------------------


def mtp_shared_keys(config) -> dict[str, str]:
    """``{copy name: main name}`` for the embedding/head copies each MTP layer carries in official checkpoints."""
    out = {}
    for k in range(config.num_nextn_predict_layers):
        layer = config.num_hidden_layers + k
        out[f"model.layers.{layer}.embed_tokens.weight"] = "model.embed_tokens.weight"
        out[f"model.layers.{layer}.shared_head.head.weight"] = "lm_head.weight"
    return out


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` plus the MTP layers' copies of the shared embedding and head.

    The copies are clones: safetensors refuses aliased tensors and transformers would drop an alias on save.
    """
    return with_mtp_copies(model.state_dict(), model)


def with_mtp_copies(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` (of ``model``) plus the MTP layers' copies of the shared embedding and head it lacks."""
    if not hasattr(model, "lm_head"):  # base model: no head to copy, and its keys carry no "model." prefix
        return state_dict
    for copy_name, main_name in mtp_shared_keys(model.config).items():
        if main_name in state_dict and copy_name not in state_dict:
            # a tensor accelerate offloaded is meta in the state dict (transformers' save reads the store for the
            # model's own names only): its copy is made from the offload store
            state_dict[copy_name] = offloaded_values(model, main_name, state_dict[main_name]).clone()
    return state_dict


def offloaded_values(model: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The values of ``model``'s tensor ``name``. accelerate keeps a tensor of a module it offloaded (a ``device_map``
    with "disk" entries, or "cpu" ones beside a GPU) on the meta device except while that module runs: its values are
    then read from the offload store of the module's hook (still meta where there is none)."""
    if tensor.is_meta:
        module, _, leaf = name.rpartition(".")
        store = compat.offload_store(model.get_submodule(module))
        if store is not None and leaf in store:
            return store[leaf]
    return tensor.detach()


def report_missing_mtp(model, missing_keys) -> None:
    """Warn once per MTP layer the checkpoint did not provide (those modules keep their fresh initialisation)."""
    config = model.config
    if not config.num_nextn_predict_layers:
        return
    missing_layers = set()
    for key in missing_keys:
        parts = key.split(".")
        if len(parts) > 2 and parts[-3:-1] != [] and "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= config.num_hidden_layers:
                missing_layers.add(int(parts[i + 1]))
    if missing_layers:
        layers = sorted(missing_layers)
        logger.warning(
            "The checkpoint has no (or incomplete) weights for MTP layer(s) %s although num_nextn_predict_layers=%d: "
            "those MTP modules are freshly initialised. Load with num_nextn_predict_layers=%d to skip them.",
            layers, config.num_nextn_predict_layers, min(layers) - config.num_hidden_layers,
        )


# the MTP layers' copies of the shared embedding and head in the official layout (see mtp_shared_keys)
_MTP_COPY = re.compile(r"(?:^|\.)layers\.\d+\.(?:embed_tokens|shared_head\.head)\.weight$")


def without_mtp_copies(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the official layout, as ``load_state_dict`` reads it: without the MTP layers' copies of the
    embedding and head, which every save writes (``with_mtp_copies``) and which are not parameters (the MTP modules
    use the main model's tensors; ``from_pretrained`` skips them too), so a strict load of a saved file succeeds.
    Its per-expert entries are left to the stacked experts modules themselves
    (``checkpoint_io.load_per_expert_entries``, their ``load_state_dict`` pre-hook), which know how many experts they
    hold: a state dict may hold some experts only (transformers' Trainer resumes from a sharded checkpoint one shard
    at a time, and a shard ends anywhere in a layer's experts).

    ``from_pretrained`` never needs this (transformers converts while loading); ``load_state_dict`` does, because
    transformers' Trainer resumes a run by loading the saved (official-layout) weights with it."""
    return {key: tensor for key, tensor in state_dict.items() if _MTP_COPY.search(key) is None}


def checkpoint_headers(files) -> dict[str, tuple[str, dict]]:
    """``{tensor name: (file, header entry)}`` over several checkpoint files (a tensor stored twice is an error)."""
    headers = {os.fspath(path): read_safetensors_header(path) for path in files}
    return {name: (path, headers[path][name]) for name, path in tensor_locations(headers).items()}


class CheckpointShapeError(CheckpointError, RuntimeError):
    """A tensor whose shape differs from the model's. Also a ``RuntimeError``, the type transformers raises for a
    size mismatch; ``from_pretrained(..., ignore_mismatched_sizes=True)`` re-initialises such tensors instead."""


_INTEGER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}  # safetensors' names


def per_expert_layout(model: nn.Module, headers: dict) -> list[tuple[str, nn.Module]]:
    """The stacked experts modules ``(name, module)`` whose tensors ``headers`` holds per expert (official layout)."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, ExpertsPlugin) and any(k.startswith(f"{name}.0.") for k in headers)]


_EXPERT_INDEX = re.compile(r"^(\d+)\.(?:gate|up|down)_proj\.")


def check_every_expert(model: nn.Module, headers: dict, ignore_mismatched_sizes: bool = False) -> None:
    """A checkpoint in the per-expert layout must hold every projection of every routed expert of each stacked
    experts module, and no expert beyond them (the loader stacks them; a missing or extra one would only surface as a
    shape mismatch of the stack). The count is the config's `n_routed_experts`: under expert parallelism a rank's
    module holds only its share, but the checkpoint holds them all. With ``ignore_mismatched_sizes`` another count
    is a size mismatch of the stacked tensors and the router, which transformers re-initialises and reports (as for
    any other tensor, and as its own class does: a new `n_routed_experts` on purpose), so the checkpoint's experts
    need only be complete among themselves."""
    for name, module in per_expert_layout(model, headers):
        both = [f"{name}.{stacked}" for stacked in ("gate_up_proj", "down_proj") if f"{name}.{stacked}" in headers]
        if both:
            # which of the two copies the loader keeps is arbitrary
            raise CheckpointError(f"The checkpoint holds {name!r} both per expert ({name}.0.gate_proj.weight, ...) and stacked ({both[0]}): keep one layout.")
        numbers = {m[1]: k for k in headers if k.startswith(f"{name}.") and (m := _EXPERT_INDEX.match(k[len(name) + 1:]))}
        odd = next((key for number, key in sorted(numbers.items()) if number != str(int(number))), None)
        if odd is not None:
            # `experts.03` and `experts.3` would be one expert to us but two tensors to the loader's stacking
            raise CheckpointError(
                f"The checkpoint's tensor {odd!r} numbers its expert with a leading zero: expert numbers are plain "
                f"integers ({name}.3.gate_proj.weight, not {name}.03.gate_proj.weight)."
            )
        count, configured = max({int(number) for number in numbers}) + 1, model.config.n_routed_experts
        for expert in range(count):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"{name}.{expert}.{proj}.weight"
                if key not in headers:
                    raise CheckpointError(
                        f"The checkpoint has no {key!r}: every one of the {count} routed experts of {name!r} "
                        "needs its gate_proj, up_proj and down_proj (official layout: docs/checkpoint-format.md)."
                    )
        if count != configured and not ignore_mismatched_sizes:
            raise CheckpointError(
                f"The checkpoint holds {count} routed experts for {name!r} (e.g. {name}.{count - 1}), but the config's "
                f"`n_routed_experts` is {configured}; `ignore_mismatched_sizes=True` re-initialises the experts and the "
                "routers at the config's count."
            )


def expected_tensors(model: nn.Module, headers: dict) -> dict[str, tuple[tuple, torch.dtype]]:
    """``{checkpoint name: (shape, dtype the model holds it in)}``: the model's parameters and buffers, plus, for
    experts stored per expert, each expert's ``{gate,up,down}_proj.weight`` (one slice of the stacked tensor), so
    those are checked like any other tensor."""
    expected = {name: (tuple(t.shape), t.dtype) for name, t in (*model.named_parameters(), *model.named_buffers())}
    for name, module in per_expert_layout(model, headers):
        gate_up, down = module.gate_up_proj, module.down_proj
        for expert in range(model.config.n_routed_experts):  # every expert is stored, whichever a rank keeps
            for proj in ("gate_proj", "up_proj"):
                expected[f"{name}.{expert}.{proj}.weight"] = ((gate_up.shape[1] // 2, gate_up.shape[2]), gate_up.dtype)
            expected[f"{name}.{expert}.down_proj.weight"] = (tuple(down.shape[1:]), down.dtype)
    return expected


def check_tensor(name: str, expected: tuple, dtype: torch.dtype, headers: dict, hf_quantizer=None) -> None:
    """One stored tensor against the model's ``expected`` shape and ``dtype`` (shape first: see CheckpointShapeError).
    ``hf_quantizer``: the quantizer transformers loads the checkpoint with (ours for an FP8 folder), if any."""
    path, info = headers[name]
    shape = tuple(info["shape"])
    is_fp8 = info["dtype"] == "F8_E4M3"
    if shape != expected:
        raise CheckpointShapeError(f"Tensor {name!r} in {path} has shape {list(shape)}, but the model (config) expects {list(expected)}.")
    owner = name.rpartition(".")[0]
    if info["dtype"] in _INTEGER_DTYPES and dtype.is_floating_point:
        raise CheckpointError(
            f"Tensor {name!r} in {path} is {info['dtype']}, but the model holds it in {dtype}: a weight is never an "
            "integer tensor (casting it would load garbage)."
        )
    if info["dtype"].startswith("F8") and not is_fp8:
        # E5M2 and the other 8-bit floats: the official FP8 checkpoint (and FP8Linear) is E4M3 only
        target = "an FP8 layer, which reads F8_E4M3" if dtype == FP8_DTYPE else f"{dtype}"
        raise CheckpointError(
            f"Tensor {name!r} in {path} is {info['dtype']}, but the model holds it in {target}: the official FP8 "
            "format stores weights as F8_E4M3 (quantization_config fmt 'e4m3'); re-quantize the weight from high "
            "precision (`deepseek-v3-convert`)."
        )
    if is_fp8 and dtype != FP8_DTYPE and not (name.endswith(".weight") and len(shape) == 2):
        # only 2-D projection weights have a scale grid; cast without one, the FP8 codes would load at the wrong scale
        raise CheckpointError(
            f"Tensor {name!r} in {path} is F8_E4M3, but the model holds it in {dtype}: the official FP8 layout stores "
            "only 2-D projection weights in FP8, each with its `weight_scale_inv` (norms, router biases and scales "
            "stay high precision): cast without a scale, its FP8 codes would load as wrong values."
        )
    if is_fp8 and name.endswith(".weight") and len(shape) == 2:
        scale_name = owner + ".weight_scale_inv"
        grid = [ceil_div(shape[0], BLOCK), ceil_div(shape[1], BLOCK)]
        if scale_name not in headers:
            raise CheckpointError(
                f"FP8 tensor {name!r} in {path} has no {scale_name!r} (its per-128x128-block scales) in any checkpoint file."
            )
        scale_path, scale_info = headers[scale_name]
        if list(scale_info["shape"]) != grid:
            raise CheckpointError(
                f"Scale grid {scale_name!r} in {scale_path} has shape {scale_info['shape']}, but weight {list(shape)} needs "
                f"{grid} (ceil(rows/128), ceil(cols/128))."
            )
        if scale_info["dtype"] != "F32":
            raise CheckpointError(f"Scale grid {scale_name!r} in {scale_path} must be F32, got {scale_info['dtype']}.")
        if dtype != FP8_DTYPE:
            # an FP8 tensor headed for a high-precision Linear: this module was not converted to FP8Linear
            raise CheckpointError(f"Tensor {name!r} in {path} is FP8 but the model holds {owner!r} in {dtype}: {why_high_precision(owner, hf_quantizer)}")
    if dtype == FP8_DTYPE and not is_fp8:
        if hf_quantizer is None:  # the layer is FP8 because of the quantizer plugin, not because of the checkpoint
            raise CheckpointError(
                f"Tensor {name!r} in {path} is {info['dtype']}, but {owner!r} is an FP8 layer of `quantizer='fp8_block'` "
                "with `fp8_mode='inference'`, which loads FP8 checkpoints only: load this high-precision folder with "
                "`fp8_mode='train'`, or convert it to FP8 first (`deepseek-v3-convert`)."
            )
        raise CheckpointError(
            f"Tensor {name!r} in {path} is {info['dtype']}, but the checkpoint is declared FP8 (quantization_config) and "
            f"{owner!r} is an FP8 layer: convert the folder with `python -m modeling_deepseek_v3.quantization.converter`, "
            f"or list {owner!r} in `quantization_config.modules_to_not_convert` to keep it in high precision."
        )


def _warn_unmatched_skips(model: nn.Module, skip: list[str]) -> None:
    """``modules_to_not_convert`` entries match as transformers' quantizers match them (a module path prefix, a regex
    or a name suffix: ``should_convert_module``); one that matches no module keeps nothing out of FP8, most likely a
    misspelling, so it is named."""
    names = [name for name, _ in model.named_modules() if name]
    unmatched = [entry for entry in skip if all(should_convert_module(name, [entry]) for name in names)]
    if unmatched:
        logger.warning(
            "`quantization_config.modules_to_not_convert` entries %s match no module of %s, so they keep nothing in "
            "high precision (entries match a module path from its start, as a regular expression, or as the end of a "
            "path, e.g. 'lm_head', 'q_a_proj', 'model.layers.3.self_attn').", unmatched, type(model).__name__,
        )


def why_high_precision(owner: str, hf_quantizer) -> str:
    """Why the module ``owner`` is not an FP8 layer, for an FP8 tensor the checkpoint stores for it."""
    if not is_fp8_eligible(owner):
        return (
            "DeepSeek-V3 stores only the attention and MLP projections in FP8 (embeddings, lm_head, the router, norms "
            "and eh_proj stay high precision), so this checkpoint is not in the official layout."
        )
    if hf_quantizer is None:
        return "the checkpoint's config.json needs the official `quantization_config` (quant_method 'fp8')."
    skip = [s for s in hf_quantizer.quantization_config.modules_to_not_convert or () if not should_convert_module(owner, [s])]
    if skip:
        return f"`quantization_config.modules_to_not_convert` lists {skip[0]!r}, which keeps it high precision; drop that entry."
    return "it was not converted to an FP8 layer."


def validate_checkpoint_files(model: nn.Module, files, ignore_mismatched_sizes: bool = False, hf_quantizer=None) -> None:
    """Check, from the headers alone, that ``files`` can load into ``model`` (built, possibly on meta, and prepared
    by ``hf_quantizer`` if the folder is quantized). With ``ignore_mismatched_sizes`` a shape mismatch is left to
    transformers, which re-initialises the tensor and says so. (The index was checked before transformers read it:
    ``check_index_of``.) Layers the checkpoint has beyond the built ones are reported (``report_unbuilt_layers``).
    Returns ``{tensor name: (file, header entry)}``."""
    headers = checkpoint_headers([os.fspath(f) for f in files])
    report_unbuilt_layers(model, headers)
    check_every_expert(model, headers, ignore_mismatched_sizes)
    expected = expected_tensors(model, headers)
    for name, (shape, dtype) in expected.items():
        if name not in headers or (ignore_mismatched_sizes and tuple(headers[name][1]["shape"]) != shape):
            continue
        check_tensor(name, shape, dtype, headers, hf_quantizer)
    for name, (_, dtype) in expected.items():
        if name.endswith(".weight_scale_inv") and name not in headers and name[: -len("_scale_inv")] in headers:
            weight_path = headers[name[: -len("_scale_inv")]][0]
            raise CheckpointError(f"FP8 weight {name[: -len('_scale_inv')]!r} in {weight_path} has no {name!r} in any checkpoint file.")
    check_no_stale_scales(headers, expected)
    return headers


def check_no_stale_scales(headers: dict, expected: dict) -> None:
    """A ``weight_scale_inv`` beside a high-precision weight of a layer the model builds is a weight replaced
    without its scale (e.g. FP8 codes cast to bf16 and stored without applying the grid): nothing says which of the
    two is right, so the folder is refused, as the converter refuses it, instead of loading the weight and dropping
    the scale as an unexpected key."""
    for name, (path, _) in headers.items():
        weight = name.removesuffix("_scale_inv")
        if not name.endswith(".weight_scale_inv") or name in expected or weight not in expected or weight not in headers:
            continue
        weight_path, info = headers[weight]
        if not info["dtype"].startswith("F8"):
            raise CheckpointError(
                f"{weight!r} in {weight_path} is {info['dtype']}, not FP8, but the checkpoint also holds its FP8 scale grid "
                f"{name!r} (in {path}): a weight replaced without its scale. Store the weight in FP8 with its scale, or "
                "remove the stale scale."
            )


_LAYER_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def report_unbuilt_layers(model: nn.Module, headers: dict) -> None:
    """Warn about the checkpoint's decoder layers that ``model`` does not build, which the loader skips.

    The model ignores every stored layer beyond its ``num_hidden_layers + num_nextn_predict_layers`` (so that a
    checkpoint's MTP layers load into a model built without them, silently: that is documented). A skipped layer
    that is not an MTP layer (no ``eh_proj``) is a decoder layer the config does not build — a truncating
    ``num_hidden_layers``, or a misnumbered tensor — and is named here, as transformers' load report would."""
    config = model.config
    built = config.num_hidden_layers + config.num_nextn_predict_layers
    skipped: dict[int, str] = {}
    mtp = set()
    for name in headers:
        match = _LAYER_KEY.match(name)
        if match is None or int(match[1]) < built:
            continue
        layer = int(match[1])
        skipped.setdefault(layer, name)
        if name.endswith(".eh_proj.weight"):
            mtp.add(layer)
    decoder = sorted(set(skipped) - mtp)
    if decoder:
        logger.warning(
            "The checkpoint holds layer(s) %s (e.g. %r) that this model does not build (num_hidden_layers=%d, "
            "num_nextn_predict_layers=%d): they are not loaded.",
            decoder, skipped[decoder[0]], config.num_hidden_layers, config.num_nextn_predict_layers,
        )


# ---------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------


def check_save_arguments(state_dict, max_shard_size) -> None:
    """Arguments of ``save_pretrained`` that transformers would take without a word or fail on deep inside: a
    ``state_dict`` holding something other than tensors, a ``max_shard_size`` that is not a positive size (a negative
    one silently writes one shard per tensor)."""
    if state_dict is not None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"`state_dict` must be a dict of tensor name -> tensor, got {type(state_dict).__name__}.")
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"`state_dict[{key!r}]` must be a torch.Tensor, got {type(value).__name__}.")
    # huggingface_hub's shard splitter, which transformers' save hands the value to, parses it: read it the same way
    # here (an int, or a number followed by KB, MB, GB or TB; "KiB" and the like are refused there)
    if isinstance(max_shard_size, str):
        try:
            size = compat.parse_shard_size(max_shard_size)
        except (ValueError, OverflowError):
            size = None
    else:
        size = max_shard_size if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) else None
    if size is None or size < 1:
        raise ValueError(
            f"`max_shard_size` must be a positive number of bytes or a size such as '5GB' (units KB, MB, GB, TB), got "
            f"{max_shard_size!r}."
        )


def check_fp8_layers_saveable(model: nn.Module) -> None:
    """FP8 layers made in memory by ``quantizer='fp8_block', fp8_mode='inference'`` (no FP8 checkpoint behind them:
    ``hf_quantizer`` is None) have no save route that writes the official FP8 layout (per-expert scales, the
    ``quantization_config`` block), so saving them is refused instead of writing a folder nothing reads right."""
    if getattr(model, "hf_quantizer", None) is not None:
        return  # loaded from an FP8 checkpoint: the quantizer writes the official layout back
    fp8 = next((name for name, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))), None)
    if fp8 is not None:
        raise ValueError(
            f"This model holds FP8 layers quantized in memory (e.g. {fp8!r}, from `quantizer='fp8_block', "
            "fp8_mode='inference'`), which save_pretrained cannot write in the official FP8 layout: save the "
            "high-precision model (`fp8_mode='train'`, or no quantizer) and convert the folder with "
            "`deepseek-v3-convert`, or load an FP8 checkpoint and save that."
        )


def save_pretrained(model, base_save, save_directory, *args, state_dict=None, push_to_hub=False, is_main_process=True, **kwargs):
    """``PreTrainedModel.save_pretrained`` in the official layout, atomically, with a model card.

    ``base_save`` is transformers' implementation. With ``push_to_hub=True`` transformers writes into
    ``save_directory`` and uploads what changed there, so that path is left to it (the card is written by
    ``prepare_push``, called from ``_upload_modified_files``).
    """
    check_save_arguments(state_dict, kwargs.get("max_shard_size", 1))
    check_fp8_layers_saveable(model)
    check_saved_router_biases_finite(model)
    # A model sharded by transformers' distributed engine gathers its full weights inside ``base_save`` (every rank
    # takes part, one writes); the copies are added to what it gathered (``gather_sharded_state_dict_for_save``).
    sharded = getattr(model, "is_distributed_loading_by_transformers", False)
    if state_dict is None and getattr(model, "hf_quantizer", None) is None and not sharded:
        # a quantized model's state dict comes from its quantizer (``get_state_dict_and_metadata``), which adds the copies
        state_dict = official_state_dict(model)
    # One process writes (rank 0 of a launch); the others only join the gathering collectives.
    distributed_config = getattr(model.config, "distributed_config", None)
    if push_to_hub or not model.should_save_on_this_rank(is_main_process):
        result = base_save(save_directory, *args, state_dict=state_dict, push_to_hub=push_to_hub,
                           is_main_process=is_main_process, **kwargs)
        model.barrier_after_gathered_checkpoint_save(distributed_config)  # until the writer's folder is in place
        return result

    def write(tmp_dir):
        base_save(tmp_dir, *args, state_dict=state_dict, is_main_process=is_main_process, **kwargs)
        model_card.write_card(model, save_directory, tmp_dir)  # a README the user wrote stays untouched

    atomic_save(save_directory, write)
    model.barrier_after_gathered_checkpoint_save(distributed_config)


_DECODER_TENSOR = re.compile(r"^(?:model\.)?(?:layers\.(?P<layer>\d+)\.|norm\.weight$|embed_tokens\.weight$)")


def check_local_source(source) -> None:
    """A source that can only be a local path (absolute, relative with ``.`` or ``~``, more than one ``/``, or a file)
    must be an existing folder: transformers would take it for a Hub repo id and answer "Repo id must be in the
    form 'repo_name' or 'namespace/repo_name'" (a Hub id is ``name`` or ``namespace/name``)."""
    path = os.fspath(source)
    if os.path.isdir(path):
        return
    if os.path.isfile(path):
        raise NotADirectoryError(f"{path} is a file; from_pretrained takes the folder holding config.json and the weights.")
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path:
        hint = ""
        if path.startswith("~") and os.path.isdir(os.path.expanduser(path)):
            hint = f" `~` is not expanded: pass os.path.expanduser({path!r})."
        raise FileNotFoundError(f"No checkpoint folder at {path} (from_pretrained takes a local folder or a Hub repo id).{hint}")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_index_of(folder) -> None:
    """Before transformers reads a local folder: it holds safetensors weights, not only pickled ones (see
    :func:`check_safetensors_only`), and its ``model.safetensors.index.json``, if any, is valid JSON naming
    safetensors shards that exist, with the ``metadata`` object transformers' loader reads (else a
    ``CheckpointError`` naming the file)."""
    folder = Path(os.fspath(folder))
    index = folder / INDEX_NAME
    if not index.is_file():
        check_safetensors_only(folder)
        return
    content = load_index(index)
    single = folder / SINGLE_NAME
    other_shards = sorted(set(content["weight_map"].values()) - {SINGLE_NAME})
    if single.is_file() and other_shards:
        # transformers takes model.safetensors when it exists and never opens the index: which one is stale is unknown
        raise CheckpointError(
            f"{folder} holds both {SINGLE_NAME} and the index {INDEX_NAME} naming {len(other_shards)} other shard(s) "
            f"(e.g. {other_shards[0]}): a loader would read {SINGLE_NAME} and ignore the index. Remove the one that is "
            "stale."
        )
    if not isinstance(content.get("metadata"), dict):
        raise CheckpointError(
            f"The index {index} has no `metadata` object, which transformers' loader reads; add "
            '`"metadata": {"total_size": <bytes of all tensors>}` (or `"metadata": {}`).'
        )
    pickled = sorted({f for f in content["weight_map"].values() if not f.endswith(".safetensors")})
    if pickled:
        raise CheckpointError(f"The index {index} names shard(s) that are not safetensors files ({pickled[:3]}): " + _SAFETENSORS_ONLY)


_SAFETENSORS_ONLY = (
    "this package reads safetensors weights only, because loading a pickled checkpoint can run arbitrary code. "
    "Convert the weights to safetensors in an environment you trust (e.g. `safetensors.torch.save_file`)."
)


def check_safetensors_only(folder: Path) -> None:
    """A folder whose weights are pickled (``pytorch_model.bin`` and the like) with no safetensors file is refused,
    naming the file, before transformers would unpickle it (which it does, with ``weights_only``, when it finds no
    safetensors)."""
    if not (folder / "config.json").is_file() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
    if pickled:
        raise CheckpointError(f"{folder} holds pickled weights ({', '.join(pickled[:3])}) and no safetensors file: " + _SAFETENSORS_ONLY)


def check_load_arguments(config_class, kwargs: dict) -> None:
    """Arguments of ``from_pretrained`` that transformers would take without a word or fail on deep inside."""
    allow_missing = kwargs.get("allow_missing_weights", False)
    if not isinstance(allow_missing, bool):
        raise TypeError(f"`allow_missing_weights` must be True or False, got {allow_missing!r}.")
    if kwargs.get("use_safetensors") is False:
        raise ValueError("`use_safetensors=False`: " + _SAFETENSORS_ONLY)
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        return
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"`config` must be a {config_class.__name__} (or the path of a folder holding config.json), got "
            f"{type(config).__name__}; build one with {config_class.__name__}(**fields) or .from_dict(...)."
        )
    if config.model_type != config_class.model_type:
        raise TypeError(
            f"`config` is a {type(config).__name__} of model_type {config.model_type!r}; this model needs a "
            f"{config_class.__name__} (model_type {config_class.model_type!r})."
        )


def check_no_missing_weights(model: nn.Module, missing_keys, source) -> None:
    """Raise a ``CheckpointError`` naming the tensors of the decoder stack (the embedding, attention, router and its
    bias, experts, norms of the ``num_hidden_layers`` layers, and the final norm) that ``source`` did not provide, when it provided
    others: a misnamed or dropped tensor would otherwise stay randomly initialised behind a load-report line. A
    checkpoint holding none of them is not one of this model's (transformers' load report lists every tensor then,
    and its tests load such folders on purpose). What transformers conventionally initialises stays a warning:
    output and classification heads, and the MTP modules (see ``report_missing_mtp``)."""

    def in_decoder(key):
        match = _DECODER_TENSOR.match(key)
        return match is not None and (match["layer"] is None or int(match["layer"]) < model.config.num_hidden_layers)

    missing = sorted(k for k in missing_keys if in_decoder(k))
    decoder = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if in_decoder(n)]
    if not missing or len(missing) >= len(decoder):
        return
    shown = ", ".join(repr(k) for k in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise CheckpointError(
        f"The checkpoint {source} has no tensor for {shown}: they would be left randomly initialised. Check the "
        "tensor names (official layout: docs/checkpoint-format.md), or pass `allow_missing_weights=True` to "
        "from_pretrained to initialise them on purpose."
    )


def offloaded_modules(device_map) -> list[str]:
    """The entries of a resolved ``device_map`` whose weights accelerate's dispatch offloads: "disk", and "cpu" when
    another device runs the model (``accelerate.dispatch_model``'s rule; a map of "cpu" alone is no offload)."""
    if not isinstance(device_map, dict):
        return []
    devices = {str(d) for d in device_map.values()}
    offloaded = {"disk"} if devices <= {"cpu", "disk"} else {"cpu", "disk"}
    return [name for name, d in device_map.items() if str(d) in offloaded]


def check_dequantize_not_offloaded(hf_quantizer, device_map) -> None:
    """An FP8 folder dequantized at load cannot have offloaded modules: their FP8 weights go to the offload store as
    they are read, and the dequantization after loading would replace each layer by one of meta tensors (the forward
    failed deep inside a GEMM)."""
    offloaded = offloaded_modules(device_map)
    if offloaded and isinstance(hf_quantizer, DeepseekV3FP8HfQuantizer) and hf_quantizer.quantization_config.dequantize:
        raise ValueError(
            f"This FP8 checkpoint would be dequantized at load (`dequantize=True`, the default without CUDA), which "
            f"cannot be done for modules the `device_map` offloads ({', '.join(repr(n) for n in offloaded[:3])}"
            f"{', ...' if len(offloaded) > 3 else ''}). Keep the FP8 weights (`quantization_config="
            "DeepseekV3FP8Config(dequantize=False)`), or convert the folder once (`deepseek-v3-convert SRC DST --to "
            "bf16`) and offload that."
        )


def load_pretrained_model(base_load, model, state_dict, checkpoint_files, load_config, *args, **kwargs):
    """transformers' ``_load_pretrained_model`` with the header checks before and the MTP report after."""
    check_dequantize_not_offloaded(getattr(load_config, "hf_quantizer", None), getattr(load_config, "device_map", None))
    if state_dict is None and checkpoint_files:
        pickled = [os.fspath(f) for f in checkpoint_files if not str(f).endswith(".safetensors")]
        if pickled:  # a Hub repo without safetensors (local folders were checked before: check_index_of)
            raise CheckpointError(f"The checkpoint's weights are pickled ({pickled[0]}): " + _SAFETENSORS_ONLY)
        ignore = bool(getattr(load_config, "ignore_mismatched_sizes", False))
        headers = validate_checkpoint_files(model, checkpoint_files, ignore_mismatched_sizes=ignore,
                                            hf_quantizer=getattr(load_config, "hf_quantizer", None))
        check_index_against_files(getattr(load_config, "sharded_metadata", None), checkpoint_files, headers)
    else:
        headers = None
    result = base_load(model, state_dict, checkpoint_files, load_config, *args, **kwargs)
    info = result[0] if isinstance(result, tuple) else result
    report_missing_mtp(model, getattr(info, "missing_keys", ()))
    if headers is not None:
        check_router_biases_finite(model, headers)
    return result


def check_index_against_files(sharded_metadata, checkpoint_files, headers) -> None:
    """The index's ``weight_map`` (which transformers hands over as ``sharded_metadata``) against the shards'
    headers (``checkpoint_io.check_index_matches``). transformers resolves the index's sorted shard names to
    ``checkpoint_files`` in the same order, which names each file as the index does."""
    weight_map = (sharded_metadata or {}).get("weight_map") if isinstance(sharded_metadata, dict) else None
    if not weight_map:
        return
    shards = sorted(set(weight_map.values()))
    if len(shards) != len(checkpoint_files):
        return
    shard_of_file = {os.fspath(f): shard for f, shard in zip(checkpoint_files, shards)}
    location = {name: shard_of_file[path] for name, (path, _) in headers.items() if path in shard_of_file}
    index = Path(os.fspath(checkpoint_files[0])).parent / INDEX_NAME
    check_index_matches(index if index.is_file() else "of the checkpoint", weight_map, location)


def router_biases(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{buffer name: e_score_correction_bias}`` of every router holding its bias in memory (sharded DTensor and
    meta biases are left out: their values are not here to check)."""
    return {name: b for name, b in model.named_buffers()
            if name.endswith("e_score_correction_bias") and b.device.type != "meta" and type(b) is torch.Tensor}


def count_nonfinite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{name: number of nan/inf values}`` for the tensors that hold any, with one host read for all of them."""
    if not tensors:
        return {}
    counts = torch.stack([(~torch.isfinite(t)).sum().to("cpu") for t in tensors.values()]).tolist()
    return {name: count for name, count in zip(tensors, counts) if count}


def check_saved_router_biases_finite(model: nn.Module) -> None:
    """Before saving: a nan or inf router bias (set by hand, or by a broken training loop) would write a checkpoint
    that loading refuses (``check_router_biases_finite``), so the save is refused now, naming the routers."""
    bad = count_nonfinite(router_biases(model))
    if bad:
        raise ValueError(
            f"Cannot save: the routing bias of {', '.join(bad)} holds nan or inf values, so the saved checkpoint would "
            "route every token to arbitrary experts (and loading it is refused). Restore finite biases first (reload "
            "them from a good checkpoint, or zero them)."
        )


def check_router_biases_finite(model: nn.Module, headers: dict) -> None:
    """After loading: every router's ``e_score_correction_bias`` the checkpoint provided is finite. A nan or inf
    bias makes the router's top-k pick arbitrary experts for every token without any error (the bias step refuses
    to produce one; a corrupt file still can)."""
    stored = {name.removeprefix("model."): name for name in headers}  # a base model's names lack the prefix
    loaded = {stored.get(name, name): b for name, b in router_biases(model).items() if name in headers or name in stored}
    for name, count in count_nonfinite(loaded).items():
        bias = loaded[name]
        values = bias[~torch.isfinite(bias)][:4].tolist()
        raise CheckpointError(
            f"Router bias {name!r} in {headers[name][0]} holds {count} of {bias.numel()} values that are not finite "
            f"(e.g. {values}): the router would pick arbitrary experts. The checkpoint is corrupt."
        )


__all__ = [
    "CheckpointError",
    "CheckpointShapeError",
    "check_no_missing_weights",
    "DeepseekV3FP8Config",
    "DeepseekV3FP8HfQuantizer",
    "QUANT_METHOD",
    "as_quantization_config",
    "atomic_save",
    "load_pretrained_model",
    "save_pretrained",
    "without_mtp_copies",
    "checkpoint_headers",
    "mtp_shared_keys",
    "official_state_dict",
    "read_safetensors_header",
    "report_missing_mtp",
    "validate_checkpoint_files",
]
