"""Checkpoint-folder I/O shared by the model's loading/saving (``checkpoint``) and the offline converter
(``quantization.converter``): one implementation of each piece, so both read, check and write folders alike.

* :class:`CheckpointError` — a checkpoint that cannot be read as is; the message names the tensor and the file;
* :func:`read_safetensors_header` — a file's tensor names, dtypes and shapes without reading data (truncated or
  corrupt files named, and headers safetensors would refuse: a tensor listed twice, tensors that overlap, leave gaps
  or do not reach the end of the file);
* :func:`tensor_locations` — which file holds each tensor (a tensor stored twice named);
* :func:`read_index` — ``model.safetensors.index.json``: valid JSON, every shard it names present;
* :func:`check_index_matches` — the index's ``weight_map`` against where the shards' headers put each tensor;
* :func:`check_scale_values` — FP8 block scales finite and positive;
* :func:`load_per_expert_entries` — official per-expert tensors given to ``load_state_dict`` written into the rows
  of a stacked experts module (any subset of the experts);
* :func:`atomic_save` — write a folder into a temporary sibling, then move it into place (:func:`check_save_target`
  first: not a file, not under one);
* :data:`OFFICIAL_FP8_BLOCK` — the ``quantization_config`` block of the released FP8 checkpoint;

It imports torch and the standard library only: no model code, no plugin.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import uuid
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
OFFICIAL_FP8_BLOCK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as is; the message names the tensor and the file."""


# bits per element of each safetensors dtype (the names safetensors accepts)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
               "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
               "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_header_entry(name: str, info, path: str, data_size: int) -> None:
    """One tensor's header entry: the fields safetensors itself would reject later, without naming the file."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is corrupt: the header entry of tensor {name!r} is not an object ({info!r}).")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise CheckpointError(f"Tensor {name!r} in {path} has dtype {dtype!r}, which safetensors does not know.")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"Tensor {name!r} in {path} has shape {shape!r}, not a list of non-negative integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
        raise CheckpointError(f"Tensor {name!r} in {path} has data_offsets {offsets!r}, not [begin, end] with begin <= end.")
    if offsets[1] > data_size:
        raise CheckpointError(
            f"Tensor {name!r} in {path} ends at byte {offsets[1]} of the data section, but the file holds only {data_size} "
            "bytes: the file is truncated."
        )
    bits = math.prod(shape) * _DTYPE_BITS[dtype]
    if bits % 8 == 0 and offsets[1] - offsets[0] != bits // 8:
        raise CheckpointError(
            f"Tensor {name!r} in {path} is {dtype} of shape {shape} ({bits // 8} bytes), but its data_offsets span "
            f"{offsets[1] - offsets[0]} bytes: the file is corrupt."
        )


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, without reading tensor data.

    ``CheckpointError`` if the file is missing, not safetensors, or shorter than its header says (truncated).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes).")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(f"{path} is truncated or corrupt: its header claims {header_len} bytes, the file has {size}.")
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_unique_keys(path))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object (got {type(header).__name__}).")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path} is corrupt: its `__metadata__` is not a mapping of strings to strings.")
    data_size = size - 8 - header_len
    for name, info in header.items():
        _check_header_entry(name, info, path, data_size)
    _check_data_layout(header, path, data_size)
    return header


def _unique_keys(path: str):
    """A ``json.loads`` hook refusing a key given twice in one object: Python would keep the last entry silently,
    while safetensors rejects the file later with an offset error that names neither the file nor the cause."""

    def pairs_to_dict(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path} is corrupt: its safetensors header lists tensor {key!r} twice.")
            out[key] = value
        return out

    return pairs_to_dict


def _check_data_layout(header: dict, path: str, data_size: int) -> None:
    """The tensors must tile the data section exactly, in offset order, as safetensors requires when it opens the
    file (it refuses gaps, overlaps and trailing bytes with "invalid offset" / "file not fully covered", naming no
    file): checked here so the error names the file and the tensor."""
    end, previous = 0, None
    for name, info in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if begin != end:
            after = f"tensor {previous!r} ends at byte {end}" if previous is not None else "the data section starts at byte 0"
            problem = "overlaps the tensor before it" if begin < end else f"leaves {begin - end} bytes unused before it"
            raise CheckpointError(
                f"{path} is corrupt: tensor {name!r} starts at byte {begin} of the data section where {after}: it {problem}."
            )
        end, previous = stop, name
    if end != data_size:
        raise CheckpointError(
            f"{path} is corrupt: its tensors end at byte {end} of the data section, but the file holds {data_size - end} "
            "more bytes after them (safetensors refuses a file its tensors do not fully cover)."
        )


def tensor_locations(headers: dict[str, dict]) -> dict[str, str]:
    """``{tensor name: file}`` from ``{file: header}``. A tensor stored in two files is a ``CheckpointError``: which
    copy a loader keeps is arbitrary, so the checkpoint's content would be undefined."""
    location = {}
    for path, header in headers.items():
        for name in header:
            if name in location:
                raise CheckpointError(f"Tensor {name!r} is stored twice, in {location[name]} and in {path}: keep one copy.")
            location[name] = path
    return location


def check_index_matches(index, weight_map: dict[str, str], location: dict[str, str]) -> None:
    """The index's ``weight_map`` (tensor -> shard) against where the shards' headers put each tensor (``location``,
    shards named as in the index). transformers reads every tensor of every shard the index lists, whatever shard
    the index names for it, so a tensor the index lists but no shard holds would silently stay randomly initialised,
    and one listed under another shard means the index describes other files (stale, or a shard replaced): either
    is a ``CheckpointError`` naming the tensor and both files."""
    for name, shard in weight_map.items():
        held = location.get(name)
        if held == shard:
            continue
        if held is None:
            raise CheckpointError(
                f"The index {index} maps tensor {name!r} to {shard}, but no shard holds it: the index does not describe "
                "these files (a stale index, or a shard replaced); the tensor would be missing from the model."
            )
        raise CheckpointError(
            f"The index {index} maps tensor {name!r} to {shard}, but it is stored in {held}: the index does not "
            "describe these files (a stale index, or shards replaced)."
        )


def load_index(index: str | os.PathLike) -> dict:
    """The parsed ``model.safetensors.index.json``, its ``weight_map`` checked as :func:`read_index` says."""
    index = Path(index)
    try:
        with open(index, encoding="utf-8") as f:
            content = json.load(f)
        weight_map = content["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"The index {index} is not valid JSON: {error}.") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"The index {index} has no `weight_map` object (tensor name -> shard file).") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"The index {index} has a `weight_map` that is not a mapping of tensor names to shard files.")
    if not weight_map:
        raise CheckpointError(f"The index {index} has an empty `weight_map`: it names no tensor, so nothing would load.")
    for shard in sorted(set(weight_map.values())):
        # shards sit beside their index; a name leaving the folder would read some other checkpoint's file
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"The index {index} names the shard {shard!r}, which is outside the checkpoint folder.")
        if not (index.parent / shard).is_file():
            names = [k for k, v in weight_map.items() if v == shard]
            raise CheckpointError(f"The index {index} maps {len(names)} tensor(s) (e.g. {names[0]!r}) to {shard}, which does not exist.")
    return content


def read_index(index: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json``, every shard it names checked to exist inside the
    folder; a ``CheckpointError`` naming the file when it is not JSON, has no (or an empty) ``weight_map``, or points
    at a missing shard. The one reader of index files (the model loader and the converter both use it)."""
    return load_index(index)["weight_map"]


def check_scale_values(scales: dict[str, torch.Tensor], where: str) -> None:
    """FP8 block scales ``{name: grid}`` must be finite and positive: a nan, inf, zero or negative ``weight_scale_inv``
    would turn its whole 128×128 block into garbage without any error. The grids are tiny, so their values are
    checked on load, all of them with one host read."""
    if not scales:
        return
    bad = {name: ~(torch.isfinite(s) & (s > 0)) for name, s in scales.items()}
    counts = torch.stack([b.sum().to("cpu") for b in bad.values()]).tolist()
    for (name, mask), count in zip(bad.items(), counts):
        if count:
            values = scales[name][mask]
            raise CheckpointError(
                f"Scale grid {name!r} in {where} has {count} of its {mask.numel()} block scales that are not finite "
                f"and positive (e.g. {values[:4].tolist()}): the checkpoint is corrupt."
            )


def check_save_target(save_directory) -> Path:
    """``save_directory`` as a ``Path``, when a folder can be written there: not an empty path (which would mean the
    working directory), neither a file nor under one."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"The save folder must be a path, got {save_directory!r} ({type(save_directory).__name__}).")
    text = os.fspath(save_directory)
    if text == "":
        raise ValueError("The save folder is an empty path; pass the folder to write (\".\" for the working directory).")
    if text.startswith("~") and os.path.expanduser(text) != text:
        # Python does not expand `~`: the save would create a folder literally named `~` in the working directory
        raise ValueError(
            f"The save folder {text!r} starts with '~', which is not expanded: the save would write into a folder named "
            f"{Path(text).parts[0]!r} in the working directory. Pass os.path.expanduser({text!r}) for the home folder."
        )
    target = Path(save_directory)
    if target.is_symlink() and not target.exists():
        raise FileNotFoundError(f"Cannot save into {target}: it is a symbolic link to {os.readlink(target)}, which does not exist.")
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            what = "it" if path == target else str(path)
            raise NotADirectoryError(f"Cannot save into {target}: {what} is a file, not a folder.")
    return target


def _move_order(entry: Path) -> int:
    """Order in which a save's entries reach the target: weights (and folders of shards), then the index that names
    them, then the side files, and ``config.json`` last: a folder without its config is no checkpoint, so a save
    interrupted while filling an empty folder leaves nothing that would load."""
    if entry.name == "config.json":
        return 3
    if entry.name.endswith(".index.json"):
        return 1
    return 0 if entry.suffix == ".safetensors" or entry.is_dir() else 2


def _check_no_kind_clash(source: Path, target: Path) -> None:
    """Before anything moves: an entry of the save whose name the target holds as the other kind (a folder named
    ``config.json`` or ``model.safetensors``, a file where the save has a sub-folder) would stop the move half-way,
    with some files replaced and others not, so it is named first."""
    for entry in source.iterdir():
        existing = target / entry.name
        if not os.path.lexists(existing):
            continue
        if entry.is_dir() and existing.is_dir():
            _check_no_kind_clash(entry, existing)
        elif entry.is_dir() != existing.is_dir():
            there, here = ("a folder", "a file") if existing.is_dir() else ("a file", "a folder")
            raise FileExistsError(
                f"Cannot save into {target}: it holds {there} {existing} where the save writes {here} of that name; "
                "move it away (nothing was written)."
            )


def _move_into(source: Path, target: Path, prefix: str = "") -> set[str]:
    """Move every entry of ``source`` into the existing folder ``target`` by ``os.replace`` (atomic per file), merging
    sub-folders (an index may place shards in one); returns the paths moved, relative to the top target."""
    moved = set()
    for entry in sorted(source.iterdir(), key=lambda p: (_move_order(p), p.name)):
        name = entry.name
        if entry.is_dir() and (target / name).is_dir():
            moved |= _move_into(entry, target / name, f"{prefix}{name}/")
        else:
            moved |= {f"{prefix}{name}"} | ({f"{prefix}{name}/{p.relative_to(entry).as_posix()}" for p in entry.rglob("*")}
                                            if entry.is_dir() else set())
            os.replace(entry, target / name)
    return moved


def _make_temporary_folder(target: Path) -> tuple[Path, bool]:
    """The folder a save is written into first, and whether it sits inside ``target``.

    Normally a sibling ``.<name>.tmp-<random>``, so that a fresh target appears with one rename. When the parent
    is not writable but ``target`` is an existing writable folder (a mounted volume, say), the temporary folder goes
    inside it instead: the files then arrive one ``os.replace`` each, which is what any existing target gets anyway.
    """
    suffix = uuid.uuid4().hex[:8]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{suffix}"
        tmp.mkdir()
        return tmp, False
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        parent_error = error
    if target.is_dir():
        tmp = target / f".tmp-save-{suffix}"
        try:
            tmp.mkdir()
            return tmp, True
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
    problem = (f"neither its parent folder {target.parent} nor the folder itself is writable" if target.is_dir()
               else f"its parent folder {target.parent} is not writable")
    raise PermissionError(
        parent_error.errno,
        f"Cannot save into {target}: {problem}. A save is written to a temporary folder beside the target (or inside "
        f"an existing one) and then moved into place, so that an interrupted save leaves no half-written checkpoint "
        f"({parent_error.strerror}).",
    ) from None


# A shard's number in a weight file's name: ``model-00001-of-00009.safetensors``, ``model.fp16-00001-of-00002.safetensors``,
# and the released DeepSeek-V3 / Kimi K2 folders' ``model-00001-of-000163.safetensors`` (six digits for the count).
_SHARD_NUMBER = re.compile(r"-\d+-of-\d+(?=\.)")
# An index: ``model.safetensors.index.json``, or with a variant ``model.safetensors.index.fp16.json``.
_INDEX_FILE = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")


def _weights_family(name: str) -> str:
    """The file a weight file's name belongs with: a shard's single-file name (``model-00001-of-00009.safetensors``
    -> ``model.safetensors``), a single file itself. Weight files of one family are one save's; other families (a
    variant ``model.fp16.safetensors``, ``model_ema.safetensors``) are other checkpoints sharing the folder."""
    return _SHARD_NUMBER.sub("", name, count=1)


def _single_file_of(index_name: str) -> str:
    """The single weight file a loader prefers over ``index_name`` (``model.safetensors.index.fp16.json`` ->
    ``model.fp16.safetensors``), which therefore must not survive beside a newly written index."""
    match = _INDEX_FILE.match(index_name)
    return f"{match['stem']}{'.' + match['variant'] if match['variant'] else ''}.safetensors"


def _shards_named_by(index: Path) -> set[str]:
    """The shard paths an existing index names (relative, inside its folder), or none if it cannot be read."""
    try:
        with open(index, encoding="utf-8") as f:
            shards = json.load(f)["weight_map"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {s for s in shards if isinstance(s, str) and s.endswith(".safetensors") and not Path(s).is_absolute()
            and ".." not in Path(s).parts}


def _stale_weight_files(target: Path, moved: set[str], replaced_indexes: dict[str, set[str]]) -> list[Path]:
    """The weight files and indexes of ``target`` that an earlier save of the same checkpoint left and the save just
    moved in (``moved``: paths relative to ``target``) does not have: shards of the same family, the shards an index
    it replaced named, the single file a new index would lose to, and an index (with its shards) that a new single
    file replaces. Other weight files (another variant, ``model_ema.safetensors``, an adapter) are left alone."""
    top = {m for m in moved if "/" not in m}
    families = {_weights_family(n) for n in top if n.endswith(".safetensors")}
    preferred = {_single_file_of(n) for n in top if _INDEX_FILE.match(n)}
    stale = set()
    for old in target.iterdir():
        name = old.name
        if name in top or not old.is_file():
            continue
        if name.endswith(".safetensors") and (_weights_family(name) in families or name in preferred):
            stale.add(name)
        elif _INDEX_FILE.match(name) and _single_file_of(name) in top:
            stale.add(name)  # the new save is one file: this index names shards of an earlier one
            stale |= _shards_named_by(old)
    for shards in replaced_indexes.values():
        stale |= shards
    return [target / rel for rel in sorted(stale - moved) if (target / rel).is_file()]


def atomic_save(save_directory: str | os.PathLike, write) -> None:
    """Run ``write(tmp_dir)`` in a temporary folder, then move its files into ``save_directory``.

    A fresh or empty target with a writable parent is a single directory rename. Otherwise (an existing target, or
    a parent that is read-only) each file arrives by ``os.replace`` (atomic per file), shards first, then the index,
    ``config.json`` last; the target loses the weight files of an earlier save of the same checkpoint that the new one
    does not have (see ``_stale_weight_files``: other variants and other weight files stay). If ``write`` fails, or
    the target holds a folder where the save writes a file (or the reverse), the target is untouched.
    """
    target = check_save_target(save_directory)
    if target.is_symlink():
        # a link to a folder: write beside the folder it names (same file system), and leave the link in place
        target = target.resolve()
    tmp, inside = _make_temporary_folder(target)
    try:
        write(str(tmp))
        if not inside and (not target.exists() or (target.is_dir() and not any(target.iterdir()))):
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
            return
        _check_no_kind_clash(tmp, target)
        # the indexes this save replaces, read before they are: the shards they named are the earlier save's
        replaced = {p.name: _shards_named_by(target / p.name) for p in tmp.iterdir()
                    if _INDEX_FILE.match(p.name) and (target / p.name).is_file()}
        moved = _move_into(tmp, target)
        for old in _stale_weight_files(target, moved, replaced):
            old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# A per-expert entry of the official layout, relative to its experts module: ``3.gate_proj.weight``.
_PER_EXPERT_ENTRY = re.compile(r"^(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.(?P<leaf>weight|weight_scale_inv)$")


def _stacked_copy(held: torch.Tensor, entry: torch.Tensor | None, assign: bool) -> torch.Tensor:
    """The copy of a stacked experts tensor that the per-expert entries are written into; the rows no entry gives keep
    ``held``'s values. With ``assign`` it takes the entries' dtype and device. A module on the meta device (built
    under ``torch.device("meta")`` for ``load_state_dict(..., assign=True)``) has no rows to keep: the copy is made
    on the entries' device and filled from them alone (a clone of the meta tensor would be assigned, and the experts
    stay meta behind "All keys matched")."""
    if entry is None or not (assign or held.is_meta):
        return held.detach().clone()
    if held.is_meta:
        return torch.empty(held.shape, dtype=entry.dtype, device=entry.device)
    return held.detach().to(dtype=entry.dtype, device=entry.device, copy=True)


def load_per_expert_entries(module: torch.nn.Module, state_dict: dict, prefix: str, missing_keys: list,
                            assign: bool = False) -> None:
    """``load_state_dict``'s pre-hook of a stacked experts module (``ExpertsPlugin``): the official per-expert entries
    under ``prefix`` (``{e}.{gate,up,down}_proj.weight``, and ``.weight_scale_inv`` for the FP8 module) replace those
    experts' rows of the module's stacked tensors, which then load as the stacked entries. An expert projection the
    state dict lacks keeps its current values and is reported missing under its per-expert name, as any tensor a
    state dict lacks: a strict load names it, a partial one (one shard of a sharded checkpoint) goes on. With
    ``assign`` (``load_state_dict(..., assign=True)``) the stacked tensors take the entries' dtype and device, as
    every other tensor assigned does."""
    entries = {key: match for key in state_dict
               if key.startswith(prefix) and (match := _PER_EXPERT_ENTRY.match(key[len(prefix):]))}
    for leaf in sorted({match["leaf"] for match in entries.values()}):
        suffix = "" if leaf == "weight" else "_scale_inv"
        names = {"gate": f"gate_up_proj{suffix}", "up": f"gate_up_proj{suffix}", "down": f"down_proj{suffix}"}
        held = {name: getattr(module, name, None) for name in set(names.values())}
        if any(not isinstance(tensor, torch.Tensor) for tensor in held.values()):
            continue  # e.g. FP8 scales for high-precision experts: left in the state dict, reported unexpected
        both = sorted(prefix + name for name in held if prefix + name in state_dict)
        if both:
            # which of the two copies would load is arbitrary
            raise CheckpointError(f"The state dict holds {prefix.rstrip('.')!r} both per expert and stacked ({both[0]}): keep one layout.")
        # one entry per stacked tensor it fills, for that tensor's dtype and device
        given_for = {names[m["proj"]]: state_dict[key] for key, m in entries.items() if m["leaf"] == leaf}
        merged = {name: _stacked_copy(tensor, given_for.get(name), assign) for name, tensor in held.items()}
        num_experts = merged[names["down"]].shape[0]
        given = set()
        for key, match in entries.items():
            if match["leaf"] != leaf:
                continue
            expert, proj = int(match["expert"]), match["proj"]
            if match["expert"] != str(expert) or expert >= num_experts:
                raise CheckpointError(
                    f"The state dict's {key!r} names expert {match['expert']}, but {prefix.rstrip('.')!r} holds experts "
                    f"0 to {num_experts - 1} (plain integers)."
                )
            stacked = merged[names[proj]]
            half = stacked.shape[1] // 2  # gate_up_proj: each expert's gate rows, then its up rows
            rows = stacked[expert, :half] if proj == "gate" else stacked[expert, half:] if proj == "up" else stacked[expert]
            tensor = state_dict.pop(key)
            if tuple(tensor.shape) != tuple(rows.shape):
                raise CheckpointError(
                    f"The state dict's {key!r} has shape {list(tensor.shape)}, but {prefix.rstrip('.')!r} holds that "
                    f"expert's {proj}_proj as {list(rows.shape)}."
                )
            rows.copy_(tensor)
            given.add((expert, proj))
        lacking = [(e, proj) for e in range(num_experts) for proj in ("gate", "up", "down") if (e, proj) not in given]
        gap = next(((e, proj) for e, proj in lacking if names[proj] in given_for and held[names[proj]].is_meta), None)
        if gap is not None:
            raise CheckpointError(
                f"The state dict has no '{prefix}{gap[0]}.{gap[1]}_proj.{leaf}', and {prefix.rstrip('.')!r} is on the meta "
                f"device, where the rows a state dict does not give have no values: give every expert's {gap[1]}_proj."
            )
        # a stacked tensor on the meta device that no entry names stays there, reported missing (as torch leaves it)
        state_dict.update({prefix + name: tensor for name, tensor in merged.items() if not tensor.is_meta})
        missing_keys.extend(f"{prefix}{e}.{proj}_proj.{leaf}" for e, proj in lacking)


__all__ = [
    "CheckpointError",
    "INDEX_NAME",
    "OFFICIAL_FP8_BLOCK",
    "SINGLE_NAME",
    "atomic_save",
    "check_save_target",
    "check_index_matches",
    "check_scale_values",
    "load_per_expert_entries",
    "load_index",
    "read_index",
    "read_safetensors_header",
    "tensor_locations",
]
