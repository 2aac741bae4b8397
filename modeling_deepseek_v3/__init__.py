"""DeepSeek-V3 (arXiv 2412.19437) for the Hugging Face stack, as a plugin framework.

``import modeling_deepseek_v3`` registers the built-in plugins and our classes with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` and ``AutoModelForTokenClassification`` for
``model_type == "deepseek_v3"`` (and Kimi K2's ``"kimi_k2"``, the same architecture).
"""

from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import plugins, quantization  # noqa: F401  (importing registers the built-in plugins)
from .checkpoint import DeepseekV3FP8Config
from .checkpoint_io import CheckpointError  # what a refused checkpoint folder raises, to catch by name
from .configuration_deepseek_v3 import DeepseekV3Config
from .modeling_deepseek_v3 import (
    DeepseekV3ForCausalLM,
    DeepseekV3ForSequenceClassification,
    DeepseekV3ForTokenClassification,
    DeepseekV3Model,
    DeepseekV3PreTrainedModel,
)
from .registry import freeze_builtin_names, list_plugins, register_plugin
from .training import ExpertBiasUpdateCallback, load_expert_biases, save_expert_biases, update_expert_bias

# every built-in plugin is registered by now (the imports above): from here on their names cannot be replaced
freeze_builtin_names()

AutoConfig.register("deepseek_v3", DeepseekV3Config, exist_ok=True)
# Kimi K2 is released as a DeepSeek-V3 under model_type "kimi_k2", a type transformers reads as "deepseek_v3" only
# inside Kimi K2.5's config: without this mapping AutoConfig refused the folder (or asked to run its remote code).
# It maps to our config, whose instances read and save as "deepseek_v3" (AutoConfig.register insists that the
# class's own type is the key, hence the mapping's own register).
CONFIG_MAPPING.register("kimi_k2", DeepseekV3Config, exist_ok=True)
AutoModel.register(DeepseekV3Config, DeepseekV3Model, exist_ok=True)
AutoModelForCausalLM.register(DeepseekV3Config, DeepseekV3ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(DeepseekV3Config, DeepseekV3ForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(DeepseekV3Config, DeepseekV3ForTokenClassification, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "DeepseekV3Config",
    "DeepseekV3FP8Config",
    "DeepseekV3Model",
    "DeepseekV3ForCausalLM",
    "DeepseekV3ForSequenceClassification",
    "DeepseekV3ForTokenClassification",
    "DeepseekV3PreTrainedModel",
    "ExpertBiasUpdateCallback",
    "list_plugins",
    "load_expert_biases",
    "register_plugin",
    "save_expert_biases",
    "update_expert_bias",
]
