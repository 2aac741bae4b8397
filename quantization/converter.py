"""Offline conversion between BF16 and the official DeepSeek-V3 FP8 checkpoint format, through optimum.

``DeepseekV3FP8Converter`` is an ``optimum.quantization_base.OptimumQuantizer``::

    from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter
    DeepseekV3FP8Converter.from_pretrained("path/to/bf16").quantize("path/to/fp8")              # bf16 -> FP8
    DeepseekV3FP8Converter.from_pretrained("path/to/fp8", to="bf16").quantize("path/to/bf16")   # FP8 -> bf16

or from the shell (with a progress bar)::

    python -m modeling_deepseek_v3.quantization.converter --to fp8  SRC DST
    python -m modeling_deepseek_v3.quantization.converter --to bf16 SRC DST

FP8 is the released format (docs/checkpoint-format.md): each eligible Linear's ``weight`` becomes float8_e4m3fn with an fp32
``weight_scale_inv`` per 128×128 block (``amax / 448``, edge blocks zero-padded), computed by
``formats.quantize_weight_128x128``. Eligible are the attention projections and the dense / shared / routed
expert MLPs (``quantizer.is_fp8_eligible``); embeddings, norms, the router ``mlp.gate``, ``lm_head``, the MTP
copies of embedding/head and the MTP ``eh_proj`` stay in high precision — in the released checkpoint
``eh_proj`` has no ``weight_scale_inv`` and vLLM/SGLang build it as a plain BF16 Linear.

The conversion streams: one input shard at a time is read, converted and written as the output shard of the
same name, so peak memory follows the largest shard, not the model. Output goes to a temporary sibling folder
that is renamed into place when complete. This module stands alone: it imports no plugin and no model code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint_io import (
    INDEX_NAME,
    OFFICIAL_FP8_BLOCK,
    SINGLE_NAME,
    CheckpointError,
    atomic_save,
    check_index_matches,
    check_save_target,
    check_scale_values,
    read_index,
    read_safetensors_header,
    tensor_locations,
)
from ..model_card import may_replace_card
from . import formats
from .quantizer import dequantize_state_dict, quantize_state_dict

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
# Tensors written in fp32 when a checkpoint is converted to a high-precision dtype: the router's correction bias is
# fp32 in the released checkpoint, and the model holds it in fp32 at any dtype.
_FP32_TENSORS = ("e_score_correction_bias",)


def _as_path(value, name: str):
    if not isinstance(value, (str, os.PathLike)) or os.fspath(value) == "":
        raise TypeError(f"`{name}` must be a folder path, got {value!r}.")
    return value


def list_shards(folder: str | os.PathLike) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names of a checkpoint folder (index order) and the index's weight map (None if unsharded)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_index(index)
        return sorted(set(weight_map.values())), weight_map
    if (folder / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    raise CheckpointError(f"{folder} holds neither {INDEX_NAME} nor {SINGLE_NAME}.")


def check_scales_belong_to_fp8_weights(folder: Path, headers: dict[str, dict], location: dict[str, str]) -> None:
    """Every ``weight_scale_inv`` must sit beside an FP8 ``weight``. A high-precision weight with a leftover scale grid
    is a weight replaced without its scale: quantizing would put the old grid over the new one, dequantizing would
    drop it, and nothing says which of the two tensors is right (the loader refuses such a folder too).
    ``headers``: ``{shard: header}`` and ``location``: ``{tensor: shard}``, shards named relative to ``folder``."""
    for key, shard in location.items():
        if not key.endswith(".weight_scale_inv"):
            continue
        weight = key.removesuffix("_scale_inv")
        if weight not in location:
            raise CheckpointError(f"Scale grid {key!r} in {folder / shard} has no weight {weight!r} in any checkpoint file.")
        dtype = headers[location[weight]][weight]["dtype"]
        if dtype.startswith("F8") and dtype != "F8_E4M3":
            raise CheckpointError(
                f"{weight!r} in {folder / location[weight]} is {dtype}, but the official FP8 format (and this converter) "
                "reads F8_E4M3 weights with their scale grids only (quantization_config fmt 'e4m3'): re-quantize it from "
                "high precision."
            )
        if dtype != "F8_E4M3":
            raise CheckpointError(
                f"{weight!r} in {folder / location[weight]} is {dtype}, not FP8, but the checkpoint also holds its FP8 "
                f"scale grid {key!r} (in {folder / shard}): a weight replaced without its scale. Store the weight in FP8 "
                "with its scale, or remove the stale scale."
            )


class DeepseekV3FP8Converter(OptimumQuantizer):
    """Converts a DeepSeek-V3 checkpoint folder (or an in-memory model) to the official FP8 format (``to="fp8"``) or
    to a high-precision dtype (``to="bf16"``, ``"fp16"``, ``"fp32"``: FP8 weights dequantized, the rest cast)."""

    def __init__(self, source, to: str = "fp8", dtype: str | torch.dtype = torch.bfloat16,
                 power_of_two_scales: bool = False):
        if to not in ("fp8", "bf16", "fp32", "fp16", "float32", "bfloat16", "float16"):
            raise ValueError(f"`to` must be 'fp8' or a high-precision dtype name ('bf16', 'fp32'), got {to!r}.")
        if dtype not in _DTYPES and dtype not in _DTYPES.values():
            raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)} or torch.bfloat16/float16/float32, got {dtype!r}.")
        if not isinstance(power_of_two_scales, bool):
            raise TypeError(f"`power_of_two_scales` must be True or False, got {power_of_two_scales!r}.")
        if hasattr(source, "save_pretrained"):
            # An in-memory model is saved by ``quantize`` into a temporary folder removed on every exit, once the
            # destination is known to be usable: nothing is written for a conversion that cannot happen.
            self.source, self._model = None, source
        else:
            self.source, self._model = Path(_as_path(source, "source")), None
        self.to = "fp8" if to == "fp8" else "dequantize"
        self.dtype = _DTYPES[to] if to in _DTYPES else (_DTYPES[dtype] if isinstance(dtype, str) else dtype)
        self.power_of_two_scales = power_of_two_scales

    @classmethod
    def from_pretrained(cls, model_or_path, file_name=None, to: str = "fp8", **kwargs) -> "DeepseekV3FP8Converter":
        """``model_or_path``: a checkpoint folder, a Hub repository id (fetched with ``snapshot_download``; nothing is
        fetched with ``HF_HUB_OFFLINE=1`` beyond the cache), or an in-memory ``PreTrainedModel`` (its weights when
        ``quantize`` runs, saved in their official layout to a temporary folder removed when ``quantize`` ends)."""
        if hasattr(model_or_path, "save_pretrained"):
            return cls(model_or_path, to=to, **kwargs)
        path = Path(_as_path(model_or_path, "model_or_path"))
        text = os.fspath(model_or_path)
        if path.is_file():
            raise CheckpointError(f"Source {text} is a file; the converter takes the checkpoint folder holding it.")
        if not path.is_dir() and (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1):
            # only a local path can look like this (a Hub id is `name` or `namespace/name`)
            hint = " (`~` is not expanded: pass os.path.expanduser(path))" if os.path.isdir(os.path.expanduser(text)) else ""
            raise CheckpointError(f"No checkpoint folder at {text}{hint}.")
        if not path.is_dir():
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HFValidationError

            try:
                path = Path(snapshot_download(str(model_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.py", "*.md"]))
            except (HFValidationError, OSError) as error:  # OSError covers the Hub's offline/not-found errors
                raise CheckpointError(
                    f"Source {str(model_or_path)!r} is not a checkpoint folder, and fetching it as a Hub repository failed: {error}"
                ) from None
        return cls(path, to=to, **kwargs)

    # ------------------------------------------------------------------------------------------------

    def convert_tensor(self, key: str, tensor: torch.Tensor, scale: torch.Tensor | None, file: str) -> dict[str, torch.Tensor]:
        """The output tensors for one input tensor (``scale``: its ``weight_scale_inv`` when dequantizing). Converting
        to a high-precision dtype dequantizes FP8 weights into it and casts the other floating-point tensors to it
        (the router's ``e_score_correction_bias`` stays fp32); converting to FP8 leaves the tensors it does not
        quantize as they are."""
        module, _, leaf = key.rpartition(".")
        if tensor.dtype == formats.FP8_DTYPE:
            # already FP8: checked in both directions, so a corrupt pair is never copied into the output unseen
            self.check_fp8_weight(key, tensor, scale, file, copied=self.to == "fp8")
        if self.to == "fp8":
            # The per-tensor rules (which weights, pass-through of what is already FP8) are the quantizer's.
            try:
                return quantize_state_dict({key: tensor}, self.power_of_two_scales)
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"Cannot quantize {key!r} from {file}: {error}") from None
        if leaf == "weight_scale_inv":
            return {}
        if tensor.dtype != formats.FP8_DTYPE:
            # the output's config.json declares the requested dtype, so its tensors must be in it; the router bias is
            # fp32 whatever that dtype (the model holds it in fp32, and a half-precision copy upcasts losslessly)
            if not tensor.is_floating_point():
                return {key: tensor}
            return {key: tensor.to(torch.float32 if leaf in _FP32_TENSORS else self.dtype)}
        return dequantize_state_dict({key: tensor, f"{module}.weight_scale_inv": scale.float()}, self.dtype)

    @staticmethod
    def check_fp8_weight(key: str, tensor: torch.Tensor, scale: torch.Tensor | None, file: str, copied: bool) -> None:
        """An FP8 ``weight`` must be a matrix with its ``weight_scale_inv`` grid of finite positive block scales, fp32
        when it is ``copied`` to an FP8 output (the loader accepts no other), any float when it is dequantized."""
        scale_key = key.rpartition(".")[0] + ".weight_scale_inv"
        if tensor.dim() != 2 or not key.endswith(".weight"):
            raise CheckpointError(f"FP8 tensor {key!r} in {file} has shape {list(tensor.shape)}: only 2-D `.weight` matrices are stored in FP8.")
        if scale is None:
            raise CheckpointError(f"FP8 tensor {key!r} in {file} has no {scale_key!r} in any checkpoint file.")
        grid = (formats.ceil_div(tensor.shape[0], formats.BLOCK), formats.ceil_div(tensor.shape[1], formats.BLOCK))
        if tuple(scale.shape) != grid:
            raise CheckpointError(
                f"Scale grid {scale_key!r} has shape {list(scale.shape)}, but {key!r} in {file} "
                f"({list(tensor.shape)}) needs {list(grid)}."
            )
        if scale.dtype != torch.float32 and (copied or not scale.dtype.is_floating_point or scale.dtype == formats.FP8_DTYPE):
            raise CheckpointError(f"Scale grid {scale_key!r} of {key!r} in {file} must be F32, got {scale.dtype}.")
        check_scale_values({scale_key: scale}, file)

    def quantize(self, save_dir, file_prefix=None, progress: bool = True, overwrite: bool = False) -> Path:
        """Convert every shard of the source into ``save_dir``; returns ``save_dir``. ``file_prefix`` prefixes each
        output shard's file name (the output then always has an index naming them)."""
        save_dir = check_save_target(_as_path(save_dir, "save_dir"))
        if file_prefix is not None and (not isinstance(file_prefix, str) or not file_prefix or Path(file_prefix).name != file_prefix):
            raise ValueError(f"`file_prefix` must be a plain, non-empty file-name prefix (no folder), got {file_prefix!r}.")
        for name, value in (("progress", progress), ("overwrite", overwrite)):
            if not isinstance(value, bool):  # overwrite="no" would be truthy and replace a non-empty folder
                raise TypeError(f"`{name}` must be True or False, got {value!r}.")
        if self.source is not None and save_dir.resolve() == self.source.resolve():
            # the source's shards would be replaced while they are the only copy of the weights
            raise FileExistsError(f"The destination {save_dir} is the source folder; convert into another folder.")
        if self.source is not None and save_dir.resolve().is_relative_to(self.source.resolve()):
            # the source would then hold a second checkpoint; one in the folder its index keeps shards in replaces them
            raise ValueError(f"The destination {save_dir} is inside the source folder {self.source}; convert into a folder outside it.")
        if save_dir.exists() and any(save_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{save_dir} is not empty; pass overwrite=True (--overwrite) to replace it.")
        if self._model is None:
            self._convert(self.source, save_dir, file_prefix, progress)
            return save_dir
        with tempfile.TemporaryDirectory(prefix="dsv3-convert-") as tmp:
            source = Path(tmp) / "model"
            self._model.save_pretrained(source)
            self._convert(source, save_dir, file_prefix, progress)
        return save_dir

    def _convert(self, source: Path, save_dir: Path, file_prefix: str | None, progress: bool) -> None:
        shards, weight_map = list_shards(source)
        headers = {shard: read_safetensors_header(source / shard) for shard in shards}  # fail before writing
        location = {key: Path(path).relative_to(source).as_posix()
                    for key, path in tensor_locations({str(source / s): h for s, h in headers.items()}).items()}
        if weight_map is not None:
            check_index_matches(source / INDEX_NAME, weight_map, location)  # else the output would silently lack tensors
        check_scales_belong_to_fp8_weights(source, headers, location)
        config = self._read_config(source)

        def write(tmp: str) -> None:
            tmp = Path(tmp)
            new_map, total_size = {}, 0
            bar = tqdm(total=sum(len(h) for h in headers.values()), unit="tensor", disable=not progress,
                       desc=f"to {'fp8' if self.to == 'fp8' else str(self.dtype).removeprefix('torch.')}")
            for shard in shards:
                out: dict[str, torch.Tensor] = {}
                path = source / shard
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        tensor = self._get(f, key, path)
                        scale = None
                        if tensor.dtype == formats.FP8_DTYPE and key.endswith(".weight"):
                            scale_key = key[: -len("weight")] + "weight_scale_inv"
                            if scale_key in location:
                                scale = self._read(source / location[scale_key], scale_key, f if location[scale_key] == shard else None)
                        for out_key, value in self.convert_tensor(key, tensor, scale, str(path)).items():
                            out[out_key] = value.contiguous()
                        bar.update(1)
                # same name as the input shard, in the same sub-folder if the index put it in one
                name = shard if file_prefix is None else (Path(shard).parent / f"{file_prefix}-{Path(shard).name}").as_posix()
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                save_file(out, tmp / name, metadata={"format": "pt"})
                for key, value in out.items():
                    new_map[key] = name
                    total_size += value.numel() * value.element_size()
                del out
            bar.close()
            # Without an index a loader looks for model.safetensors only, so any other file name needs one.
            if weight_map is not None or set(new_map.values()) != {SINGLE_NAME}:
                with open(tmp / INDEX_NAME, "w", encoding="utf-8") as f:
                    json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(new_map.items()))}, f, indent=2)
                    f.write("\n")
            self._write_side_files(source, tmp, config, shards)

        atomic_save(save_dir, write)  # the same temp-then-rename as save_pretrained

    # ------------------------------------------------------------------------------------------------

    @staticmethod
    def _get(handle, key: str, path) -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except Exception as error:  # safetensors raises its own error types; name the tensor and file
            raise CheckpointError(f"Cannot read tensor {key!r} from {path}: {error}") from None

    def _read(self, path: Path, key: str, open_handle=None) -> torch.Tensor:
        if open_handle is not None:
            return self._get(open_handle, key, path)
        with safe_open(path, framework="pt") as f:
            return self._get(f, key, path)

    @staticmethod
    def _check_declared_format(path: Path, config: dict) -> None:
        """The source's ``quantization_config``, if any, must be the official FP8 block: the converter reads E4M3 weights
        with 128x128 block scales, so another block size or format would be read with the wrong grid, and another
        quantization method's tensors (packed integers) are no weights it can convert."""
        block = config.get("quantization_config")
        if block is None:
            return
        if not isinstance(block, dict):
            raise CheckpointError(f"{path}: `quantization_config` must be an object, got {block!r}.")
        if block.get("quant_method") != "fp8":
            raise CheckpointError(
                f"{path} declares `quantization_config.quant_method` {block.get('quant_method')!r}: this converter reads "
                "high-precision folders and the official FP8 format (quant_method 'fp8') only."
            )
        for field in ("weight_block_size", "fmt"):
            if field in block and block[field] != OFFICIAL_FP8_BLOCK[field]:
                raise CheckpointError(
                    f"{path} declares `quantization_config.{field}` {block[field]!r}, but the official FP8 format (the one "
                    f"this converter reads and writes) has {OFFICIAL_FP8_BLOCK[field]!r}."
                )

    @staticmethod
    def _read_config(source: Path) -> dict | None:
        """The source's config.json (None if it has none), read before anything is written."""
        path = source / "config.json"
        if not path.is_file():
            logger.warning("%s has no config.json: the output has none either, so nothing declares its format.", source)
            return None
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is not valid JSON: {error}.") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}.")
        DeepseekV3FP8Converter._check_declared_format(path, config)
        return config

    def _write_side_files(self, source: Path, folder: Path, config: dict | None, shards=()) -> None:
        """config.json with the quantization block added/removed; every other non-weight file copied."""
        shard_folders = {Path(s).parts[0] for s in shards if len(Path(s).parts) > 1}
        skipped = sorted(item.name for item in source.iterdir()
                         if item.is_dir() and not item.name.startswith(".") and item.name not in shard_folders)
        if skipped:
            # sub-folders can be large (another copy of the weights, say): named, so nothing is dropped unseen
            logger.warning("Not copied: the sub-folder(s) %s of %s (copy them yourself if they belong with the output).",
                           ", ".join(skipped), source)
        for item in source.iterdir():
            if item.suffix == ".safetensors" or item.name == INDEX_NAME or item.name.startswith(".") or not item.is_file():
                continue
            if item.name == "README.md" and may_replace_card(item):
                continue  # a generated card describes the old weights; save_pretrained regenerates one
            if item.name == "config.json":
                if self.to == "fp8":
                    config["quantization_config"] = dict(OFFICIAL_FP8_BLOCK)
                else:
                    config.pop("quantization_config", None)
                    if config.get("quantizer") is not None and config.get("fp8_mode") == "inference":
                        # the `fp8_block` plugin's inference mode loads FP8 checkpoints only: the output would not load
                        config["quantizer"] = None
                    dtype_name = str(self.dtype).removeprefix("torch.")
                    config["dtype" if "dtype" in config else "torch_dtype"] = dtype_name
                    if "torch_dtype" in config:
                        config["torch_dtype"] = dtype_name
                with open(folder / "config.json", "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, sort_keys=True)
                    f.write("\n")
            else:
                shutil.copy2(item, folder / item.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        # the console script's name (README, docs and error messages name it); `python -m` runs the same main
        prog="deepseek-v3-convert",
        description="Convert a DeepSeek-V3 checkpoint between BF16 and the official FP8 (e4m3, 128x128 block scales) format, shard by shard.",
    )
    parser.add_argument("source", help="checkpoint folder (or Hub repository id)")
    parser.add_argument("destination", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--to", default="fp8", choices=["fp8", "bf16", "fp16", "fp32"],
                        help="target format (default fp8). fp8 quantizes the eligible Linear weights and leaves the "
                             "other tensors as they are; bf16/fp16/fp32 dequantize FP8 weights into that dtype and cast "
                             "every other floating-point tensor to it too (the router's e_score_correction_bias stays "
                             "fp32), so the dtype config.json declares is the tensors' dtype")
    parser.add_argument("--power-of-two-scales", action="store_true", help="round FP8 scales up to powers of two")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        converter = DeepseekV3FP8Converter.from_pretrained(args.source, to=args.to, power_of_two_scales=args.power_of_two_scales)
        out = converter.quantize(args.destination, progress=not args.no_progress, overwrite=args.overwrite)
    except (ValueError, TypeError, OSError) as error:  # CheckpointError is a ValueError; OSError: the folders
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CheckpointError", "DeepseekV3FP8Converter", "check_scales_belong_to_fp8_weights", "list_shards", "main",
           "read_safetensors_header"]
