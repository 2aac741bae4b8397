"""DeepSeek-V3 (arXiv 2412.19437) as transformers PreTrainedModels, composed from plugins named in the config.

``DeepseekV3Model``: embeddings, ``num_hidden_layers`` decoder layers (each with the configured attention
backend and a dense MLP or a DeepSeekMoE block with the configured router and expert executor), final norm.
The ``num_nextn_predict_layers`` MTP modules live after them in ``model.layers`` so that their parameters sit
at the official names ``model.layers.{num_hidden_layers + k}.*``; the main forward never runs them.
``DeepseekV3ForCausalLM`` adds the output head, the loss and ``generate``.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from . import checkpoint, compat, distributed, input_checks, model_card
from .configuration_deepseek_v3 import DeepseekV3Config
from . import kernels
from .layers import DeepseekV3DecoderLayer, DeepseekV3Experts, DeepseekV3RMSNorm, DeepseekV3RotaryEmbedding
from .quantization.experts import FP8Experts
from .quantization.linear import FP8Linear, check_dequantize_dtype
from .registry import AttentionPlugin, RouterPlugin
from .training import update_expert_bias

logger = logging.get_logger(__name__)


# The named parameters of the forwards (the causal LM's and the base model's), for the hint when a misspelt one
# comes in through **kwargs.
_FORWARD_PARAMETERS = (
    "input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache", "labels",
    "logits_to_keep", "return_mtp_loss", "shift_labels", "return_dict",
)


def token_mask_from_attention_mask(attention_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """[B, T] bool, True at the real tokens of the current input, from a 2-D padding mask [B, past + T]; None when
    there is no 2-D mask (no padding, or a prepared 4-D mask that no longer says which tokens are padding)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_len:].bool()


def check_fits_in_memory(config: DeepseekV3Config) -> None:
    """A config whose weights cannot fit the memory of the device they are built on (a typo such as
    ``n_routed_experts=10**9``) is named before anything is allocated: the build otherwise failed in an allocator
    message that names no field, or, where the system overcommits memory, filled it until the process was killed.
    The count is a lower bound (embedding and MLPs; attention and norms left out), so a model that fits is never
    refused; a build on the meta device (transformers' loading, ``torch.device("meta")``) allocates nothing."""
    if is_deepspeed_zero3_enabled():
        return  # zero.Init partitions each parameter over the ranks as it is made
    probe = nn.Module()  # where a new parameter lands: the meta device under transformers' and accelerate's empty init
    probe.register_parameter("weight", nn.Parameter(torch.empty(0)))
    device = probe.weight.device
    if device.type == "cpu":
        import psutil  # accelerate's dependency

        memory = psutil.virtual_memory().total + psutil.swap_memory().total
    elif device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        return
    c, h = config, config.hidden_size
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace + c.num_nextn_predict_layers  # MTP modules are MoE layers
    experts = c.n_routed_experts + c.n_shared_experts
    parts = {
        f"the experts: (n_routed_experts={c.n_routed_experts} + n_shared_experts={c.n_shared_experts}) × 3 × "
        f"hidden_size={h} × moe_intermediate_size={c.moe_intermediate_size} in each of the {moe_layers} MoE layers "
        f"(num_hidden_layers={c.num_hidden_layers} − first_k_dense_replace={c.first_k_dense_replace} + "
        f"num_nextn_predict_layers={c.num_nextn_predict_layers})": moe_layers * experts * 3 * h * c.moe_intermediate_size,
        f"the embedding: vocab_size={c.vocab_size} × hidden_size={h}": c.vocab_size * h,
        f"the dense MLPs: first_k_dense_replace={c.first_k_dense_replace} × 3 × hidden_size={h} × "
        f"intermediate_size={c.intermediate_size}": c.first_k_dense_replace * 3 * h * c.intermediate_size,
    }
    dtype = torch.get_default_dtype()
    size = sum(parts.values()) * dtype.itemsize
    if size > memory:
        raise ValueError(
            f"This config's weights take at least {size / 2**30:,.0f} GiB in {dtype}, more than the {memory / 2**30:,.0f} "
            f"GiB of the {device.type} device they would be built on; most of it is {max(parts, key=parts.get)}. Check "
            "those config fields, or build the model on the meta device (`with torch.device('meta'):`) to inspect it."
        )


class DeepseekV3PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV3Config
    config: DeepseekV3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV3DecoderLayer", "SequentialMTPModule"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # q/k and v head widths differ (192 vs 128)
    _supports_flex_attn = False
    _supports_attention_backend = True
    # A decode step reads nothing on the host (routing, expert offsets and the cache stay on the device), so it
    # compiles as one graph; only the `eager` experts implementation loops over the experts on the host.
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": DeepseekV3DecoderLayer,
        "attentions": AttentionPlugin,
        "router_logits": OutputRecorder(RouterPlugin, index=0),
    }
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for the decorator in the model's own module; our experts module lives in layers.py
        return True

    def set_experts_implementation(self, experts_implementation: str | dict):
        # Experts stored in FP8 (`FP8Experts`) run their own grouped FP8 GEMMs whatever the setting says: a switch
        # would be recorded in the config and change nothing.
        if isinstance(experts_implementation, dict) and set(experts_implementation) - {""}:
            # the keys name sub-configs, and this config has none: any other key would be ignored without a word
            raise ValueError(
                f"`experts_implementation` as a dict maps sub-config names to implementations; this model has no "
                f"sub-configs, so its only key is '' (the model itself), got {sorted(experts_implementation)}."
            )
        requested = experts_implementation.get("", self.config._experts_implementation) if isinstance(
            experts_implementation, dict) else experts_implementation
        fp8 = next((name for name, m in self.named_modules() if isinstance(m, FP8Experts)), None)
        if fp8 is not None and requested != self.config._experts_implementation:
            raise ValueError(
                f"The routed experts are stored in FP8 (e.g. {fp8!r}), which run their own grouped FP8 GEMMs: "
                f"experts_implementation={requested!r} applies to high-precision experts only. Dequantize the model "
                "first (`model.dequantize()`, or DeepseekV3FP8Config(dequantize=True) at load) to choose an implementation."
            )
        return super().set_experts_implementation(experts_implementation)

    def _grouped_mm_can_dispatch(self) -> bool:
        # torch's grouped GEMM needs 16-byte-aligned rows: in bf16, expert widths that are multiples of 8. transformers
        # falls back to `eager` when this raises and no implementation was asked for, and passes the error on when
        # `grouped_mm` was (without the check, the first forward fails with "strides should be multiple of 16 bytes").
        super()._grouped_mm_can_dispatch()
        sizes = {"hidden_size": self.config.hidden_size, "moe_intermediate_size": self.config.moe_intermediate_size}
        if any(size % 8 for size in sizes.values()):
            raise ValueError(
                f"experts_implementation='grouped_mm' needs hidden_size and moe_intermediate_size to be multiples of 8 "
                f"(torch's grouped GEMM reads 16-byte-aligned rows), got {sizes}; use 'batched_mm' or 'eager'."
            )
        return True

    def __init__(self, config: DeepseekV3Config, *inputs, **kwargs):
        DeepseekV3Config.check_for_model(config)  # ours, and still valid after fields were set on it
        check_fits_in_memory(config)
        super().__init__(config, *inputs, **kwargs)
        # Checkpoints carry copies of the shared embedding/head inside each MTP layer, and MTP layers beyond the
        # configured depth (e.g. `num_nextn_predict_layers=0`): neither is a parameter of ours.
        built_layers = "|".join(str(i) for i in range(config.num_hidden_layers + config.num_nextn_predict_layers))
        self._keys_to_ignore_on_load_unexpected = [
            r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$",
            rf"model\.layers\.(?!({built_layers})\.)\d+\.",
        ]

    # --- official checkpoint layout (see checkpoint.py) ---------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        checkpoint.check_load_arguments(cls.config_class, kwargs)
        # transformers' FineGrainedFP8Config(dequantize=...) becomes ours, so the "fp8" block stays with our quantizer
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = checkpoint.as_quantization_config(kwargs["quantization_config"])
        if kwargs.get("distributed_config") is not None:
            # a layout that cannot work fails here, in one message, before transformers starts the process group
            config = distributed.resolve_model_config(cls.config_class, pretrained_model_name_or_path, kwargs)
            distributed.check_distributed_config(cls, config, kwargs["distributed_config"], distributed.world_size())
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            checkpoint.check_local_source(pretrained_model_name_or_path)
            if os.path.isdir(pretrained_model_name_or_path):
                # the checkpoint itself is in `subfolder` when one is given (transformers reads config and weights there)
                folder = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"No folder {kwargs['subfolder']!r} in {pretrained_model_name_or_path} (`subfolder`).")
                checkpoint.check_index_of(folder)  # transformers would fail on a bare JSON error
        # A decoder-layer tensor the checkpoint lacks is an error naming it, unless `allow_missing_weights=True`
        # (transformers would initialise it at random and only mention it in the load report).
        allow_missing = kwargs.pop("allow_missing_weights", False)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        distributed.sync_initialized_parameters(model, info.get("missing_keys", ()))  # one random init on every rank
        if not allow_missing and pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None:
            checkpoint.check_no_missing_weights(model, info.get("missing_keys", ()), pretrained_model_name_or_path)
        return (model, info) if want_info else model

    # The private transformers hooks overridden here and in the causal LM, and the private APIs used, are listed and
    # version-checked in compat.py.
    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        # header checks (clear errors naming tensor and file) before transformers reads, MTP report after
        return checkpoint.load_pretrained_model(
            compat.base_load_pretrained_model(), model, state_dict, checkpoint_files, load_config, *args, **kwargs
        )

    def to(self, *args, **kwargs):
        # torch casts every floating-point parameter and buffer, embeddings and norms included, to a float8 dtype
        # without a word; no layer computes in float8 (FP8 storage is the quantizer's, with its block scales)
        dtype = compat.dtype_of_to_call(*args, **kwargs)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize == 1:
            raise ValueError(
                f"Cannot cast the model to {dtype}: no layer computes in float8. FP8 weights come with their block scales "
                "from the `fp8_block` quantizer or an FP8 checkpoint (`DeepseekV3FP8Config`); cast to float32, bfloat16 "
                "or float16 instead."
            )
        return super().to(*args, **kwargs)

    # transformers refuses .half() and .float() on every quantized model; an FP8 folder kept in FP8 casts safely (its
    # FP8 layers keep their storage dtype, KeepsStorageDtype), as `.to(dtype)` already did, so they cast it the same way
    def half(self, *args):
        if isinstance(getattr(self, "hf_quantizer", None), checkpoint.DeepseekV3FP8HfQuantizer):
            return nn.Module.half(self, *args)
        return super().half(*args)

    def float(self, *args):
        if isinstance(getattr(self, "hf_quantizer", None), checkpoint.DeepseekV3FP8HfQuantizer):
            return nn.Module.float(self, *args)
        return super().float(*args)

    def dequantize(self, dtype=None):
        """Every FP8 layer back to high precision, by the one route both kinds of FP8 model take: a loaded FP8 folder
        through transformers' quantizer (its ``hf_quantizer``), FP8 layers the ``quantizer`` plugin made in memory by
        the plugin's own undo (transformers only says "first quantize your model" there). Either way the quantizer
        leaves the config (a folder saved with ``fp8_mode='inference'`` would not load again: that mode reads FP8
        checkpoints only), and with a ``dtype`` the whole model follows it (transformers casts the FP8 layers alone,
        and the forward then mixed two dtypes; the router biases stay fp32)."""
        if dtype is not None:
            check_dequantize_dtype(dtype, "`model.dequantize(dtype=...)`")
        # A layer accelerate offloaded (a device_map with "disk", or "cpu" beside a GPU) holds meta tensors outside its
        # forward: its dequantized replacement would hold meta weights and no offload hook (the logits came out nan).
        meta = next((name for name, m in self.named_modules() if isinstance(m, (FP8Linear, FP8Experts))
                     and any(t.is_meta for t in m.parameters(recurse=False))), None)
        if meta is not None:
            raise ValueError(
                f"Cannot dequantize {meta!r}: its FP8 weights are on the meta device (offloaded by a `device_map`, or "
                "never loaded). Convert the folder instead (`deepseek-v3-convert SRC DST --to bf16`) and load that."
            )
        plugin = self.config.plugin("quantizer") if self.config.quantizer is not None else None
        if getattr(self, "hf_quantizer", None) is not None or not hasattr(plugin, "dequantize"):
            super().dequantize(dtype=dtype)  # transformers' error when nothing is quantized
        else:
            plugin.dequantize(self, dtype or self.dtype)
        self.config.quantizer = None
        if dtype is not None:
            self.to(dtype)  # FP8-free now, so an ordinary cast
            self.config.dtype = dtype
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        # official layout (MTP copies of embedding/head), written to a temporary folder then renamed, plus README.md
        return checkpoint.save_pretrained(self, super().save_pretrained, save_directory, *args, **kwargs)

    def gather_sharded_state_dict_for_save(self, model_to_save, state_dict, distributed_config, **kwargs):
        # A sharded model's save gathers the full weights itself (ignoring the state dict it was handed): the MTP
        # layers' copies of the embedding and head are added to what it gathered.
        gathered = super().gather_sharded_state_dict_for_save(model_to_save, state_dict, distributed_config, **kwargs)
        return checkpoint.with_mtp_copies(gathered, self) if gathered else gathered

    def load_state_dict(self, state_dict, *args, **kwargs):
        # a state dict in the official layout (what we save; what Trainer reloads on resume): the experts modules take
        # their per-expert entries themselves (ExpertsPlugin's pre-hook); the MTP copies are no parameters
        return super().load_state_dict(checkpoint.without_mtp_copies(state_dict), *args, **kwargs)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # transformers' push_to_hub put a placeholder README.md there; ours describes the model
        model_card.prepare_push(self, working_dir, repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and any(isinstance(m, (FP8Linear, FP8Experts)) for m in self.modules()):
            logger.warning_once(
                "This model holds weights stored in FP8 (an FP8 checkpoint kept in FP8, or `fp8_mode='inference'`): they "
                "are frozen, so training updates only the other parameters (and adapters such as LoRA). To train them "
                "in FP8, build the model with `quantizer='fp8_block', fp8_mode='train'` from high-precision weights."
            )
        return self

    def update_expert_bias(self, update_speed: float | None = None, process_group=None):
        """One aux-loss-free balancing step from the loads counted since the last call (see ``training``)."""
        return update_expert_bias(self, update_speed, process_group)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Buffers too: models are built on the meta device when loading, and non-persistent buffers are not loaded.
        if isinstance(module, RouterPlugin):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "e_score_correction_bias", None) is not None:
                init.zeros_(module.e_score_correction_bias)
        if isinstance(module, DeepseekV3Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    # Set by the static-cache MTP loop (speculative.py) while it runs: its two-token verification steps feed the model
    # its own tokens, like a one-token decoding step, so they skip the input checks' host read as well.
    _verifying_drafts = False

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        mtp_module = config.plugin("mtp_backend") if config.num_nextn_predict_layers else None
        self.layers = nn.ModuleList(
            [DeepseekV3DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
            + [mtp_module(config, depth) for depth in range(config.num_nextn_predict_layers)]
        )
        self.norm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps, config.fused_kernels)
        self.rotary_emb = DeepseekV3RotaryEmbedding(config)
        self.gradient_checkpointing = False
        # The last dims of the keys and values the attention plugin caches (None: it does not say), so that a cache
        # filled by a model of other widths is named instead of failing in a concatenation or a matmul.
        cache_widths = getattr(config.plugin("attention_backend"), "cache_widths", None)
        self._cache_widths = cache_widths(config) if cache_widths is not None else None
        self.post_init()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.layers[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.layers[self.config.num_hidden_layers :]

    def _check_input_tensors(self, input_ids, inputs_embeds) -> None:
        """Static checks of the input (types, shapes, dtypes: no device read), before anything reads its shape."""
        name, inputs = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(inputs).__name__}.")
        shape = inputs.shape if input_ids is not None else inputs.shape[:-1]
        if inputs.dim() != (2 if input_ids is not None else 3) or shape[0] == 0 or shape[1] == 0:
            expected = "[batch, seq_len]" if input_ids is not None else "[batch, seq_len, hidden_size]"
            raise ValueError(f"Expected a non-empty batch of shape {expected}, got `{name}` of shape {tuple(inputs.shape)}.")
        if input_ids is not None and input_ids.dtype not in (torch.int64, torch.int32):
            # the embedding takes int64 or int32 indices only (uint8 and int16 are rejected deep inside it)
            kind = "integer token ids" if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool else "int64 or int32 token ids"
            raise ValueError(f"`input_ids` must hold {kind}, got dtype {input_ids.dtype}.")
        # a pipeline stage after the first holds no embedding (its inputs are the previous stage's hidden states)
        embedding = getattr(self.embed_tokens, "weight", None)
        if inputs_embeds is not None:
            input_checks.check_inputs_embeds(inputs_embeds, self.config.hidden_size, None if embedding is None else embedding.dtype)
        if embedding is not None and embedding.dtype == torch.float64 and self.config._experts_implementation == "grouped_mm":
            raise ValueError(
                "The model is in float64, which torch's grouped GEMM (`experts_implementation='grouped_mm'`) does not "
                "take: `model.set_experts_implementation('eager')` (or 'batched_mm') runs the experts in float64."
            )

    def _check_inputs(self, input_ids, position_ids, attention_mask, past_key_values, decoding: bool,
                      inputs_embeds=None, cache_position=None, past=None, capacity=None, restarts=False) -> bool:
        """Clear errors for bad input values. They read the device once, so they are skipped where that would cost a
        host sync per generated token: a one-token step over a cache (``decoding``; its token came from the model's
        own vocabulary) and compiled graphs. ``past`` and ``capacity`` are the cache's ``input_checks.cached_length``
        and ``static_capacity``, read once by the forward. With ``restarts``, returns whether ``position_ids`` restart
        (packed documents) in the same read."""
        if decoding or torch.compiler.is_compiling():
            return False
        # One host read for all checks.
        extremes = {"first_position": position_ids.min(), "last_position": position_ids.max()}
        if input_ids is not None:
            extremes.update(min_id=input_ids.min(), max_id=input_ids.max())
        if inputs_embeds is not None:
            # a NaN or inf embedding reaches every later position through attention (a padded one included: its key
            # scores are NaN before the mask is added), and every output is then NaN without a word why
            extremes["non_finite_embeds"] = (~inputs_embeds.isfinite()).sum()
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype != torch.bool:
            # transformers reads a 2-D mask as bool: an additive mask (0 / -inf) would silently keep only the padding
            extremes["non_binary_mask_values"] = ((attention_mask != 0) & (attention_mask != 1)).sum()
        if restarts:
            extremes["restarts"] = (torch.diff(position_ids, dim=-1) != 1).sum()
        if capacity is not None:  # a static layer's length is a device tensor
            extremes["cached"] = torch.as_tensor(past_key_values.get_seq_length())
        if cache_position is not None and (capacity is not None or past is not None):
            extremes.update(first_cache_position=cache_position[0], last_cache_position=cache_position[-1])
        values = torch.stack([e.to(position_ids.device, torch.int64) for e in extremes.values()]).tolist()
        found = dict(zip(extremes, values))
        if input_ids is not None and (found["min_id"] < 0 or found["max_id"] >= self.config.vocab_size):
            raise ValueError(
                f"`input_ids` must lie in [0, vocab_size={self.config.vocab_size}), got values in [{found['min_id']}, {found['max_id']}]."
            )
        if found.get("non_finite_embeds", 0):
            raise ValueError(f"`inputs_embeds` holds {found['non_finite_embeds']} non-finite value(s) (NaN or inf).")
        if found["first_position"] < 0:
            raise ValueError(f"`position_ids` count from 0, got a value of {found['first_position']}.")
        if found.get("non_binary_mask_values", 0):
            raise ValueError(
                f"A 2-D `attention_mask` holds 1 at the tokens to attend to and 0 at padding; got {found['non_binary_mask_values']} "
                "other value(s). (An additive mask of 0 and -inf must be passed as a 4-D mask [batch, 1, seq_len, keys].)"
            )
        seq_len = position_ids.shape[1]
        if "first_cache_position" in found:
            cached = found["cached"] if capacity is not None else past
            if (found["first_cache_position"], found["last_cache_position"]) != (cached, cached + seq_len - 1):
                # the cache is written at its own length whatever `cache_position` says
                raise ValueError(
                    f"`cache_position` ({found['first_cache_position']}..{found['last_cache_position']}) disagrees with "
                    f"the {cached} positions `past_key_values` holds: the model writes the cache at its own length, "
                    f"positions {cached}..{cached + seq_len - 1}. Drop `cache_position` (pass `position_ids` for other "
                    "rotary positions), or crop or reset the cache."
                )
        if capacity is not None and found["cached"] + seq_len > capacity:
            raise ValueError(
                f"The static cache holds {found['cached']} of its {capacity} positions: the input's {seq_len} tokens do "
                "not fit. Build a longer cache (`max_cache_len`), or reset this one (`cache.reset()`) for a new prompt."
            )
        # Rotary embeddings are defined at any position (transformers' class computes them too), but past the trained
        # length (`max_position_embeddings`, the extended one under YaRN) the model extrapolates: say so once.
        last_position = found["last_position"]
        if last_position >= self.config.max_position_embeddings:
            logger.warning_once(
                f"Position {last_position} is beyond `max_position_embeddings`={self.config.max_position_embeddings}: "
                "the model was not trained on inputs this long (plus any cached prefix), expect degraded outputs."
            )
        return found.get("restarts", 0) > 0

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> DeepseekV3ModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        self._check_input_tensors(input_ids, inputs_embeds)
        inputs = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = inputs.shape[:2]
        # transformers 4's argument, which nothing reads: accepted where it agrees with the cache
        cache_position = kwargs.pop("cache_position", None)
        input_checks.check_cache_position(cache_position, seq_len)
        input_checks.check_forward_kwargs(kwargs, _FORWARD_PARAMETERS)
        embedding = getattr(self.embed_tokens, "weight", None)
        model_dtype = None if embedding is None else embedding.dtype
        input_checks.check_cache(past_key_values, batch_size, seq_len, self._cache_widths, self.config.num_hidden_layers,
                                 model_dtype)
        past, capacity = input_checks.cached_length(past_key_values), input_checks.static_capacity(past_key_values)
        input_checks.check_attention_mask(
            attention_mask, (batch_size, seq_len), past, capacity, self.config.num_attention_heads, model_dtype,
        )
        if use_cache and past_key_values is None and self.training and any(map(compat.checkpoint_wrapped, self.layers)):
            # Layers under an activation-checkpointing wrapper (accelerate's FSDP `activation_checkpointing`) run
            # again in the backward: each would append its keys to the cache a second time and attend over twice the
            # keys (torch's CheckpointError). No one reads a training forward's cache; transformers' own gradient
            # checkpointing drops it too.
            use_cache = False
        fresh_cache = use_cache and past_key_values is None
        if fresh_cache:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq_len, device=inputs.device) + past_seen).unsqueeze(0)
        input_checks.check_position_ids(position_ids, batch_size, seq_len)
        # `past` (read before a default cache was made) is 0 for a first forward: a one-token prompt is checked like
        # any prompt (its ids came from the caller, not from the model)
        decoding = past_key_values is not None and past != 0 and (seq_len == 1 or self._verifying_drafts)
        packed = self._check_inputs(input_ids, position_ids, attention_mask, past_key_values, decoding=decoding,
                                    inputs_embeds=inputs_embeds, cache_position=cache_position, past=past,
                                    capacity=capacity, restarts=fresh_cache and attention_mask is None)
        # transformers' mask builder reads packed documents from `position_ids` (no attention_mask, positions
        # restarting at 0) only when it is handed no cache, and `use_cache` defaults to the config's True: a forward
        # over packed rows outside transformers.Trainer (which sets use_cache=False) attended across documents, while
        # the MTP modules kept to each one. A cache made here holds no prefix, so the builder is told there is none
        # where the rows are packed (known from the input check's read; in a compiled graph it cannot be read).
        mask_cache = None if fresh_cache and (packed or torch.compiler.is_compiling()) else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=mask_cache,
            position_ids=position_ids,
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        # The routers leave padding out of their loads and balance losses; only a 2-D padding mask says where it is.
        token_mask = token_mask_from_attention_mask(attention_mask, inputs_embeds.shape[1])

        hidden_states, aux_losses = inputs_embeds, []
        for layer in self.decoder_layers:
            output = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
                token_mask=token_mask,
                **kwargs,
            )
            # a pipeline stage replaces the layers it does not own by identities that return the hidden states alone
            hidden_states, aux_loss = output if isinstance(output, tuple) else (output, None)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        hidden_states = self.norm(hidden_states)
        return DeepseekV3ModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values, aux_loss=sum_losses(aux_losses)
        )


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: DeepseekV3Config):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.quantizer is not None:
            config.plugin("quantizer")(config).apply(self)

    def generate(self, inputs=None, *args, **kwargs):
        # transformers' generate reads the prompt's shape (and derives positions from the mask) before our forward
        # sees them, so a prompt that is not [batch, seq_len] would fail inside it with an IndexError
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        input_checks.check_generate_kwargs(kwargs, kwargs.get("generation_config") or self.generation_config)
        if prompt is not None and not isinstance(prompt, torch.Tensor):
            raise TypeError(f"`generate` takes the prompt as a tensor of token ids [batch, seq_len], got {type(prompt).__name__}.")
        if isinstance(prompt, torch.Tensor) and not prompt.dtype.is_floating_point:
            if prompt.dim() != 2:
                raise ValueError(f"`generate` takes token ids of shape [batch, seq_len], got a prompt of shape {tuple(prompt.shape)}.")
            input_checks.check_attention_mask(kwargs.get("attention_mask"), prompt.shape)
            self._check_static_cache_room(prompt.shape[1], kwargs)
            input_checks.check_cached_prompt(kwargs.get("past_key_values"), prompt.shape[1])
        if not self.training:
            return super().generate(inputs, *args, **kwargs)
        # A model left in training mode (a sampling callback inside a training run) would count the generated tokens
        # as training loads for the next routing-bias step: generation is inference, so it runs in eval mode.
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            return super().generate(inputs, *args, **kwargs)
        finally:
            for module, mode in modes:  # each module's own mode back (a frozen part may have been in eval)
                module.training = mode

    @contextmanager
    def _optimize_model_for_decode(self):
        # On an accelerator transformers switches `grouped_mm` experts to `batched_mm` for the decoding steps. Experts
        # stored in FP8 run their own grouped FP8 GEMMs whatever the setting says, and `set_experts_implementation`
        # refuses to switch them: generate failed at its first step on every FP8 folder kept in FP8 on a GPU (and on
        # the CPU where an offloaded embedding puts `self.device` on the meta device). There is nothing to switch.
        if any(isinstance(module, FP8Experts) for module in self.modules()):
            yield
            return
        with super()._optimize_model_for_decode():
            yield

    def init_continuous_batching(self, *args, **kwargs):
        # transformers' continuous batching (`generate_batch`, `init_continuous_batching`, `transformers serve`) runs the
        # forward over its paged cache of per-head keys and values of one width, which neither attention plugin caches
        # (mla: the latent c_kv and k_rope; mha: keys and values of two widths). Its generation thread only logged the
        # failure, so generate_batch returned every request without a token; transformers' own class fails the same.
        raise NotImplementedError(
            "Continuous batching (`generate_batch`, `init_continuous_batching`) is not supported by DeepseekV3ForCausalLM: "
            "transformers' paged cache holds per-head keys and values of one width, which "
            f"attention_backend={self.config.attention_backend!r} does not cache (mla caches its latent c_kv and k_rope). "
            "Use `generate` on a left-padded batch (`attention_mask` marks the padding) instead."
        )

    def _check_static_cache_room(self, prompt_len: int, kwargs: dict) -> None:
        """A static cache passed to ``generate`` holds every position but the last one generated: name a cache that is
        too short before the first step, instead of an index error inside a later one."""
        capacity = input_checks.static_capacity(kwargs.get("past_key_values"))
        if capacity is None:
            return
        config = kwargs.get("generation_config") or self.generation_config
        max_new = kwargs.get("max_new_tokens", None if "max_length" in kwargs else config.max_new_tokens)
        max_length = prompt_len + max_new if max_new is not None else kwargs.get("max_length", config.max_length)
        if max_length is None:
            # no length set anywhere: transformers generates its default 20 new tokens (its default `max_length`, then
            # counted from the prompt), at most up to max_position_embeddings
            max_length = min(prompt_len + 20, self.config.max_position_embeddings)
        input_checks.check_static_cache_room(capacity, max_length)

    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        # `generate(..., use_mtp=True)`: our MTP modules draft inside transformers' assisted-decoding loop (see
        # speculative.py for why not transformers' own MTP generator).
        if getattr(generation_config, "use_mtp", False):
            from .speculative import MTPDraftCandidateGenerator, check_single_draft_source

            check_single_draft_source(generation_config, kwargs.get("assistant_model"))
            return MTPDraftCandidateGenerator(
                self, generation_config, kwargs.get("logits_processor"), kwargs.get("model_kwargs")
            )
        return super()._get_candidate_generator(generation_config, *args, **kwargs)

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                           streamer=None, inputs_tensor=None, assistant_model=None, assistant_tokenizer=None,
                           tokenizer=None, **model_kwargs):
        # `generate(..., use_mtp=True)` over a static cache: transformers' assisted loop refuses static caches, so
        # speculative.py runs a loop of its own (its docstring says why); everything else is transformers' loop.
        if getattr(generation_config, "use_mtp", False):
            from .speculative import check_single_draft_source, is_static_cache, mtp_static_decoding

            if is_static_cache(model_kwargs.get("past_key_values")):
                check_single_draft_source(generation_config, assistant_model)
                return mtp_static_decoding(
                    self, input_ids, logits_processor, stopping_criteria, generation_config,
                    synced_gpus=synced_gpus, streamer=streamer, **model_kwargs,
                )
        if synced_gpus:
            # transformers' assisted loop keeps appending the accepted tokens of a process that has finished while it
            # runs on for the others (a sharded model's forwards are collectives): its output would run past its EOS
            stopping_criteria, finished_at = _recording_finish(stopping_criteria)
        # transformers' assisted loop feeds its first step the whole prompt, also when the cache passed in already
        # holds a prefix of it (its plain loop's prefill skips that prefix): the prefix went through the model a
        # second time on top of its cached self and every token after it changed, silently (transformers' class too).
        # prepare_inputs_for_generation skips it in that step, as the prefill does.
        cache = model_kwargs.get("past_key_values")
        self._assisted_cached_prefix = (cache, _cached_prompt_prefix(input_ids, generation_config, model_kwargs))
        try:
            output = super()._assisted_decoding(
                input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=synced_gpus,
                streamer=streamer, inputs_tensor=inputs_tensor, assistant_model=assistant_model,
                assistant_tokenizer=assistant_tokenizer, tokenizer=tokenizer, **model_kwargs,
            )
        finally:
            self._assisted_cached_prefix = None
        if synced_gpus and finished_at:
            if isinstance(output, torch.Tensor):
                return output[:, : finished_at[0]]
            output.sequences = output.sequences[:, : finished_at[0]]
        return output

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        # the first step of the assisted loop over a cache that holds a prefix of the prompt (see _assisted_decoding);
        # the cache's identity keeps an assistant's own generate (this model may be its own assistant) out of it
        cache, prefix = getattr(self, "_assisted_cached_prefix", None) or (None, 0)
        if prefix and is_first_iteration and next_sequence_length is None and past_key_values is cache:
            next_sequence_length = input_ids.shape[1] - prefix
            self._assisted_cached_prefix = None
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_mtp_loss: bool | None = None,
        **kwargs,
    ) -> DeepseekV3CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` [B, T], *optional*):
            Token ids aligned with the input (position i predicts ``labels[i + 1]``); -100 is ignored. Positions that
            a 2-D ``attention_mask`` marks as padding are ignored as sources and as targets, at every depth.
        shift_labels (`torch.LongTensor` [B, T], *optional*, by keyword):
            Targets already aligned with the positions (position i predicts ``shift_labels[i]``), as sequence- and
            context-parallel training pass them: the shift was made on the whole sequence before it was split, so
            the last position of a shard has the first token of the next one as its target. When given, it replaces
            the targets derived from ``labels``; MTP depth k predicts ``shift_labels[i + k]``. Padding is then
            ignored only as a source (the targets are the caller's).
        return_mtp_loss (`bool`, *optional*):
            Run the ``num_nextn_predict_layers`` MTP modules and compute ``mtp_loss`` (needs ``labels``). Defaults to
            ``self.training``: training gets the MTP objective, inference skips the modules. With
            ``mtp_loss_weight=0`` training skips them too, and with ``return_mtp_loss=True`` they report ``mtp_loss``
            but add nothing to ``loss`` (their routers' balance loss included).

        With labels, ``loss = CE + mtp_loss_weight · mtp_loss + aux_loss`` (docs/equations.md): ``CE`` the next-token
        cross-entropy, ``mtp_loss = (1/D) Σ_k CE_k`` with ``CE_k`` the cross-entropy of MTP module k predicting
        ``t_{i+k+1}``, ``aux_loss`` the routers' balance losses (training only; MTP modules' routers included
        when they ran). Each cross-entropy is a mean over its targets (0 when there are none). When the Trainer
        passes ``num_items_in_batch`` (targets in the whole gradient-accumulation batch), ``CE`` is summed over
        this micro-batch and divided by it, and the per-micro-batch means ``mtp_loss`` and ``aux_loss`` are
        weighted by this micro-batch's share of those targets, so the accumulated gradient is that of the
        whole batch when every row holds as many targets (with padding, slightly off it: docs/equations.md).
        ``num_items_in_batch`` counts the labels other than -100, as the Trainer does; where a label follows padding
        (a left-padded row) it is no target here, and the count is scaled to this micro-batch's targets
        (``_as_counted_here``). ``mtp_loss`` and ``aux_loss`` are reported unweighted.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        # Through **kwargs, as in transformers' causal LMs: transformers.Trainer takes every forward parameter whose name
        # holds "label" for a label the batch must carry, and without `shift_labels` in it evaluated no loss.
        shift_labels = kwargs.pop("shift_labels", None)
        inputs = input_ids if input_ids is not None else inputs_embeds
        seq_len = inputs.shape[1] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None
        input_checks.check_logits_to_keep(logits_to_keep, seq_len)
        if not isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = int(logits_to_keep)  # a NumPy integer reads as the int it is
        input_checks.check_num_items_in_batch(num_items_in_batch)
        targets = _NextTokenTargets.build(labels, shift_labels, input_ids, inputs_embeds)
        input_checks.check_logits_to_keep_with_targets(logits_to_keep, targets is not None)
        depth = self.config.num_nextn_predict_layers
        input_checks.check_return_mtp_loss(return_mtp_loss, targets is not None, depth)
        run_mtp = targets is not None and depth > 0 and (self.training if return_mtp_loss is None else return_mtp_loss)
        if run_mtp:
            input_checks.check_loss_weight(self.config.mtp_loss_weight, "mtp_loss_weight")
            # λ = 0 switches the MTP objective off: training then skips the modules (a decoder layer and a head over
            # the vocabulary per depth) unless the loss is asked for by name
            run_mtp = return_mtp_loss is True or self.config.mtp_loss_weight != 0
        if run_mtp:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
                # the MTP modules build their own causal mask from a 2-D padding mask: a prepared one (packed
                # documents) would hold for the main model only, and the MTP modules would attend across it
                raise ValueError(
                    "The MTP loss needs a 2-D padding `attention_mask` (or none): the MTP modules build their own "
                    "causal mask and cannot apply a 4-D one; pass `return_mtp_loss=False` with a 4-D mask."
                )
            if input_checks.cached_length(past_key_values):
                # the MTP modules run over this forward's positions without a cache: they would not see the prefix
                raise ValueError(
                    "The MTP loss is computed over whole sequences, but `past_key_values` holds a cached prefix: pass "
                    "the full sequence without a cache, or `return_mtp_loss=False`."
                )
        if run_mtp and targets.aligned.shape[1] < depth + 2:
            raise ValueError(
                f"num_nextn_predict_layers={depth}: MTP module {depth} predicts the token {depth + 1} positions ahead, "
                f"so sequences need at least {depth + 2} tokens; got labels of length {targets.aligned.shape[1]}."
            )

        outputs: DeepseekV3ModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            # the base model would follow `config.return_dict=False` and give a tuple; this forward reads its fields
            # (and @can_return_tuple makes its own output a tuple then)
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = mtp_loss = None
        aux_loss = outputs.aux_loss
        if targets is not None:
            token_mask = token_mask_from_attention_mask(attention_mask, targets.aligned.shape[1])
            main_targets = targets.at_depth(0, token_mask)
            targets.check_values(self.config.vocab_size, num_items_in_batch)
            if num_items_in_batch is not None:
                num_items_in_batch = _as_counted_here(num_items_in_batch, targets.aligned, main_targets)
            fused = self.config.fused_kernels
            loss, num_targets = _cross_entropy(logits, main_targets[:, slice_indices], num_items_in_batch, fused)
            extra = None  # the per-micro-batch means added to CE
            if run_mtp:
                embeds = inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)
                documents = _packed_documents(position_ids, attention_mask, targets.aligned.shape)
                # The MTP modules run after the backbone's output capture ended, so they record nothing; once a call
                # with `output_attentions`/`output_hidden_states` installed transformers' capturing hooks, those on
                # their layers read a ContextVar, which a compiled training step cannot trace: kept inactive here.
                mtp_loss, mtp_aux_loss = compat.without_output_capture(
                    self._mtp_forward, hidden_states, embeds, targets, token_mask, position_ids, documents
                )
                # With λ = 0 (return_mtp_loss=True) the modules only report mtp_loss: neither it nor their routers'
                # balance loss, whose gradient reaches the main model through hnorm(h^0), enters the loss.
                if self.config.mtp_loss_weight != 0:
                    extra = self.config.mtp_loss_weight * mtp_loss
                    if mtp_aux_loss is not None:
                        aux_loss = mtp_aux_loss if aux_loss is None else aux_loss + mtp_aux_loss.to(aux_loss.device)
            if aux_loss is not None:
                extra = aux_loss.to(loss.device) if extra is None else extra + aux_loss.to(loss.device)
            if extra is not None:
                if num_items_in_batch is not None:
                    extra = extra * (num_targets / _at_least_one(num_items_in_batch, loss.device))
                loss = loss + extra

        return DeepseekV3CausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            mtp_loss=mtp_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _mtp_forward(self, main_hidden, embeds, targets: "_NextTokenTargets", token_mask, position_ids, documents=None):
        """``(mtp_loss, aux_loss of the MTP modules' routers or None)``: the D sequential modules of docs/equations.md.

        Module k (1-based) at position i combines ``h^{k-1}_i`` with the embedding of ``t_{i+k}`` and predicts
        ``t_{i+k+1}``. Positions i ≥ T−k have no token ``t_{i+k}``, so depth k runs on the first T−k positions
        only (causal attention makes that identical to running the full length and ignoring the tail).
        ``h^0`` is the main model's last hidden state after ``model.norm``; ``h^k`` is module k's output before
        its ``shared_head.norm``. ``documents`` [B, T] (packed rows, ``_packed_documents``): a source position counts,
        and a target, only when ``t_i .. t_{i+k}`` (and the target) lie in one document.
        """
        seq_len = main_hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=main_hidden.device).unsqueeze(0)
        cos, sin = self.model.rotary_emb(main_hidden, position_ids)
        hidden, ce_losses, aux_losses = main_hidden, [], []
        for k, module in enumerate(self.model.mtp_layers, start=1):
            length = seq_len - k
            # A source position is real only if t_i, ..., t_{i+k} all are (h^{k-1}_i saw t_i; the input adds t_{i+k}).
            source_mask = None if token_mask is None else _window_all(token_mask, k + 1, length)
            # In a packed row the input at the last k positions of a document embeds the next document's tokens: those
            # positions route and count like padding. The attention mask stays None there, so that transformers' mask
            # builder still reads the documents from the positions and keeps each one's attention inside it.
            routed_mask = source_mask if documents is None else _same_document(documents, k + 1, length)
            hidden = hidden[:, :length]
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=source_mask,
                past_key_values=None,
                position_ids=position_ids[:, :length],
            )
            hidden, normed, aux_loss = module(
                hidden,
                embeds[:, k:],
                (cos[:, :length], sin[:, :length]),
                causal_mask,
                position_ids=position_ids[:, :length],
                token_mask=routed_mask,
                return_normed=True,
            )
            logits = self.lm_head(normed)
            fused = self.config.fused_kernels
            ce_losses.append(_cross_entropy(logits, targets.at_depth(k, token_mask, documents), None, fused)[0])
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        return torch.stack(ce_losses).mean(), sum_losses(aux_losses)


def _cached_prompt_prefix(input_ids, generation_config, model_kwargs) -> int:
    """The leading prompt positions a cache passed to ``generate`` already holds, read as transformers' prefill reads
    them: the prompt is the whole sequence when it is as long as the attention mask (else only the new tokens); 0
    when there is nothing to skip, or nothing would be left to feed."""
    cache = model_kwargs.get("past_key_values")
    past = cache.get_seq_length() if isinstance(cache, Cache) else 0
    mask = model_kwargs.get("attention_mask")
    mask_length = mask.shape[1] if mask is not None else compat.prefill_mask_length(generation_config)
    whole = model_kwargs.get("inputs_embeds") is not None or mask_length == input_ids.shape[1]
    return past if whole and 0 < past < input_ids.shape[1] else 0


def _recording_finish(stopping_criteria):
    """``stopping_criteria`` and a list that receives the sequence length at which it first stopped every sequence."""
    finished_at: list[int] = []

    def criteria(input_ids, scores, **kwargs):
        done = stopping_criteria(input_ids, scores, **kwargs)
        if not finished_at and bool(done.all()):
            finished_at.append(input_ids.shape[1])
        return done

    return criteria, finished_at


@dataclass
class DeepseekV3ModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the decoder layers' balance losses (already multiplied by ``aux_loss_alpha``), in training.
    """

    aux_loss: torch.FloatTensor | None = None


def sum_losses(losses: list[torch.Tensor]) -> torch.Tensor | None:
    """The one place the routers' balance losses are added up (None when no router returned one)."""
    if not losses:
        return None
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


@dataclass
class DeepseekV3CausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    r"""
    mtp_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean over the MTP depths of their cross-entropies (computed when the MTP modules ran), before the weight
        ``mtp_loss_weight``.
    aux_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the routers' balance losses (already multiplied by ``aux_loss_alpha``), in training.
    """

    mtp_loss: torch.FloatTensor | None = None


def _packed_documents(position_ids, attention_mask, shape) -> torch.Tensor | None:
    """[B, T] document index of each position for a packed batch (several documents in a row, each one's positions
    counting from 0 again, as transformers' DataCollatorWithFlattening gives them), else None. transformers' mask
    builder reads packing the same way, from ``position_ids`` when no 2-D ``attention_mask`` is given; the MTP modules
    (which run without a cache) attend within each document, and their sources and targets must not cross one either.
    Computed on the device, with no host read (an unpacked row is one document)."""
    if position_ids is None or attention_mask is not None or position_ids.dim() != 2:
        return None
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1).expand(shape)


def _same_document(documents: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """[B, length]: position i is True iff positions ``i .. i + width − 1`` exist and lie in one document (documents
    are contiguous, so the two ends decide)."""
    ends = nn.functional.pad(documents, (0, width - 1), value=-1)[:, width - 1 : width - 1 + length]  # -1: past the end
    return documents[:, :length] == ends


def _window_all(token_mask: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """[B, length]: position i is True iff ``token_mask[:, i : i + width]`` is all True (False beyond the end)."""
    padded = torch.cat([token_mask, token_mask.new_zeros(token_mask.shape[0], width)], dim=1)
    out = padded[:, :length].clone()
    for j in range(1, width):
        out &= padded[:, j : j + length]
    return out


@dataclass
class _NextTokenTargets:
    """``aligned`` [B, T]: the next-token target of each position (``labels`` shifted left, -100 at the end, or the
    caller's ``shift_labels``); ``window``: how many positions from a source on must be real tokens for its target
    to count (2 when derived from ``labels``: the source and its target; 1 for ``shift_labels``: the source)."""

    aligned: torch.Tensor
    window: int

    @classmethod
    def build(cls, labels, shift_labels, input_ids, inputs_embeds) -> "_NextTokenTargets | None":
        if labels is None and shift_labels is None:
            return None
        inputs = input_ids if input_ids is not None else inputs_embeds
        shape = inputs.shape[:2] if inputs is not None else None  # no input: the model's own check names that
        for name, value in (("labels", labels), ("shift_labels", shift_labels)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
            if value is not None and shape is not None and tuple(value.shape) != tuple(shape):
                raise ValueError(f"`{name}` must have the input's shape {list(shape)} ([batch, seq_len]), got {list(value.shape)}.")
            if value is not None and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
                raise ValueError(f"`{name}` must hold integer token ids (or -100), got dtype {value.dtype}.")
        # int64 whatever integer dtype they came in: the cross-entropy takes int64 targets, and -100 needs a signed type
        if shift_labels is not None:
            return cls(shift_labels.long(), window=1)
        return cls(nn.functional.pad(labels[:, 1:].long(), (0, 1), value=-100), window=2)

    def check_values(self, vocab_size: int, num_items_in_batch=None) -> None:
        """Every target is -100 or a token id in ``[0, vocab_size)``, and ``num_items_in_batch`` (the labels other
        than -100 of the whole accumulated batch, as transformers.Trainer counts them) is not fewer than this
        micro-batch's alone: fewer would scale the loss up (0 made the loss a sum). One host read per training forward (a GPU's
        cross-entropy would otherwise stop on a device-side assert that names nothing); skipped in compiled graphs."""
        if torch.compiler.is_compiling():
            return
        bad = ((self.aligned < 0) & (self.aligned != -100)) | (self.aligned >= vocab_size)
        wrong = bad.any()
        if num_items_in_batch is not None:
            count = (self.aligned != -100).sum()  # the Trainer's count, padding or not (see _as_counted_here)
            given = num_items_in_batch.detach().to(count.device) if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
            # a nan or inf count (a tensor's: a Python number is checked with the arguments) made the loss nan or 0
            wrong = wrong | (count > given) | ~torch.isfinite(torch.as_tensor(given, dtype=torch.float32, device=count.device))
        if not wrong:  # the one read; the error paths below read again to say what is wrong
            return
        if bad.any():
            values = self.aligned[bad]
            raise ValueError(
                f"`labels` (or `shift_labels`) must be -100 or token ids in [0, vocab_size={vocab_size}), got "
                f"{values.numel()} value(s) outside, e.g. {values[:4].tolist()}."
            )
        given = given.item() if isinstance(given, torch.Tensor) else given
        if not math.isfinite(given):
            raise ValueError(f"`num_items_in_batch` must be the number of targets in the whole batch, got {given}.")
        raise ValueError(
            f"`num_items_in_batch` ({given:g}) is fewer than the {int(count)} targets of this micro-batch alone: it must "
            "count the targets of the whole accumulated batch, as transformers.Trainer does: the labels other than -100 "
            "(`labels[..., 1:]`, or `shift_labels`)."
        )

    def at_depth(self, k: int, token_mask: torch.Tensor | None, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Targets [B, T−k] of MTP depth k (0 = the main head): position i predicts ``aligned[i + k]``
        (= ``t_{i+k+1}``); -100 where a source token ``t_i..t_{i+k}`` (or, from ``labels``, the target) is padding,
        or, in a packed row (``documents``, MTP depths only), lies in another document than ``t_i``. The main head's
        targets stay the caller's there, as in transformers' class (DataCollatorWithFlattening puts -100 at every
        document's first token)."""
        length = self.aligned.shape[1] - k
        targets = self.aligned[:, k:]
        if token_mask is not None:
            real = _window_all(token_mask.to(targets.device), k + self.window, length)
            targets = targets.masked_fill(~real, -100)
        if documents is not None and k > 0:
            targets = targets.masked_fill(~_same_document(documents.to(targets.device), k + self.window, length), -100)
        return targets


def _as_counted_here(num_items_in_batch, aligned: torch.Tensor, main_targets: torch.Tensor):
    """``num_items_in_batch`` in this model's targets. transformers.Trainer counts every label other than -100
    (``labels[..., 1:]``), while a target here also needs a real source: in a left-padded row the first real token,
    predicted from padding, is no target (nor is a label the caller left on padding). Divided by the Trainer's count,
    the loss of a left-padded batch (eval_loss included) came out below its mean by that share. The count is scaled by
    this micro-batch's ratio of the two: exact for a whole batch (evaluation, no accumulation), the same count where
    they agree (no padding, right padding with -100), and under accumulation each micro-batch weighted by its share of
    the Trainer's count. No host read."""
    counted = (aligned != -100).sum()
    here = (main_targets != -100).sum()
    num_items_in_batch = torch.as_tensor(num_items_in_batch, device=here.device)
    scaled = num_items_in_batch * (here / counted.clamp(min=1))
    return torch.where(here == counted, num_items_in_batch, scaled)


def _at_least_one(count, device) -> torch.Tensor:
    return torch.as_tensor(count, device=device).clamp(min=1)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None, fused_kernels="off"):
    """``(loss, number of targets)``: the summed cross-entropy over targets ≠ -100, divided by their number (by
    ``num_items_in_batch`` when given; never by 0, so all -100 gives a zero loss that still backpropagates)."""
    targets = targets.to(logits.device)
    if kernels.use_fused(fused_kernels, logits, needs_triton=False):
        # same sum in chunks: no fp32 [N, V] copy, log-softmax or gradient (config `fused_kernels`)
        total = kernels.chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), -100)
    else:
        total = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
    count = (targets != -100).sum()
    denominator = _at_least_one(count if num_items_in_batch is None else num_items_in_batch, logits.device)
    return total / denominator, count


@dataclass
class DeepseekV3SequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    r"""
    aux_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the routers' balance losses (already multiplied by ``aux_loss_alpha``), in training.
    router_logits (`tuple(torch.FloatTensor)`, *optional*, with ``output_router_logits=True``):
        The routers' logits [tokens, n_routed_experts], one per MoE layer.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DeepseekV3TokenClassifierOutput(TokenClassifierOutput):
    r"""
    aux_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Sum of the routers' balance losses (already multiplied by ``aux_loss_alpha``), in training.
    router_logits (`tuple(torch.FloatTensor)`, *optional*, with ``output_router_logits=True``):
        The routers' logits [tokens, n_routed_experts], one per MoE layer.
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class _DeepseekV3ClassificationHead:
    """What our heads add to transformers' generic ones, whose forward they run: with labels, in training, the
    routers' balance loss joins the loss as in the causal LM (the generic heads read only the backbone's last hidden
    state, so a Trainer fine-tuning a classifier trained without it), and the output carries ``aux_loss`` and the
    ``router_logits`` that ``output_router_logits=True`` asked for (dropped by the generic heads)."""

    _generic_head: type
    _output_class: type

    # transformers.Trainer passes `num_items_in_batch` to a forward that takes **kwargs and then takes its loss for one
    # already divided by the items of the whole accumulated batch; the generic heads return the mean of the
    # micro-batch, so the loss and its gradients came out `gradient_accumulation_steps` times too large (and times
    # the process count with `average_tokens_across_devices`). Declared here, the Trainer averages the means itself.
    accepts_loss_kwargs = False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ):
        if labels is not None:
            inputs = input_ids if input_ids is not None else inputs_embeds
            if inputs is not None and self._labels_are_class_ids(labels):
                shape = inputs.shape[:1] if self._generic_head is GenericForSequenceClassification else inputs.shape[:2]
                _check_class_ids(labels, self.config.num_labels, tuple(shape))
        backbone = []
        hook = self.model.register_forward_hook(lambda module, args, output: backbone.append(output))
        try:
            # the undecorated generic forward hands `return_dict=True` on to the backbone, which would otherwise
            # follow `config.return_dict=False` and give a tuple the generic head cannot read (@can_return_tuple
            # above makes this forward's own output a tuple then)
            output = compat.undecorated_forward(self._generic_head)(
                self, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                return_dict=True, **kwargs,
            )
        finally:
            hook.remove()
        aux_loss, loss = backbone[-1].aux_loss, output.loss
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss.to(loss.device)
        return self._output_class(
            **{**output, "loss": loss}, aux_loss=aux_loss, router_logits=backbone[-1].router_logits
        )


def _check_class_ids(labels: torch.Tensor, num_labels: int, shape: tuple[int, ...]) -> None:
    """Labels of a cross-entropy head: one per sequence (token), each -100 or a class id in ``[0, num_labels)``. One
    host read per forward with labels (a GPU's cross-entropy would otherwise stop on a device-side assert that names
    nothing, a CPU's say "Target 3 is out of bounds"); the value check is skipped in compiled graphs."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a torch.Tensor, got {type(labels).__name__}.")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must hold class ids in [0, num_labels={num_labels}) or -100, got dtype {labels.dtype}.")
    if labels.numel() != math.prod(shape):
        raise ValueError(f"`labels` must hold one class id per {'token' if len(shape) == 2 else 'sequence'}, "
                         f"{list(shape)}, got shape {list(labels.shape)}.")
    if torch.compiler.is_compiling():
        return
    bad = ((labels < 0) & (labels != -100)) | (labels >= num_labels)
    if bad.any():
        values = labels[bad]
        raise ValueError(f"`labels` must be -100 or class ids in [0, num_labels={num_labels}), got {values.numel()} "
                         f"value(s) outside, e.g. {values[:4].tolist()}.")


class DeepseekV3ForSequenceClassification(
    _DeepseekV3ClassificationHead, GenericForSequenceClassification, DeepseekV3PreTrainedModel
):
    """Sequence classification (e.g. a reward model) on the last non-padding token, transformers' generic head
    (plus the balance loss and router logits, see ``_DeepseekV3ClassificationHead``)."""

    _generic_head = GenericForSequenceClassification
    _output_class = DeepseekV3SequenceClassifierOutputWithPast

    def _labels_are_class_ids(self, labels) -> bool:
        # transformers' loss takes integer labels for classes unless `problem_type` says otherwise (float labels
        # are multi-label targets, one label is regression)
        problem_type = self.config.problem_type
        if problem_type is None:
            integer = isinstance(labels, torch.Tensor) and labels.dtype in (torch.long, torch.int)
            return self.config.num_labels > 1 and integer
        return problem_type == "single_label_classification"


class DeepseekV3ForTokenClassification(
    _DeepseekV3ClassificationHead, GenericForTokenClassification, DeepseekV3PreTrainedModel
):
    """Token classification, transformers' generic head (plus the balance loss and router logits, see
    ``_DeepseekV3ClassificationHead``)."""

    _generic_head = GenericForTokenClassification
    _output_class = DeepseekV3TokenClassifierOutput

    def _labels_are_class_ids(self, labels) -> bool:
        return True  # transformers' token-classification loss is always a cross-entropy


__all__ = [
    "DeepseekV3PreTrainedModel",
    "DeepseekV3Model",
    "DeepseekV3ForCausalLM",
    "DeepseekV3ForSequenceClassification",
    "DeepseekV3ForTokenClassification",
    "DeepseekV3CausalLMOutputWithPast",
    "DeepseekV3ModelOutputWithPast",
    "DeepseekV3SequenceClassifierOutputWithPast",
    "DeepseekV3TokenClassifierOutput",
]
