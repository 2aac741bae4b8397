"""DeepseekV3Config: the released config.json, plus the fields that pick plugins and set training knobs.

The class extends transformers' own ``DeepseekV3Config`` so that every official field (legacy
``rope_scaling`` YaRN block, ``rope_theta``, ``auto_map``, ``quantization_config``, ...) loads exactly as
transformers reads it, and a folder we save stays readable by transformers' class, vLLM and SGLang.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
from types import SimpleNamespace

import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import CONFIG_MAPPING
from transformers import DeepseekV3Config as _TransformersDeepseekV3Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import CONFIG_NAME
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import compat, parallel_plans
from .fp8_config import as_quantization_config
from .registry import EXPERTS_KIND, get_plugin

# config field -> plugin kind it selects
PLUGIN_FIELDS = {
    "attention_backend": "attention",
    "topk_method": "router",
    "experts_backend": EXPERTS_KIND,
    "mtp_backend": "mtp",
    "quantizer": "quantizer",
}

FUSED_KERNEL_MODES = ("auto", "on", "off")
FP8_MODES = ("train", "inference")
SCORING_FUNCS = ("sigmoid", "softmax")
_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "max_position_embeddings",
)
_NON_NEGATIVE_INT_FIELDS = ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")
_FLOAT_FIELDS = ("routed_scaling_factor", "rms_norm_eps", "initializer_range")  # typed float by transformers
_NON_NEGATIVE_FLOAT_FIELDS = ("router_bias_update_speed", "aux_loss_alpha", "mtp_loss_weight")


class DeepseekV3Config(_TransformersDeepseekV3Config):
    r"""Configuration of a DeepSeek-V3 model (arXiv 2412.19437).

    Accepts every field of the released ``config.json`` (see transformers' ``DeepseekV3Config``) and adds:

    attention_backend (`str`, defaults to `"mla"`):
        Attention plugin: `"mla"` (multi-head latent attention, the paper's) or `"mha"` (plain multi-head
        baseline of the same width, for ablations).
    mla_mode (`str`, defaults to `"auto"`):
        MLA execution mode. `"expanded"` up-projects keys and values from the latent cache (best for training and
        prefill); `"absorbed"` folds `W_uk` into the query and `W_uv` into the output and attends directly over
        the latent cache (best for decoding); `"auto"` picks per forward whichever costs fewer FLOPs for the
        query and cached lengths at hand (absorbed for decoding and speculative verification, expanded for
        prefill and training). All give the same result.
    topk_method (`str`, defaults to `"noaux_tc"`):
        Router plugin (the official field): `"noaux_tc"` (sigmoid scores, bias-based aux-loss-free
        balancing, group-limited top-k) or `"greedy"` (softmax top-k with the classic auxiliary loss).
    scoring_func (`str` or `None`, defaults to `None`):
        The router's affinity function (the official field): `"sigmoid"` (each expert scored on its own, DeepSeek-V3)
        or `"softmax"` (a distribution over the experts, DeepSeek-V2). Both routers compute their scores with it;
        `None` picks the router's own (`noaux_tc`: sigmoid, `greedy`: softmax).
    experts_backend (`str` or `None`, defaults to `None`):
        How the routed experts execute: a name of transformers' experts interface (`"eager"`, `"batched_mm"`,
        `"grouped_mm"`, ours `"deepseek_fp8"`, or any registered one). It is the model's default
        `experts_implementation` (`config._experts_implementation`); `from_pretrained(..., experts_implementation=...)`
        and `model.set_experts_implementation(...)` override it. `None` leaves the choice to transformers
        (`grouped_mm` where it can run, else `eager`). `"gather"` (an earlier name) means `"eager"`.
    mtp_backend (`str`, defaults to `"sequential"`):
        Multi-token-prediction plugin used when `num_nextn_predict_layers > 0`.
    quantizer (`str` or `None`, defaults to `None`):
        Quantizer plugin applied to the model after it is built (e.g. `"fp8_block"`).
    router_bias_update_speed (`float`, defaults to 0.001):
        γ of the aux-loss-free bias update `b_i += γ·sign(mean_load − load_i)`; 0 freezes the bias.
    aux_loss_alpha (`float`, defaults to 0.0001):
        α of the balance loss `α Σ_i f_i P_i`. Its scope depends on the router: per sequence, averaged over the
        sequences, for `noaux_tc` (the paper's complementary sequence-wise loss), over the whole batch for `greedy`
        (the classic auxiliary loss). 0 disables it.
    mtp_loss_weight (`float`, defaults to 0.3):
        λ weighting the MTP loss in the training loss. 0 disables the MTP objective: training skips the MTP modules.
    fp8_mode (`str`, defaults to `"train"`):
        What `quantizer: "fp8_block"` builds: `"train"` keeps high-precision master weights and runs all three GEMMs
        in FP8 (trainable); `"inference"` stores the weights in FP8 with their block scales (not trainable).
    fp8_power_of_two_scales (`bool`, defaults to `False`):
        Round every FP8 scale up to a power of two (exact rescaling), for the `fp8_block` quantizer.
    fused_kernels (`str`, defaults to `"auto"`):
        Fused RMSNorm / SwiGLU / cross-entropy kernels (`modeling_deepseek_v3.kernels`): `"auto"` uses them on CUDA
        only, `"on"` everywhere Triton runs, `"off"` never. Results match the plain PyTorch path.
    """

    model_type = "deepseek_v3"
    # how transformers' distributed engine shards our parameters (see parallel_plans)
    base_model_ep_plan = parallel_plans.EP_PLAN
    base_model_fsdp_plan = parallel_plans.FSDP_PLAN
    base_model_pp_plan = parallel_plans.PP_PLAN

    @property
    def base_model_tp_plan(self) -> dict:
        # the query projection MLA splits by heads depends on the variant (q_proj, or q_b_proj with q-LoRA)
        return parallel_plans.tp_plan(self.q_lora_rank)

    def __init__(
        self,
        attention_backend: str = "mla",
        mla_mode: str = "auto",
        topk_method: str = "noaux_tc",
        scoring_func: str | None = None,
        experts_backend: str | None = None,
        mtp_backend: str = "sequential",
        quantizer: str | None = None,
        router_bias_update_speed: float = 0.001,
        aux_loss_alpha: float = 0.0001,
        mtp_loss_weight: float = 0.3,
        fp8_mode: str = "train",
        fp8_power_of_two_scales: bool = False,
        fused_kernels: str = "auto",
        **kwargs,
    ):
        self.attention_backend = attention_backend
        self.mla_mode = mla_mode
        self.topk_method = topk_method
        self.scoring_func = scoring_func
        self.experts_backend = experts_backend
        self.mtp_backend = mtp_backend
        self.quantizer = quantizer
        self.router_bias_update_speed = router_bias_update_speed
        self.aux_loss_alpha = aux_loss_alpha
        self.mtp_loss_weight = mtp_loss_weight
        self.fp8_mode = fp8_mode
        self.fp8_power_of_two_scales = fp8_power_of_two_scales
        self.fused_kernels = fused_kernels
        # A DeepSeek-V3 released under another model_type (Kimi K2's "kimi_k2") is this model: transformers would keep
        # that name on the instance, and everything keyed by it (the expert-stacking conversion mapping of the load,
        # PEFT's renaming of expert targets) would then miss the model. It reads as the class's, as it is saved.
        kwargs.pop("model_type", None)
        # transformers' strict types reject a JSON integer where they declare a float (`"rms_norm_eps": 0` is 0.0)
        for field in _FLOAT_FIELDS:
            if type(kwargs.get(field)) is int:
                kwargs[field] = float(kwargs[field])
        # Check before transformers' own validators run, so that the error names the field the user wrote.
        validate_fields(self._incoming_values(kwargs))
        scaling = kwargs.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict) and not scaling:
            # transformers reads `rope_scaling or rope_parameters`: an empty list or string would silently mean plain RoPE
            raise ConfigFieldTypeError(f"Config field `rope_scaling` must be a dict (or null), got {scaling!r}.")
        for field in ("rope_parameters", "rope_scaling"):
            if isinstance(kwargs.get(field), dict):
                # transformers writes `rope_theta` and `rope_type` into the dict it is given: a dict reused for a
                # second config would silently hand it the first one's theta
                kwargs[field] = dict(kwargs[field])
                _check_one_rope_theta(field, kwargs[field], kwargs.get("rope_theta"))
            check_rope_parameters(_as_rope_parameters(kwargs.get(field), kwargs.get("rope_theta")))
        _check_rope_blocks_agree(kwargs.get("rope_scaling"), kwargs.get("rope_parameters"), kwargs.get("rope_theta"))
        if self.experts_backend is not None and kwargs.get("experts_implementation") is None:
            kwargs["experts_implementation"] = self.experts_backend
        with _field_type_errors():
            super().__init__(**kwargs)
        check_rope_parameters(self.rope_parameters)
        # The official FP8 block dispatches to our quantizer (checkpoint.py); it still serializes as "fp8".
        if getattr(self, "quantization_config", None) is not None:
            self.quantization_config = as_quantization_config(self.quantization_config)

    @property
    def scoring_func(self) -> str | None:
        """The routers' affinity function. Unset (``None``), it reads as the router's own (``default_scoring_func``:
        sigmoid for ``noaux_tc``, softmax for ``greedy``) wherever it is read, the router and the saved config.json
        included, so a config changed after it was made (a new ``topk_method``, the field set back to ``None``) never
        leaves a stale function behind."""
        value = self.__dict__.get("scoring_func")
        if value is not None:
            return value
        try:
            router = self.plugin("topk_method")
        except (AttributeError, ValueError):  # not set yet, or unknown: validation names `topk_method`
            return None
        return getattr(router, "default_scoring_func", "sigmoid")

    @scoring_func.setter
    def scoring_func(self, value: str | None) -> None:
        self.__dict__["scoring_func"] = value

    @property
    def experts_backend(self) -> str | None:
        """The default experts implementation. Set on a made config, it becomes the experts implementation too
        (``_experts_implementation``, what the experts read at every forward), so it never goes stale; on a built
        model, ``model.set_experts_implementation(name)`` is the checked route."""
        return self.__dict__.get("experts_backend")

    @experts_backend.setter
    def experts_backend(self, value: str | None) -> None:
        value = "eager" if value == "gather" else value  # an earlier name
        made = "_experts_implementation_internal" in self.__dict__
        if made and value is not None:
            get_plugin(PLUGIN_FIELDS["experts_backend"], value, field="experts_backend")  # unknown names are named
        self.__dict__["experts_backend"] = value
        if made and value is not None:
            self._experts_implementation = value

    def validate(self):
        # transformers' save_pretrained calls this before it writes config.json: a field set after the config was
        # made (`config.first_k_dense_replace = 5`) must not reach a file that the reload refuses
        super().validate()
        validate_config(self)

    @classmethod
    def check_for_model(cls, config) -> None:
        """What a model checks before it is built from ``config``: that it is ours (transformers' own class has no
        plugin fields) and that the fields, including any set after the config was made, still make a model."""
        if not isinstance(config, cls):
            raise TypeError(
                f"The modeling_deepseek_v3 model classes need a modeling_deepseek_v3.DeepseekV3Config, got "
                f"{type(config).__module__}.{type(config).__qualname__}; convert it with "
                "`modeling_deepseek_v3.DeepseekV3Config.from_dict(config.to_dict())` (the plugin fields then take "
                "their defaults: MLA attention, the noaux_tc router, the sequential MTP module), or import "
                "modeling_deepseek_v3 before `AutoConfig.from_pretrained` so that it returns ours."
            )
        validate_config(config)

    def to_dict(self):
        output = super().to_dict()
        output["scoring_func"] = self.scoring_func  # the function the routers use, not `None` (vLLM reads the field)
        # vLLM and SGLang read YaRN from the legacy `rope_scaling` field, written beside `rope_parameters`. When both
        # are present transformers 5 reads the legacy one, so it keeps `rope_theta` (without it a Kimi-K2-style theta
        # of 50000 reloads as the default 10000). Not a top-level `rope_theta`: beside `rope_scaling` it sends
        # transformers' generic config reader (the Trainer's resume) into a failing conversion.
        rope = output.get("rope_parameters")
        if output.get("rope_scaling") is None and isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            legacy = {k: v for k, v in rope.items() if k != "rope_type"}
            legacy["type"] = rope["rope_type"]
            output["rope_scaling"] = legacy
        # The released config.json's `auto_map` names its own configuration_deepseek.py / modeling_deepseek.py, which
        # save_pretrained does not copy: kept, it sent `trust_remote_code=True` (transformers' AutoConfig, and vLLM and
        # SGLang, whose DeepSeek-V3 instructions pass it) looking for files the saved folder lacks. Without it the
        # folder loads by its model_type. A config registered for an auto class gets its own code and map written.
        if getattr(self, "_auto_class", None) is None:
            output.pop("auto_map", None)
        return output

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        # transformers reads a local folder without config.json as an empty dict, i.e. the full-size defaults, and the
        # load then fails on the first tensor's shape; a config.json holding a list or a string fails on `**` unnamed
        folder = pretrained_model_name_or_path
        if isinstance(folder, (str, os.PathLike)) and _looks_like_a_path(folder) and not os.path.exists(folder):
            raise FileNotFoundError(f"The checkpoint folder {os.fspath(folder)} does not exist.")
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder) and not kwargs.get("gguf_file"):
            path = os.path.join(folder, kwargs.get("subfolder") or "", kwargs.get("_configuration_file", CONFIG_NAME))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist: a DeepSeek-V3 checkpoint folder needs its config.json.")
        config_dict, rest = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if not isinstance(config_dict, dict):
            raise ValueError(f"The config.json of {pretrained_model_name_or_path} must hold a JSON object, got {type(config_dict).__name__}.")
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type) and not {"kv_lora_rank", "n_routed_experts"} & set(config_dict):
            # another architecture (a Llama folder would otherwise fail on the first DeepSeek-V3 default it breaks);
            # a DeepSeek-V3 under another model_type (Kimi K2's "kimi_k2") carries the MLA and MoE fields
            raise ValueError(
                f"The config.json of {pretrained_model_name_or_path} has model_type {model_type!r} and none of the "
                "DeepSeek-V3 fields (kv_lora_rank, n_routed_experts): it is not a DeepSeek-V3 checkpoint."
            )
        if (model_type not in (None, cls.model_type) and model_type in CONFIG_MAPPING
                and CONFIG_MAPPING[model_type] is not DeepseekV3Config):
            # a relative that transformers implements as an architecture of its own (DeepSeek-V3.2's sparse-attention
            # indexer, GLM-4.7-Flash, LongCat, ...) carries the MLA and MoE fields too, but its other weights would be
            # dropped and its computation differ; only a model_type transformers does not know or that the package maps
            # to this class (Kimi K2's) is ours
            raise ValueError(
                f"The config.json of {pretrained_model_name_or_path} has model_type {model_type!r}, which transformers "
                f"implements as another architecture (its config class: {CONFIG_MAPPING[model_type].__name__}); load it "
                "with transformers' classes for that type. If the folder is a DeepSeek-V3 in all but name, set its "
                '`"model_type"` to "deepseek_v3".'
            )
        return config_dict, rest

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # from_json_file unpacks the file with `**`: a list or a string there failed without naming the file
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise ValueError(f"The config file {os.fspath(json_file)} must hold a JSON object, got {type(config_dict).__name__}.")
        return config_dict

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # transformers sets from_pretrained(path, field=value) overrides with setattr after __init__, which would skip
        # what __init__ derives from them (experts_backend -> the experts implementation, a legacy rope block or a
        # rope_theta -> rope_parameters, num_key_value_heads=None -> the head count); the model's own fields go
        # through __init__ with the file's instead, the route every value takes
        overrides = {cls.attribute_map.get(key, key): kwargs.pop(key) for key in list(kwargs) if key in _INIT_FIELDS}
        config_dict = _with_rope_overrides(dict(config_dict), overrides)
        with _field_type_errors():
            result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        validate_config(config)  # what transformers still sets afterwards (attributes that are not fields)
        return result

    def _incoming_values(self, kwargs: dict) -> SimpleNamespace:
        values = {self.attribute_map.get(name, name): default for name, default in compat.official_field_defaults().items()}
        for key, value in kwargs.items():
            values[self.attribute_map.get(key, key)] = value
        values.update({field: getattr(self, field) for field in _OWN_FIELDS})
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        return SimpleNamespace(**values)

    def plugin(self, field: str) -> type:
        """The plugin class the value of ``field`` names (a ``ValueError`` naming the field if unknown)."""
        return plugin_for(self, field)


_OWN_FIELDS = (
    "attention_backend",
    "mla_mode",
    "topk_method",
    "scoring_func",
    "experts_backend",
    "mtp_backend",
    "quantizer",
    "router_bias_update_speed",
    "aux_loss_alpha",
    "mtp_loss_weight",
    "fp8_mode",
    "fp8_power_of_two_scales",
    "fused_kernels",
)


# the fields from_pretrained's overrides hand to __init__: ours, transformers' DeepseekV3 fields (under both names of
# an aliased one) and the legacy rope keys transformers 5 folds into rope_parameters
_INIT_FIELDS = frozenset(
    [*_OWN_FIELDS, *_TransformersDeepseekV3Config.__annotations__, *_TransformersDeepseekV3Config.attribute_map,
     *_TransformersDeepseekV3Config.attribute_map.values(), "rope_theta", "rope_scaling"]
)
# what from_pretrained takes as a field of the config (its other keywords go to the model): the distributed
# pre-checks read the config the model will be built from with the same overrides
DeepseekV3Config.field_names = _INIT_FIELDS


def _rope_theta_of(config_dict: dict):
    for field in ("rope_parameters", "rope_scaling"):
        if isinstance(config_dict.get(field), dict) and config_dict[field].get("rope_theta") is not None:
            return config_dict[field]["rope_theta"]
    return config_dict.get("rope_theta")


def _with_rope_overrides(config_dict: dict, overrides: dict) -> dict:
    """The file's fields with from_pretrained's overrides, rope fields merged as a user means them. A new
    ``rope_scaling`` or ``rope_parameters`` block (``None``: plain RoPE) replaces the file's rope fields, both blocks
    of a folder we saved, and keeps the file's theta unless the overrides give one; a ``rope_theta`` alone replaces the
    theta wherever the file keeps it (setting it beside the file's blocks would contradict their own entry)."""
    rope = {key: overrides.pop(key) for key in ("rope_theta", "rope_scaling", "rope_parameters") if key in overrides}
    config_dict.update(overrides)
    if "rope_scaling" in rope or "rope_parameters" in rope:
        theta = _rope_theta_of(config_dict)
        for key in ("rope_theta", "rope_scaling", "rope_parameters"):
            config_dict.pop(key, None)
        config_dict.update(rope)
        blocks = [config_dict.get(key) for key in ("rope_scaling", "rope_parameters")]
        if theta is not None and "rope_theta" not in rope and not any(isinstance(b, dict) and "rope_theta" in b for b in blocks):
            config_dict["rope_theta"] = theta
    elif "rope_theta" in rope:
        held = [key for key in ("rope_scaling", "rope_parameters") if isinstance(config_dict.get(key), dict)]
        for key in held:
            config_dict[key] = {**config_dict[key], "rope_theta": rope["rope_theta"]}
        if not held or "rope_theta" in config_dict:
            config_dict["rope_theta"] = rope["rope_theta"]
    return config_dict


def plugin_for(config, field: str) -> type:
    return get_plugin(PLUGIN_FIELDS[field], getattr(config, field), field=field)


class ConfigFieldTypeError(TypeError, StrictDataclassFieldValidationError):
    """A config value of a type transformers' strict config fields refuse; a ``TypeError`` naming the field (and
    still the ``huggingface_hub`` error type transformers raises)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


class RopeParametersError(ValueError, KeyError):
    """A rope block that misses an entry its rope type needs; a ``ValueError`` (and still the ``KeyError`` transformers
    raises) naming the field."""

    def __str__(self) -> str:
        return str(self.args[0])


@contextlib.contextmanager
def _field_type_errors():
    try:
        yield
    except StrictDataclassFieldValidationError as error:
        match = re.search(r"field '([^']+)'", str(error))
        field = match[1] if match else "?"
        raise ConfigFieldTypeError(f"Config field `{field}` has a value of the wrong type: {error.__cause__ or error}") from None
    except KeyError as error:
        if isinstance(error, RopeParametersError) or "rope_parameters" not in str(error):
            raise
        raise RopeParametersError(f"Config field `rope_scaling` (or `rope_parameters`): {error.args[0] if error.args else error}") from None


def _looks_like_a_path(name) -> bool:
    """Whether ``name`` can only be a local path: a Hub repository id is never absolute nor relative to a folder
    (transformers would report a missing folder as a malformed repository id)."""
    name = os.fspath(name)
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\"))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# rope_parameters entries that are numbers, and those of them that must be positive
_ROPE_NUMBERS = ("rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                 "low_freq_factor", "high_freq_factor")
_ROPE_POSITIVE = ("rope_theta", "factor", "attention_factor", "low_freq_factor", "high_freq_factor")


def check_rope_parameters(rope) -> None:
    """Raise ``ValueError`` naming the entry of ``rope_scaling`` / ``rope_parameters`` (as transformers has merged
    them, with ``rope_theta``) that no rotary table can be built from: transformers checks the names, not the values,
    and a zero, negative or NaN theta or factor gives NaN positions or a math error deep in the model's build."""
    if not isinstance(rope, dict):
        return
    rope_type = rope.get("rope_type", "default")
    if "type" in rope and rope["type"] != rope_type:
        # transformers reads `rope_type` and leaves the legacy `type` beside it, which vLLM and SGLang may read instead
        raise ValueError(
            f"Config field `rope_scaling` (or `rope_parameters`) entries `type` ({rope['type']!r}) and `rope_type` "
            f"({rope_type!r}) disagree; give one rope type."
        )
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"Config field `rope_scaling` (or `rope_parameters`) names rope type {rope_type!r}, which transformers does "
            f"not know; the rope types are {['default', *sorted(ROPE_INIT_FUNCTIONS)]}."
        )
    for key in _ROPE_NUMBERS:
        value = rope.get(key)
        if value is None:
            continue
        if not _is_number(value) or (key in _ROPE_POSITIVE and value <= 0):
            kind = "a positive finite number" if key in _ROPE_POSITIVE else "a finite number"
            field = "Config field `rope_theta`" if key == "rope_theta" else f"Config field `rope_scaling` (or `rope_parameters`) entry `{key}`"
            raise ValueError(f"{field} must be {kind}, got {value!r}.")
    if rope_type in ("linear", "dynamic", "yarn", "longrope") and _is_number(rope.get("factor")) and rope["factor"] < 1:
        # every scaled type extends the context by `factor`; below 1 it would shrink it (transformers only logs this)
        raise ValueError(
            f"Config field `rope_scaling` (or `rope_parameters`) entry `factor` must be at least 1 for rope type "
            f"{rope_type!r} (it is how many times the trained context is extended), got {rope['factor']!r}."
        )
    if rope_type == "yarn":
        # YaRN ramps from the dimensions that rotate beta_fast times over the trained context (kept) to those that
        # rotate beta_slow times (interpolated): the other way round the ramp is inverted (defaults 32 and 1). Equal
        # betas are a step instead of a ramp, which transformers computes and Kimi K2's released config uses (1 and 1).
        beta_fast, beta_slow = rope.get("beta_fast", 32), rope.get("beta_slow", 1)
        if _is_number(beta_fast) and _is_number(beta_slow) and beta_fast < beta_slow:
            raise ValueError(
                f"Config field `rope_scaling` (or `rope_parameters`) entry `beta_fast` ({beta_fast!r}) must be at least "
                f"`beta_slow` ({beta_slow!r}) for rope type 'yarn' (e.g. 32 and 1)."
            )
    truncate = rope.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        # transformers tests its truth: "false" or 0.0 in a hand-written file would still truncate
        raise ValueError(f"Config field `rope_scaling` (or `rope_parameters`) entry `truncate` must be true or false, got {truncate!r}.")
    original = rope.get("original_max_position_embeddings")
    if original is not None and (not isinstance(original, int) or isinstance(original, bool) or original <= 0):
        raise ValueError(
            "Config field `rope_scaling` (or `rope_parameters`) entry `original_max_position_embeddings` must be a "
            f"positive integer, got {original!r}."
        )
    if rope_type == "default" and rope.get("factor") is not None:
        # a legacy block without "type" is read as plain RoPE: its scaling would be dropped without a word
        raise ValueError(
            f"Config field `rope_scaling` sets `factor` {rope['factor']!r} but no rope type (`type` or `rope_type`, e.g. "
            "'yarn'), so plain RoPE would ignore it."
        )


def _check_one_rope_theta(field: str, block: dict, rope_theta) -> None:
    """A ``rope_theta`` inside the rope block wins over the ``rope_theta`` field in transformers: two different
    values are an error rather than one of them silently dropped."""
    inner = block.get("rope_theta")
    if rope_theta is not None and inner is not None and inner != rope_theta:
        raise ValueError(
            f"Config field `rope_theta` ({rope_theta!r}) differs from the `rope_theta` entry of `{field}` ({inner!r}); "
            "give one value (transformers would use the entry's)."
        )


def _check_rope_blocks_agree(scaling, parameters, rope_theta) -> None:
    """A config.json we save carries the rope block twice (``rope_parameters``, and the legacy ``rope_scaling`` that vLLM
    and SGLang read); transformers reads only ``rope_scaling`` when both are set, so an edit of ``rope_parameters``
    alone, or two different blocks given together, would silently lose one of them."""
    if not (isinstance(scaling, dict) and scaling and isinstance(parameters, dict) and parameters):
        return
    scaling, parameters = (
        {k: v for k, v in _as_rope_parameters(block, rope_theta).items() if k != "type"} for block in (scaling, parameters)
    )
    differ = sorted(key for key in scaling.keys() | parameters.keys() if scaling.get(key) != parameters.get(key))
    if differ:
        shown = ", ".join(f"{key}: {scaling.get(key, '<missing>')!r} vs {parameters.get(key, '<missing>')!r}" for key in differ)
        raise ValueError(
            f"Config fields `rope_scaling` and `rope_parameters` disagree ({shown}); transformers would read "
            "`rope_scaling` and drop `rope_parameters`. Give one block, or the same values in both (a config.json we "
            "save writes both: edit both, or delete `rope_scaling`)."
        )


def _as_rope_parameters(block, rope_theta):
    """A ``rope_scaling`` / ``rope_parameters`` block as given, in the form transformers turns it into (legacy
    ``type`` read as ``rope_type``, a separate ``rope_theta`` merged in), for checking before transformers reads it
    (it divides by some of its values)."""
    if not isinstance(block, dict):
        return None
    rope = {"rope_theta": rope_theta, **block}
    rope["rope_type"] = block.get("rope_type", block.get("type", "default"))
    return rope


def _check_token_ids(config) -> None:
    for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, field, None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is None:
                continue
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < config.vocab_size:
                raise ValueError(f"Config field `{field}` must be null or a token id in [0, vocab_size={config.vocab_size}), got {value!r}.")


# the dtypes a model's weights load and compute in; FP8 storage comes from a quantization_config or the quantizer
_MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_dtype(config) -> None:
    for field in ("dtype", "torch_dtype"):
        value = getattr(config, "__dict__", {}).get(field) if field == "torch_dtype" else getattr(config, field, None)
        if value is None or value == "auto":
            continue
        dtype = getattr(torch, value, None) if isinstance(value, str) else value
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Config field `{field}` must name a floating-point torch dtype (e.g. 'bfloat16'), got {value!r}.")
        if dtype not in _MODEL_DTYPES:
            # torch cannot build parameters of an FP8 dtype; transformers fails deep inside with a storage error
            names = ", ".join(str(d).removeprefix("torch.") for d in _MODEL_DTYPES)
            raise ValueError(
                f"Config field `{field}` must be one of {names} (the dtype the model computes in), got {value!r}; FP8 "
                "weights come from `quantization_config` (e.g. DeepseekV3FP8Config(dequantize=False) for an FP8 "
                "folder) or `quantizer='fp8_block'`."
            )


def _check_official_numbers(config) -> None:
    """The official fields transformers' strict config types but does not range-check."""
    scale = config.routed_scaling_factor
    if not _is_number(scale) or scale <= 0:
        # 0 would silence every routed expert; a negative one would flip their sign
        raise ValueError(f"Config field `routed_scaling_factor` must be a positive finite number, got {scale!r}.")
    if not _is_number(config.rms_norm_eps) or config.rms_norm_eps <= 0:
        raise ValueError(f"Config field `rms_norm_eps` must be a positive finite number, got {config.rms_norm_eps!r}.")
    if not _is_number(config.initializer_range) or config.initializer_range < 0:
        raise ValueError(f"Config field `initializer_range` must be a finite non-negative number, got {config.initializer_range!r}.")
    dropout = config.attention_dropout
    if dropout is not None and (not _is_number(dropout) or not 0 <= dropout <= 1):
        raise ValueError(f"Config field `attention_dropout` must be a probability in [0, 1], got {dropout!r}.")
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise ValueError(f"Config field `hidden_act` must name an activation of transformers' ACT2FN (e.g. 'silu'), got {config.hidden_act!r}.")
    # the released config carries moe_layer_freq = 1; the model places an MoE in every layer from first_k_dense_replace on
    freq = getattr(config, "moe_layer_freq", 1)
    if freq != 1 or isinstance(freq, bool):
        raise ValueError(
            f"Config field `moe_layer_freq` must be 1 (an MoE in every layer from `first_k_dense_replace` on), got {freq!r}."
        )
    ep_size = getattr(config, "ep_size", 1)
    if ep_size != 1 or isinstance(ep_size, bool):
        # DeepSeek's own inference code reads this field (released configs carry 1); no model here shards by it
        raise ValueError(
            f"Config field `ep_size` must be 1 (the released configs' value), got {ep_size!r}: it is not read here. "
            "Expert parallelism comes from `from_pretrained(..., distributed_config=transformers.DistributedConfig("
            f"ep_size={ep_size if type(ep_size) is int and ep_size > 1 else 'N'}, ...))` under torchrun; drop the "
            "field or set it to 1."
        )
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and not isinstance(quantization, (dict, QuantizationConfigMixin)):
        raise ValueError(
            "Config field `quantization_config` must be an object (e.g. the official FP8 block {\"quant_method\": \"fp8\", "
            f"...}}), got {quantization!r}."
        )
    if isinstance(quantization, dict) and not isinstance(quantization.get("quant_method"), str):
        # transformers picks the quantizer by this entry; without it the load fails without naming the field
        raise ValueError(
            "Config field `quantization_config` needs a `quant_method` entry naming the quantization (e.g. \"fp8\" for "
            f"the official FP8 block); got {quantization!r}. Drop the block for an unquantized model."
        )


def default_key_value_heads_hint(config) -> str:
    """For an error about ``num_key_value_heads``: a config that does not set it has transformers' default (128, the
    released model's head count), not its own ``num_attention_heads``, which a smaller model then contradicts."""
    default = compat.official_field_defaults().get("num_key_value_heads")
    if config.num_key_value_heads != default or config.num_attention_heads == default:
        return ""
    return (f" {default} is transformers' default for a config that does not set `num_key_value_heads`: set it to "
            f"`num_attention_heads` ({config.num_attention_heads}).")


def validate_config(config) -> None:
    """``validate_fields`` and ``check_rope_parameters`` on a made config: after ``from_dict``'s overrides, before a
    model is built from it and before ``save_pretrained`` writes it (fields may have been set since it was made)."""
    validate_fields(config)
    rope = config.rope_parameters
    if not isinstance(rope, dict) or not _is_number(rope.get("rope_theta")):
        # e.g. `config.rope_scaling = None` or `= {"type": "linear", ...}`: transformers' setter replaces the whole
        # rope_parameters, theta included, with what it is given
        raise ValueError(
            "Config field `rope_parameters` must be a dict holding `rope_type` and `rope_theta` (setting the legacy "
            f"`rope_scaling` on a made config replaces all of it), got {rope!r}; set `rope_parameters` instead, e.g. "
            "{'rope_type': 'default', 'rope_theta': 10000.0}."
        )
    check_rope_parameters(rope)


def _numpy_hint(value) -> str:
    # a NumPy integer is an integer, but not one config.json can hold (transformers' own config refuses it as well)
    return " (a NumPy integer: pass int(value))" if isinstance(value, numbers.Integral) and not isinstance(value, int) else ""


def validate_fields(config) -> None:
    """Raise ``ValueError`` naming the field for any value a model cannot be built from."""
    if config.fused_kernels not in FUSED_KERNEL_MODES:
        raise ValueError(f"Config field `fused_kernels` must be one of {list(FUSED_KERNEL_MODES)}, got {config.fused_kernels!r}.")
    for field in _POSITIVE_INT_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"Config field `{field}` must be a positive integer, got {value!r}{_numpy_hint(value)}.")
    for field in _NON_NEGATIVE_INT_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Config field `{field}` must be a non-negative integer, got {value!r}{_numpy_hint(value)}.")
    for field in _NON_NEGATIVE_FLOAT_FIELDS:
        value = getattr(config, field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise ValueError(f"Config field `{field}` must be a finite non-negative number, got {value!r}.")
    if config.fp8_mode not in FP8_MODES:
        raise ValueError(f"Config field `fp8_mode` must be one of {list(FP8_MODES)}, got {config.fp8_mode!r}.")
    if config.scoring_func is not None and config.scoring_func not in SCORING_FUNCS:
        raise ValueError(f"Config field `scoring_func` must be one of {list(SCORING_FUNCS)} (or null), got {config.scoring_func!r}.")
    q_lora_rank = config.q_lora_rank
    if q_lora_rank is not None and (not isinstance(q_lora_rank, int) or isinstance(q_lora_rank, bool) or q_lora_rank <= 0):
        raise ValueError(f"Config field `q_lora_rank` must be null or a positive integer, got {config.q_lora_rank!r}.")
    if config.first_k_dense_replace > config.num_hidden_layers:
        # the MTP modules, at layer num_hidden_layers + k, would silently become dense as well
        raise ValueError(
            f"Config field `first_k_dense_replace` ({config.first_k_dense_replace}) exceeds `num_hidden_layers` "
            f"({config.num_hidden_layers}); set it to {config.num_hidden_layers} for a model without MoE layers."
        )
    if config.qk_rope_head_dim % 2:
        raise ValueError(f"Config field `qk_rope_head_dim` must be even (rotary pairs), got {config.qk_rope_head_dim}.")
    # transformers' DeepseekV3Config derives these two; its model reads them (the rotary width, the query width), so a
    # different value saved in config.json would build transformers' class differently from ours
    for field, derived, formula in (
        ("head_dim", config.qk_rope_head_dim, "`qk_rope_head_dim`"),
        ("qk_head_dim", config.qk_nope_head_dim + config.qk_rope_head_dim, "`qk_nope_head_dim` + `qk_rope_head_dim`"),
    ):
        value = getattr(config, field, None)
        if value is not None and value != derived:
            raise ValueError(
                f"Config field `{field}` ({value!r}) must equal {formula} ({derived}), which transformers derives it "
                "from; drop the field."
            )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"Config field `num_attention_heads` ({config.num_attention_heads}) must be a multiple of "
            f"`num_key_value_heads` ({config.num_key_value_heads}).{default_key_value_heads_hint(config)}"
        )
    if config.n_routed_experts % config.n_group:
        raise ValueError(
            f"Config field `n_routed_experts` ({config.n_routed_experts}) must be divisible by `n_group` ({config.n_group})."
        )
    if config.topk_group > config.n_group:
        raise ValueError(f"Config field `topk_group` ({config.topk_group}) must not exceed `n_group` ({config.n_group}).")
    # the router's class says whether it keeps each token inside `topk_group` groups (as distributed.py reads it too)
    if not plugin_for(config, "topk_method").group_limited:  # routes over all experts, groups aside
        if config.num_experts_per_tok > config.n_routed_experts:
            raise ValueError(
                f"Config field `num_experts_per_tok` ({config.num_experts_per_tok}) exceeds `n_routed_experts` "
                f"({config.n_routed_experts})."
            )
    elif config.num_experts_per_tok > (selectable := config.topk_group * (config.n_routed_experts // config.n_group)):
        raise ValueError(
            f"Config field `num_experts_per_tok` ({config.num_experts_per_tok}) exceeds the {selectable} experts that "
            f"`topk_group`={config.topk_group} kept groups of {config.n_routed_experts // config.n_group} hold."
        )
    _check_official_numbers(config)
    _check_token_ids(config)
    _check_dtype(config)
    if not isinstance(config.fp8_power_of_two_scales, bool):
        raise ValueError(f"Config field `fp8_power_of_two_scales` must be true or false, got {config.fp8_power_of_two_scales!r}.")
    for field in PLUGIN_FIELDS:
        if getattr(config, field) is None and field in ("quantizer", "experts_backend"):
            continue
        if field == "experts_backend":
            plugin_for(config, field)  # a name of transformers' experts interface
            continue
        plugin_for(config, field).check_config(config)


__all__ = ["ConfigFieldTypeError", "DeepseekV3Config", "RopeParametersError", "default_key_value_heads_hint", "validate_config"]
