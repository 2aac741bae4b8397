"""The official FP8 block of DeepSeek-V3's ``config.json`` as a transformers quantization config.

The config module reads it when a ``config.json`` carries ``quantization_config``; the loader (``checkpoint``)
registers it with transformers' quantizer registry under :data:`QUANT_METHOD` and drives our quantizer with it.
It depends on transformers and the FP8 block size only, so the config never imports checkpoint I/O.
"""

from __future__ import annotations

from transformers.utils.quantization_config import FineGrainedFP8Config

from .checkpoint_io import OFFICIAL_FP8_BLOCK

OFFICIAL_QUANT_METHOD = OFFICIAL_FP8_BLOCK["quant_method"]
_BLOCK = tuple(OFFICIAL_FP8_BLOCK["weight_block_size"])
QUANT_METHOD = "deepseek_v3_fp8"  # our key in transformers' quantizer registry; never written to config.json


def check_official_block(weight_block_size, fmt, activation_scheme, dequantize, modules_to_not_convert) -> None:
    """A ``ValueError`` naming the ``quantization_config`` field whose value DeepSeek-V3's FP8 loader cannot use."""
    if not (isinstance(weight_block_size, (list, tuple)) and all(type(b) is int for b in weight_block_size)
            and tuple(weight_block_size) == _BLOCK):
        shown = list(weight_block_size) if isinstance(weight_block_size, (list, tuple)) else weight_block_size
        raise ValueError(f"quantization_config.weight_block_size must be [128, 128] (DeepSeek-V3 FP8), got {shown!r}.")
    if not isinstance(fmt, str) or fmt.lower() != "e4m3":
        raise ValueError(f"quantization_config.fmt must be 'e4m3' (DeepSeek-V3 FP8), got {fmt!r}.")
    if activation_scheme != "dynamic":
        raise ValueError(f"quantization_config.activation_scheme must be 'dynamic', got {activation_scheme!r}.")
    if dequantize is not None and not isinstance(dequantize, bool):
        raise ValueError(f"quantization_config.dequantize must be true, false or null (auto), got {dequantize!r}.")
    if modules_to_not_convert is not None and (
        not isinstance(modules_to_not_convert, (list, tuple)) or not all(isinstance(m, str) for m in modules_to_not_convert)
    ):
        # a bare string would be read as its characters, each a module name matching nothing
        raise ValueError(f"quantization_config.modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}.")


class DeepseekV3FP8Config(FineGrainedFP8Config):
    """The official FP8 block of DeepSeek-V3's ``config.json``, dispatched to ``checkpoint.DeepseekV3FP8HfQuantizer``.

    ``dequantize``: ``False`` keeps the weights in FP8 (``FP8Linear``), ``True`` dequantizes them at load to the
    load ``dtype``, ``None`` (default) keeps FP8 on a CUDA machine and dequantizes elsewhere.
    """

    def __init__(self, activation_scheme=OFFICIAL_FP8_BLOCK["activation_scheme"], weight_block_size=_BLOCK, dequantize=None,
                 modules_to_not_convert=None, fmt=OFFICIAL_FP8_BLOCK["fmt"], **kwargs):
        kwargs.pop("quant_method", None)
        # before transformers' own checks, which fail on a wrong type with an error that names no field
        check_official_block(weight_block_size, fmt, activation_scheme, dequantize, modules_to_not_convert)
        super().__init__(activation_scheme=activation_scheme, weight_block_size=tuple(weight_block_size),
                         dequantize=bool(dequantize), modules_to_not_convert=modules_to_not_convert)
        self.dequantize = dequantize  # keep None ("auto"): the parent stores a bool
        self.fmt = fmt
        self.quant_method = QUANT_METHOD
        for key, value in kwargs.items():  # unknown official fields survive a load/save round trip
            setattr(self, key, value)
        self._extra_fields = sorted(kwargs)
        self.check_official()

    def check_official(self) -> None:
        check_official_block(self.weight_block_size, self.fmt, self.activation_scheme, self.dequantize,
                             self.modules_to_not_convert)

    @classmethod
    def from_official(cls, block: dict) -> "DeepseekV3FP8Config":
        return cls(**{k: v for k, v in block.items() if k != "quant_method"})

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        config = cls(**{**config_dict, **kwargs})
        return (config, {}) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        """The official block: what the released config.json holds, plus fields the user set."""
        out = {"activation_scheme": self.activation_scheme, "fmt": self.fmt, "quant_method": OFFICIAL_QUANT_METHOD,
               "weight_block_size": list(self.weight_block_size)}
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        for key in self._extra_fields:
            out[key] = getattr(self, key)
        return out

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def get_loading_attributes(self) -> dict:
        """What a config passed to ``from_pretrained`` sets on the folder's block. ``modules_to_not_convert`` only
        when given: the usual ``DeepseekV3FP8Config(dequantize=False)`` would otherwise wipe the folder's list, and
        the layers it keeps in high precision would be refused as "stored in high precision, expected FP8"."""
        attributes = {"dequantize": self.dequantize}
        if self.modules_to_not_convert is not None:
            attributes["modules_to_not_convert"] = self.modules_to_not_convert
        return attributes

    # transformers' `get_hf_quantizer` reads `config.quantization_config` as a mapping when it is one
    def get(self, key, default=None):
        return getattr(self, key, default)

    def __getitem__(self, key):
        return self.to_dict()[key]


def as_quantization_config(value):
    """``config.quantization_config`` as DeepseekV3Config stores it: the official FP8 block becomes a
    :class:`DeepseekV3FP8Config`; anything else is returned unchanged."""
    if isinstance(value, DeepseekV3FP8Config):
        return value
    if isinstance(value, FineGrainedFP8Config):
        return DeepseekV3FP8Config(activation_scheme=value.activation_scheme, weight_block_size=value.weight_block_size,
                                   dequantize=value.dequantize, modules_to_not_convert=value.modules_to_not_convert)
    if isinstance(value, dict) and value.get("quant_method") in (OFFICIAL_QUANT_METHOD, QUANT_METHOD):
        return DeepseekV3FP8Config.from_official(value)
    return value


__all__ = ["DeepseekV3FP8Config", "OFFICIAL_QUANT_METHOD", "QUANT_METHOD", "as_quantization_config"]
