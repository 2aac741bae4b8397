"""Careless or corrupt checkpoint folders, saves, converter calls and card arguments that loaded, saved or converted
silently wrong, or failed deep inside safetensors / transformers: each is now an error naming the file, tensor or
argument, or does the right thing."""

from __future__ import annotations

import json
import logging
import shutil
import struct

import pytest
import torch
import transformers
from safetensors import safe_open

from conftest import build_model, edit_json, edit_tensors, tiny_config
from modeling_deepseek_v3 import DeepseekV3FP8Config, DeepseekV3ForCausalLM, model_card
from modeling_deepseek_v3.checkpoint_io import CheckpointError, read_safetensors_header
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter, main

INDEX = "model.safetensors.index.json"
EXPERTS = "model.layers.1.mlp.experts"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(num_hidden_layers=2))


@pytest.fixture(scope="module")
def folders(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("round4")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    DeepseekV3FP8Converter.from_pretrained(root / "sharded").quantize(root / "fp8", progress=False)
    return root


def copy(folders, name, tmp_path):
    return shutil.copytree(folders / name, tmp_path / name)


def weight_map(folder):
    return json.loads((folder / INDEX).read_text())["weight_map"]


def load(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def load_fp8(folder):
    return load(folder, quantization_config=DeepseekV3FP8Config(dequantize=False))


def convert(folder, out, **kwargs):
    return DeepseekV3FP8Converter.from_pretrained(folder, **kwargs).quantize(out, progress=False)


# ---------------------------------------------------------------------------------------------------
# safetensors headers that safetensors itself refuses later, naming no file
# ---------------------------------------------------------------------------------------------------


def _rewrite_header(path, edit_text=None, edit_header=None, data_edit=None):
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    text, data = raw[8 : 8 + length].decode().rstrip(), raw[8 + length :]
    if edit_header is not None:
        header = json.loads(text)
        edit_header(header)
        text = json.dumps(header)
    if edit_text is not None:
        text = edit_text(text)
    if data_edit is not None:
        data = data_edit(data)
    encoded = text.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _duplicate_norm(text):
    entry = json.dumps(json.loads(text)["model.layers.0.input_layernorm.weight"])
    return text[:-1] + f', "model.norm.weight": {entry}}}'


def _overlap(header):
    header["model.norm.weight"]["data_offsets"] = list(header["model.layers.0.input_layernorm.weight"]["data_offsets"])


def _shift(header):
    for name, info in header.items():
        if name != "__metadata__":
            info["data_offsets"] = [info["data_offsets"][0] + 8, info["data_offsets"][1] + 8]


@pytest.mark.parametrize(
    "rewrite, message",
    [
        (dict(edit_text=_duplicate_norm), r"model\.safetensors is corrupt: its safetensors header lists tensor 'model\.norm\.weight' twice"),
        (dict(edit_header=_overlap), r"model\.safetensors is corrupt: tensor 'model\.norm\.weight' starts at byte \d+ .*overlaps the tensor before it"),
        (dict(edit_header=_shift, data_edit=lambda d: bytes(8) + d), r"model\.safetensors is corrupt: tensor '[\w.]+' starts at byte 8 .*leaves 8 bytes unused"),
        (dict(data_edit=lambda d: d + bytes(64)), r"model\.safetensors is corrupt: its tensors end at byte \d+ .*holds 64 more bytes after them"),
    ],
    ids=["duplicate-key", "overlap", "gap", "trailing-bytes"],
)
def test_header_that_does_not_tile_the_data_is_named(folders, tmp_path, rewrite, message, capsys):
    folder = copy(folders, "single", tmp_path)
    _rewrite_header(folder / "model.safetensors", **rewrite)
    with pytest.raises(CheckpointError, match=message):
        load(folder)
    # the converter's CLI reports it as an error line (safetensors' own error was a traceback there)
    assert main([str(folder), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "is corrupt" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_well_formed_headers_still_read(folders):
    header = read_safetensors_header(folders / "single" / "model.safetensors")
    assert "model.norm.weight" in header


# ---------------------------------------------------------------------------------------------------
# an index that does not describe its shards; a single file beside an index
# ---------------------------------------------------------------------------------------------------


def _drop_from_its_shard(folder, key):
    edit_tensors(folder / weight_map(folder)[key], lambda t: t.pop(key))


def _point_to_another_shard(folder, key):
    shards = sorted(set(weight_map(folder).values()))
    other = next(s for s in shards if s != weight_map(folder)[key])
    edit_json(folder / INDEX, lambda c: c["weight_map"].__setitem__(key, other))


def _ghost(folder, key):
    edit_json(folder / INDEX, lambda c: c["weight_map"].__setitem__("model.layers.1.self_attn.ghost.weight", c["weight_map"][key]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_from_its_shard, r"maps tensor 'lm_head\.weight' to model-\d+-of-\d+\.safetensors, but no shard holds it"),
        (_point_to_another_shard, r"maps tensor 'lm_head\.weight' to model-\d+-of-\d+\.safetensors, but it is stored in model-\d+"),
        (_ghost, r"maps tensor 'model\.layers\.1\.self_attn\.ghost\.weight' to .* but no shard holds it"),
    ],
    ids=["missing", "elsewhere", "ghost"],
)
def test_index_that_does_not_describe_its_shards_is_named(folders, tmp_path, edit, message):
    folder = copy(folders, "sharded", tmp_path)
    edit(folder, "lm_head.weight")  # a missing head only ever gave a load-report line and a random head
    with pytest.raises(CheckpointError, match=rf"The index .*{INDEX} {message}"):
        load(folder)
    with pytest.raises(CheckpointError, match=message):  # the converter's output would silently lack it
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_single_file_beside_an_index_of_other_shards_is_named(folders, tmp_path):
    folder = copy(folders, "sharded", tmp_path)
    shutil.copy(folders / "single" / "model.safetensors", folder)  # transformers would load it and ignore the index
    with pytest.raises(CheckpointError, match=rf"holds both model\.safetensors and the index {INDEX} naming \d+ other shard"):
        load(folder)


def test_missing_embedding_is_named(folders, tmp_path):
    folder = copy(folders, "single", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(CheckpointError, match=r"has no tensor for 'model\.embed_tokens\.weight'"):
        load(folder)
    load(folder, allow_missing_weights=True)


# ---------------------------------------------------------------------------------------------------
# tensor contents: FP8 where no scale can be, other 8-bit formats, expert numbers, router biases, stale scales
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["model.norm.weight", BIAS])
def test_fp8_tensor_that_has_no_scale_grid_is_named(folders, tmp_path, key):
    folder = copy(folders, "single", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(key, t[key].to(torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match=rf"'{key}' in .* is F8_E4M3, but the model holds it in torch\.float32: "
                                              r"the official FP8 layout stores only 2-D projection weights"):
        load(folder)


def test_e5m2_weight_is_named(folders, tmp_path):
    folder = copy(folders, "fp8", tmp_path)
    shard = folder / weight_map(folder)[O_PROJ]
    edit_tensors(shard, lambda t: t.__setitem__(O_PROJ, t[O_PROJ].float().to(torch.float8_e5m2)))
    with pytest.raises(CheckpointError, match=rf"'{O_PROJ}' in .* is F8_E5M2, but the model holds it in an FP8 layer, which reads F8_E4M3"):
        load_fp8(folder)
    with pytest.raises(CheckpointError, match=rf"'{O_PROJ}' in .* is F8_E5M2, but the official FP8 format .* reads F8_E4M3"):
        convert(folder, tmp_path / "out", to="bf16")


def test_expert_number_with_a_leading_zero_is_named(folders, tmp_path):
    folder = copy(folders, "single", tmp_path)
    key = f"{EXPERTS}.03.gate_proj.weight"
    edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(key, t[f"{EXPERTS}.3.gate_proj.weight"] + 1))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' numbers its expert with a leading zero"):
        load(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_router_bias_is_named(folders, tmp_path, value):
    folder = copy(folders, "single", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t[BIAS].__setitem__(2, value))
    with pytest.raises(CheckpointError, match=rf"Router bias '{BIAS}' in .*model\.safetensors holds 1 of 8 values that are not finite"):
        load(folder)


def test_scale_grid_beside_a_high_precision_weight_is_named(folders, tmp_path):
    folder = copy(folders, "single", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(O_PROJ + "_scale_inv", torch.ones(1, 1)))
    with pytest.raises(CheckpointError, match=rf"'{O_PROJ}' in .* is F32, not FP8, but the checkpoint also holds its FP8 scale grid"):
        load(folder)


# ---------------------------------------------------------------------------------------------------
# saves into folders that already hold something
# ---------------------------------------------------------------------------------------------------


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_keeps_other_variants_and_weight_files(model, tmp_path):
    target = tmp_path / "out"
    model.save_pretrained(target)
    (target / "model_ema.safetensors").write_bytes(b"mine")
    (target / "model-notes.safetensors").write_bytes(b"mine too")
    model.save_pretrained(target, variant="fp16")  # deleted model.safetensors: a variant lives beside the main weights
    assert {"model.safetensors", "model.fp16.safetensors", "model_ema.safetensors", "model-notes.safetensors"} <= set(_names(target))
    load(target)
    load(target, variant="fp16")


def test_save_still_removes_its_own_stale_files(model, tmp_path):
    target = tmp_path / "out"
    build_model(tiny_config()).save_pretrained(target, max_shard_size="50KB")
    model.save_pretrained(target, max_shard_size="100KB")
    shards = [n for n in _names(target) if n.endswith(".safetensors")]
    assert set(shards) == set(weight_map(target).values())
    model.save_pretrained(target)  # one file now: the index and every shard go
    assert [n for n in _names(target) if "safetensors" in n] == ["model.safetensors"]
    model.save_pretrained(target, max_shard_size="100KB")  # and back: the single file would win over the index
    assert "model.safetensors" not in _names(target)
    load(target)


def test_save_over_released_shard_names_removes_them(model, tmp_path):
    # the released folders number their shards with six digits for the count (model-00001-of-000163.safetensors)
    target = tmp_path / "out"
    model.save_pretrained(target)
    for i in (1, 2):
        (target / f"model-{i:05d}-of-000002.safetensors").write_bytes(b"an earlier save's shard")
    model.save_pretrained(target)
    assert [n for n in _names(target) if "safetensors" in n] == ["model.safetensors"]


@pytest.mark.parametrize("clash", ["model.safetensors", "config.json"])
def test_save_target_holding_a_folder_named_like_a_saved_file_is_named(model, tmp_path, clash):
    target = tmp_path / "out"
    (target / clash).mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"holds a folder .*out/{clash} where the save writes a file .*nothing was written"):
        model.save_pretrained(target)
    assert _names(target) == sorted([clash, "notes.txt"])


def test_save_to_an_unexpanded_home_path_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'~/out' starts with '~', which is not expanded.*os\.path\.expanduser"):
        model.save_pretrained("~/out")
    assert list(tmp_path.iterdir()) == []


def test_load_from_an_unexpanded_home_path_says_so(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(folders / "single", tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"`~` is not expanded: pass os\.path\.expanduser\('~/ckpt'\)"):
        DeepseekV3ForCausalLM.from_pretrained("~/ckpt")


def test_save_through_a_symlink(model, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    model.save_pretrained(tmp_path / "link")  # failed with a bare NotADirectoryError
    assert (tmp_path / "link").is_symlink() and (real / "model.safetensors").is_file()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"dangling: it is a symbolic link to .*nowhere, which does not exist"):
        model.save_pretrained(tmp_path / "dangling")


# ---------------------------------------------------------------------------------------------------
# the converter
# ---------------------------------------------------------------------------------------------------


def test_converter_refuses_a_destination_inside_its_source(folders, tmp_path, capsys):
    source = copy(folders, "sharded", tmp_path)
    before = _names(source)
    assert main([str(source), str(source / "fp8"), "--no-progress"]) == 1
    assert "is inside the source folder" in capsys.readouterr().err
    assert _names(source) == before


@pytest.mark.parametrize(
    "block, message",
    [
        ({"weight_block_size": [64, 64]}, r"declares `quantization_config\.weight_block_size` \[64, 64\].*\[128, 128\]"),
        ({"fmt": "e5m2"}, r"declares `quantization_config\.fmt` 'e5m2'"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"declares `quantization_config\.quant_method` 'bitsandbytes'"),
    ],
)
def test_converter_names_a_source_format_it_cannot_read(folders, tmp_path, block, message):
    folder = copy(folders, "fp8", tmp_path)
    edit_json(folder / "config.json", lambda c: c["quantization_config"].update(block))
    with pytest.raises(CheckpointError, match=rf"config\.json {message}"):
        convert(folder, tmp_path / "out", to="bf16")
    assert not (tmp_path / "out").exists()


def test_converter_writes_the_router_bias_in_fp32(folders, tmp_path):
    folder = copy(folders, "single", tmp_path)
    edit_tensors(folder / "model.safetensors", lambda t: t.__setitem__(BIAS, t[BIAS].half()))
    convert(folder, tmp_path / "out", to="bf16")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor(BIAS).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(file_prefix=""), ValueError, r"`file_prefix` must be a plain, non-empty"),
        (dict(overwrite="no"), TypeError, r"`overwrite` must be True or False, got 'no'"),
        (dict(progress="no"), TypeError, r"`progress` must be True or False, got 'no'"),
    ],
)
def test_converter_names_bad_quantize_arguments(folders, tmp_path, kwargs, error, message):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(error, match=message):
        DeepseekV3FP8Converter(folders / "single").quantize(tmp_path / "out", **{"progress": False, **kwargs})
    assert _names(tmp_path / "out") == ["keep.txt"]


@pytest.mark.parametrize("source", ["/no/such/checkpoint", "./missing", "a/b/c"])
def test_converter_names_a_missing_local_source(tmp_path, capsys, source):
    assert main([source, str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"No checkpoint folder at {source}" in err and "Repo id" not in err


def test_converter_names_the_sub_folders_it_does_not_copy(folders, tmp_path, caplog):
    folder = copy(folders, "single", tmp_path)
    (folder / "original").mkdir()
    (folder / "original" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.quantization.converter"):
        convert(folder, tmp_path / "out")
    assert any("Not copied: the sub-folder(s) original of" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------
# model cards
# ---------------------------------------------------------------------------------------------------


def test_card_tags_are_strings(model):
    assert model_card.build_model_card(model, extra_tags="my-tag").data.tags[-1] == "my-tag"  # not one per letter
    with pytest.raises(TypeError, match=r"`extra_tags` must be tag strings, got None"):
        model_card.build_model_card(model, extra_tags=[None])


def test_card_of_an_fp8_model_names_the_dtype_of_its_other_tensors(folders):
    text = model_card.build_model_card(load(folders / "fp8", dtype=torch.float32,
                                            quantization_config=DeepseekV3FP8Config(dequantize=False))).text
    assert "MTP `eh_proj` in FP32" in text and "in BF16" not in text
    text = model_card.build_model_card(load(folders / "fp8", dtype=torch.bfloat16,
                                            quantization_config=DeepseekV3FP8Config(dequantize=False))).text
    assert "MTP `eh_proj` in BF16" in text


def test_pushed_card_keeps_a_numeric_tag_as_a_tag(model, tmp_path):
    from huggingface_hub import ModelCard, ModelCardData

    placeholder = ModelCard.from_template(ModelCardData(tags=[2024], library_name="transformers"), model_description=(
        "This is the model card of a 🤗 transformers model that has been pushed on the Hub. "
        "This model card has been automatically generated."))
    placeholder.save(tmp_path / "README.md")  # what push_to_hub(tags=[2024]) leaves before the upload
    model_card.prepare_push(model, str(tmp_path), "me/model")  # raised once tags had to be strings
    card = ModelCard.load(tmp_path / "README.md")
    assert "2024" in card.data.tags and "import modeling_deepseek_v3" in card.text


def test_converter_says_a_home_path_is_not_expanded(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(folders / "single", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"No checkpoint folder at ~/ckpt \(`~` is not expanded"):
        DeepseekV3FP8Converter.from_pretrained("~/ckpt")


def test_modules_to_not_convert_matches_as_transformers_quantizers_do(folders, caplog):
    # a leaf name (transformers' style) used to match no full path and kept every layer FP8 without a word; it now
    # keeps every q_a_proj high precision, which this FP8 folder cannot fill
    with pytest.raises(CheckpointError, match=r"`quantization_config.modules_to_not_convert` lists 'q_a_proj'"):
        load(folders / "fp8", quantization_config=DeepseekV3FP8Config(dequantize=False, modules_to_not_convert=["q_a_proj"]))
    # an entry that matches nothing keeps nothing out of FP8: named
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.checkpoint"):
        model = load(folders / "fp8", quantization_config=DeepseekV3FP8Config(dequantize=False, modules_to_not_convert=["q_a_prj"]))
    assert "['q_a_prj'] match no module" in caplog.text
    assert type(model.model.layers[1].self_attn.q_a_proj).__name__ == "FP8Linear"


def test_subfolder_loads_get_the_folder_checks(folders, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(folders / "sharded", root / "weights")
    assert load(root, subfolder="weights").config.num_hidden_layers == 2
    with pytest.raises(FileNotFoundError, match=r"No folder 'wieghts' in .*repo \(`subfolder`\)"):
        DeepseekV3ForCausalLM.from_pretrained(root, subfolder="wieghts")  # the Auto classes fail in AutoConfig first
    (root / "weights" / INDEX).write_text("{not json")  # the index checks read the sub-folder's index
    with pytest.raises(CheckpointError, match=r"weights/model.safetensors.index.json"):
        load(root, subfolder="weights")


def test_saving_a_non_finite_router_bias_is_refused(tmp_path):
    model = build_model(tiny_config(num_hidden_layers=2))
    model.model.layers[1].mlp.gate.e_score_correction_bias[2] = float("inf")
    with pytest.raises(ValueError, match=r"Cannot save: the routing bias of model\.layers\.1\.mlp\.gate\.e_score_correction_bias holds nan or inf"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
