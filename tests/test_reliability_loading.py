"""Bad configs, checkpoint folders, FP8 blocks, saves and converter inputs: each is an error naming the field, file or
tensor where it enters, never a deep traceback or a silently wrong model."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import build_model, edit_json, edit_tensors, tiny_config
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3FP8Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.checkpoint import CheckpointError
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter, main

INDEX = "model.safetensors.index.json"
KV = "model.layers.1.self_attn.kv_a_proj_with_mqa"
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"
EXPERTS = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model = build_model(tiny_config())
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    DeepseekV3FP8Converter.from_pretrained(root / "sharded").quantize(root / "fp8", progress=False)
    return root


def copy(folders, name, tmp_path):
    return shutil.copytree(folders / name, tmp_path / name)


def shard_of(folder, key):
    return json.loads((folder / INDEX).read_text())["weight_map"][key]


def load(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def load_fp8(folder):
    return load(folder, quantization_config=DeepseekV3FP8Config(dequantize=False))


# ---------------------------------------------------------------------------------------------------
# config fields
# ---------------------------------------------------------------------------------------------------

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize(
    "fields, error, message",
    [
        (dict(num_key_value_heads=0), ValueError, r"`num_key_value_heads` must be a positive integer, got 0"),
        (dict(num_key_value_heads=-2), ValueError, r"`num_key_value_heads` must be a positive integer"),
        (dict(rope_theta=0.0), ValueError, r"`rope_theta` must be a positive finite number, got 0.0"),
        (dict(rope_theta=float("nan")), ValueError, r"`rope_theta` must be a positive finite number, got nan"),
        (dict(rope_scaling=None, rope_theta="10000"), ValueError, r"`rope_theta` must be a positive finite number, got '10000'"),
        (dict(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": -3.0}), ValueError, r"`rope_theta`.*-3.0"),
        (dict(rope_scaling={**YARN, "factor": -4.0}), ValueError, r"`rope_scaling`.*entry `factor` must be a positive"),
        (dict(rope_scaling={**YARN, "factor": "4"}), ValueError, r"`rope_scaling`.*entry `factor`.*'4'"),
        (dict(rope_scaling={**YARN, "factor": 0.5}), ValueError, r"entry `factor` must be at least 1 for rope type 'yarn'.*0.5"),
        (dict(rope_scaling={"type": "linear", "factor": 0.25}), ValueError, r"at least 1 for rope type 'linear'"),
        (dict(rope_scaling={**YARN, "original_max_position_embeddings": 0}), ValueError, r"`original_max_position_embeddings` must be a positive integer"),
        (dict(rope_scaling={**YARN, "beta_fast": float("nan")}), ValueError, r"entry `beta_fast` must be a finite number"),
        (dict(rope_scaling={"type": "linear", "factor": 0.0}), ValueError, r"entry `factor`.*0.0"),
        (dict(rope_scaling={"factor": 4.0}), ValueError, r"`rope_scaling` sets `factor` 4.0 but no rope type"),
        (dict(rope_scaling={"type": "linear"}), ValueError, r"`rope_scaling`.*Missing required keys.*factor"),
        (dict(rms_norm_eps=0), ValueError, r"`rms_norm_eps` must be a positive finite number"),
        (dict(rms_norm_eps=-1e-6), ValueError, r"`rms_norm_eps` must be a positive finite number"),
        (dict(rms_norm_eps=float("nan")), ValueError, r"`rms_norm_eps`.*nan"),
        (dict(initializer_range=-0.02), ValueError, r"`initializer_range` must be a finite non-negative number"),
        (dict(attention_dropout=1.5), ValueError, r"`attention_dropout` must be a probability in \[0, 1\], got 1.5"),
        (dict(attention_dropout=-0.1), ValueError, r"`attention_dropout` must be a probability"),
        (dict(hidden_act="gelu_fancy"), ValueError, r"`hidden_act` must name an activation.*'gelu_fancy'"),
        (dict(pad_token_id=200), ValueError, r"`pad_token_id` must be null or a token id in \[0, vocab_size=97\), got 200"),
        (dict(pad_token_id=-5), ValueError, r"`pad_token_id`.*-5"),
        (dict(bos_token_id=1000), ValueError, r"`bos_token_id`.*1000"),
        (dict(eos_token_id=[1, 500]), ValueError, r"`eos_token_id`.*\[1, 500\]"),
        (dict(moe_layer_freq=2), ValueError, r"`moe_layer_freq` must be 1.*got 2"),
        (dict(moe_layer_freq=0), ValueError, r"`moe_layer_freq` must be 1"),
        (dict(routed_scaling_factor=0.0), ValueError, r"`routed_scaling_factor` must be a positive finite number"),
        (dict(first_k_dense_replace=4), ValueError, r"`first_k_dense_replace` \(4\) exceeds `num_hidden_layers` \(3\)"),
        (dict(topk_method="greedy", num_experts_per_tok=9), ValueError, r"`num_experts_per_tok` \(9\) exceeds `n_routed_experts` \(8\)"),
        (dict(quantization_config="fp8"), ValueError, r"`quantization_config` must be an object.*'fp8'"),
        (dict(quantization_config=[1, 2]), ValueError, r"`quantization_config` must be an object"),
        (dict(dtype="float17"), ValueError, r"`dtype` must name a floating-point torch dtype.*'float17'"),
        (dict(dtype="int8"), ValueError, r"`dtype`.*'int8'"),
        (dict(q_lora_rank=True), ValueError, r"`q_lora_rank` must be null or a positive integer, got True"),
        (dict(norm_topk_prob="yes"), TypeError, r"Config field `norm_topk_prob` has a value of the wrong type"),
        (dict(use_cache="yes"), TypeError, r"Config field `use_cache`"),
        (dict(rope_scaling="yarn"), TypeError, r"Config field `rope_parameters`"),
    ],
)
def test_bad_config_values_name_the_field(fields, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**fields)


def test_json_integers_where_transformers_types_a_float_are_accepted():
    config = tiny_config(routed_scaling_factor=2, rms_norm_eps=1, initializer_range=0)
    assert (config.routed_scaling_factor, config.rms_norm_eps, config.initializer_range) == (2.0, 1.0, 0.0)
    assert tiny_config(first_k_dense_replace=3).first_k_dense_replace == 3  # all layers dense is a model
    # the greedy router picks among all experts: groups do not bound its top-k
    assert tiny_config(topk_method="greedy", num_experts_per_tok=5).num_experts_per_tok == 5


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_experts_per_tok=100), r"`num_experts_per_tok` \(100\)"),
        (dict(first_k_dense_replace=9), r"`first_k_dense_replace` \(9\)"),
        (dict(pad_token_id=500), r"`pad_token_id`"),
        (dict(num_nextn_predict_layers=-1), r"`num_nextn_predict_layers`"),
        (dict(use_cache="yes"), r"`use_cache`"),
    ],
)
def test_from_pretrained_overrides_are_validated(folders, override, message):
    with pytest.raises((ValueError, TypeError), match=message):
        load(folders / "single", **override)


def test_config_json_missing_or_not_an_object(folders, tmp_path):
    folder = copy(folders, "single", tmp_path)
    (folder / "config.json").unlink()  # transformers would build the full-size default config from nothing
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        DeepseekV3ForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"must hold a JSON object, got list"):
        DeepseekV3Config.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=r"no-such-folder does not exist"):
        DeepseekV3Config.from_pretrained(tmp_path / "no-such-folder")
    (folder / "config.json").write_text(json.dumps({**tiny_config().to_dict(), "quantization_config": "fp8"}))
    with pytest.raises(ValueError, match=r"`quantization_config` must be an object"):
        load(folder)


# ---------------------------------------------------------------------------------------------------
# the FP8 quantization_config block
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(weight_block_size=None), r"weight_block_size must be \[128, 128\].*None"),
        (dict(weight_block_size=128), r"weight_block_size must be \[128, 128\].*128"),
        (dict(weight_block_size=[128]), r"weight_block_size must be \[128, 128\].*\[128\]"),
        (dict(weight_block_size=["128", "128"]), r"weight_block_size.*\['128', '128'\]"),
        (dict(activation_scheme=None), r"activation_scheme must be 'dynamic', got None"),
        (dict(fmt=5), r"fmt must be 'e4m3'"),
        (dict(dequantize="yes"), r"dequantize must be true, false or null.*'yes'"),
        (dict(modules_to_not_convert="lm_head"), r"modules_to_not_convert must be a list of module names, got 'lm_head'"),
        (dict(modules_to_not_convert=5), r"modules_to_not_convert must be a list"),
    ],
)
def test_bad_fp8_block_names_the_field(fields, message):
    with pytest.raises(ValueError, match=rf"quantization_config\.{message}"):
        DeepseekV3FP8Config(**fields)
    with pytest.raises(ValueError, match=rf"quantization_config\.{message}"):
        tiny_config(quantization_config={"quant_method": "fp8", **fields})


# ---------------------------------------------------------------------------------------------------
# safetensors files and the index
# ---------------------------------------------------------------------------------------------------

NORM = {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}


@pytest.mark.parametrize(
    "header, message",
    [
        ([1, 2], r"model\.safetensors is corrupt: its safetensors header is not a JSON object"),
        ({"model.norm.weight": 5}, r"header entry of tensor 'model\.norm\.weight' is not an object"),
        ({"model.norm.weight": {**NORM, "dtype": "F99"}}, r"'model\.norm\.weight' in .*model\.safetensors has dtype 'F99'"),
        ({"model.norm.weight": {k: v for k, v in NORM.items() if k != "dtype"}}, r"'model\.norm\.weight'.*has dtype None"),
        ({"model.norm.weight": {k: v for k, v in NORM.items() if k != "shape"}}, r"'model\.norm\.weight'.*has shape None"),
        ({"model.norm.weight": {**NORM, "shape": [-64]}}, r"has shape \[-64\], not a list of non-negative integers"),
        ({"model.norm.weight": {**NORM, "data_offsets": 7}}, r"has data_offsets 7"),
        ({"model.norm.weight": {**NORM, "data_offsets": [256, 0]}}, r"has data_offsets \[256, 0\]"),
        ({"model.norm.weight": {**NORM, "data_offsets": [0, 100]}}, r"F32 of shape \[64\] \(256 bytes\), but its data_offsets span 100"),
        ({"__metadata__": {"format": 5}, "model.norm.weight": NORM}, r"its `__metadata__` is not a mapping of strings"),
    ],
)
def test_corrupt_safetensors_header_names_file_and_tensor(folders, tmp_path, header, message):
    folder = copy(folders, "single", tmp_path)
    encoded = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(256))
    with pytest.raises(CheckpointError, match=message):
        load(folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda index: index.__setitem__("weight_map", {}), r"has an empty `weight_map`"),
        (lambda index: index["weight_map"].__setitem__("model.norm.weight", "../single/model.safetensors"),
         r"names the shard '\.\./single/model\.safetensors', which is outside the checkpoint folder"),
        (lambda index: index.pop("metadata"), r"has no `metadata` object"),
    ],
)
def test_bad_index_names_the_file(folders, tmp_path, edit, message):
    folder = copy(folders, "sharded", tmp_path)
    edit_json(folder / INDEX, edit)
    with pytest.raises(CheckpointError, match=rf"{INDEX} {message}"):
        load(folder)


def test_tensor_stored_in_two_shards_is_named(folders, tmp_path):
    folder = copy(folders, "sharded", tmp_path)
    home = shard_of(folder, "model.norm.weight")
    other = next(s for s in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values())) if s != home)
    edit_tensors(folder / other, lambda t: t.__setitem__("model.norm.weight", torch.full((64,), 7.0)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored twice, in .*model-0000\d-of.* and in "):
        load(folder)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is stored twice"):
        DeepseekV3FP8Converter.from_pretrained(folder).quantize(tmp_path / "never", progress=False)


# ---------------------------------------------------------------------------------------------------
# routed experts stored per expert
# ---------------------------------------------------------------------------------------------------


def _more_experts(tensors):
    for proj in ("gate", "up", "down"):
        tensors[f"{EXPERTS}.8.{proj}_proj.weight"] = tensors[f"{EXPERTS}.0.{proj}_proj.weight"].clone()


@pytest.mark.parametrize(
    "edit, message",
    [
        (_more_experts, rf"holds 9 routed experts for '{EXPERTS}'.*`n_routed_experts` is 8"),
        (lambda t: t.__setitem__(f"{EXPERTS}.3.up_proj.weight", t[f"{EXPERTS}.3.up_proj.weight"][:-1].clone()),
         rf"'{EXPERTS}\.3\.up_proj\.weight' in .* has shape \[31, 64\], but the model \(config\) expects \[32, 64\]"),
        (lambda t: t.__setitem__(f"{EXPERTS}.5.down_proj.weight", t[f"{EXPERTS}.5.down_proj.weight"].to(torch.int32)),
         rf"'{EXPERTS}\.5\.down_proj\.weight' in .* is I32"),
        (lambda t: t.__setitem__(f"{EXPERTS}.gate_up_proj", torch.zeros(8, 64, 64)), rf"holds '{EXPERTS}' both per expert .* and stacked"),
    ],
)
def test_bad_per_expert_tensors_are_named(folders, tmp_path, edit, message):
    folder = copy(folders, "single", tmp_path)
    edit_tensors(folder / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load(folder)


def test_fp8_expert_without_its_scale_is_named(folders, tmp_path):
    folder = copy(folders, "fp8", tmp_path)
    key = f"{EXPERTS}.2.up_proj.weight_scale_inv"
    edit_tensors(folder / shard_of(folder, key), lambda t: t.pop(key))
    edit_json(folder / INDEX, lambda index: index["weight_map"].pop(key))
    with pytest.raises(CheckpointError, match=rf"FP8 tensor '{EXPERTS}\.2\.up_proj\.weight' in .* has no '{key}'"):
        load_fp8(folder)


def test_per_expert_state_dict_gaps_and_uneven_experts_are_named(folders):
    model = load(folders / "single")
    saved = load_file(folders / "single" / "model.safetensors")  # the official per-expert names
    state = {k: v for k, v in saved.items() if k != f"{EXPERTS}.2.gate_proj.weight"}
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\).*{EXPERTS}\.2\.gate_proj\.weight"):
        model.load_state_dict(state)
    state = dict(saved, **{f"{EXPERTS}.1.up_proj.weight": torch.zeros(31, 64)})
    with pytest.raises(CheckpointError, match=rf"{EXPERTS}\.1\.up_proj\.weight' has shape \[31, 64\], but '{EXPERTS}' holds that expert's up_proj as \[32, 64\]"):
        model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(max_shard_size=-5), ValueError, r"`max_shard_size` must be a positive number of bytes.*-5"),
        (dict(max_shard_size="0MB"), ValueError, r"`max_shard_size`.*'0MB'"),
        (dict(max_shard_size="1KiB"), ValueError, r"`max_shard_size`.*units KB, MB, GB, TB.*'1KiB'"),  # the saver's parser
        (dict(max_shard_size="0.0001KB"), ValueError, r"`max_shard_size`.*'0\.0001KB'"),
        (dict(state_dict={"model.norm.weight": 5}), TypeError, r"`state_dict\['model\.norm\.weight'\]` must be a torch\.Tensor"),
        (dict(state_dict=[1]), TypeError, r"`state_dict` must be a dict"),
    ],
)
def test_bad_save_arguments_are_named_and_leave_the_target_alone(tmp_path, kwargs, error, message):
    model = build_model(tiny_config(num_hidden_layers=2))
    with pytest.raises(error, match=message):
        model.save_pretrained(tmp_path / "out", **kwargs)
    assert not list(tmp_path.iterdir())


def test_save_target_that_is_a_file_or_empty_is_named(tmp_path, monkeypatch):
    model = build_model(tiny_config(num_hidden_layers=2))
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"a-file: it is a file, not a folder"):
        model.save_pretrained(tmp_path / "a-file")
    with pytest.raises(NotADirectoryError, match=r"a-file/sub: .*a-file is a file, not a folder"):
        model.save_pretrained(tmp_path / "a-file" / "sub")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"empty path"):  # would otherwise write into the working directory
        model.save_pretrained("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and (tmp_path / "a-file").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------
# the converter
# ---------------------------------------------------------------------------------------------------


def test_converter_refuses_its_source_as_destination(folders, tmp_path):
    folder = copy(folders, "sharded", tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(FileExistsError, match=r"is the source folder"):
        DeepseekV3FP8Converter.from_pretrained(folder).quantize(folder, progress=False, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize(
    "config, message",
    [("{not json", r"config\.json is not valid JSON"), ("[1]", r"config\.json must hold a JSON object, got list")],
)
def test_converter_names_a_bad_config_json_before_writing(folders, tmp_path, config, message):
    folder = copy(folders, "sharded", tmp_path)
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=message):
        DeepseekV3FP8Converter.from_pretrained(folder).quantize(tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "source, key, edit, to, message",
    [
        ("sharded", KV_B, lambda w: w[None].contiguous(), "fp8", rf"Cannot quantize '{KV_B}'.*shape \[1, 88, 16\].*2-D"),
        ("sharded", KV_B, lambda w: w.flatten().contiguous(), "fp8", rf"Cannot quantize '{KV_B}'.*2-D"),
        ("fp8", f"{KV}.weight_scale_inv", lambda s: s * 0, "fp8", rf"'{KV}\.weight_scale_inv' in .* not finite and positive"),
        ("fp8", f"{KV}.weight_scale_inv", lambda s: torch.ones(3, 3), "fp8", rf"'{KV}\.weight_scale_inv' has shape \[3, 3\].*needs \[1, 1\]"),
        ("fp8", f"{KV}.weight_scale_inv", lambda s: s.bfloat16(), "fp8", rf"'{KV}\.weight_scale_inv' of .* must be F32"),
        ("fp8", f"{KV}.weight_scale_inv", lambda s: s.int(), "bf16", rf"'{KV}\.weight_scale_inv' of .* must be F32"),
        ("fp8", f"{KV}.weight", lambda w: w.flatten().contiguous(), "bf16", rf"FP8 tensor '{KV}\.weight' in .* has shape \[1536\]"),
    ],
)
def test_converter_names_bad_tensors(folders, tmp_path, source, key, edit, to, message):
    folder = copy(folders, source, tmp_path)
    edit_tensors(folder / shard_of(folder, key), lambda t: t.__setitem__(key, edit(t[key])))
    with pytest.raises(CheckpointError, match=message):
        DeepseekV3FP8Converter.from_pretrained(folder, to=to).quantize(tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda src, out: DeepseekV3FP8Converter(src, to="fp8", dtype="float17"), ValueError, r"`dtype` must be one of.*'float17'"),
        (lambda src, out: DeepseekV3FP8Converter(src, power_of_two_scales="yes"), TypeError, r"`power_of_two_scales` must be True or False"),
        (lambda src, out: DeepseekV3FP8Converter.from_pretrained(None), TypeError, r"`model_or_path` must be a folder path, got None"),
        (lambda src, out: DeepseekV3FP8Converter(src).quantize(None), TypeError, r"`save_dir` must be a folder path, got None"),
        (lambda src, out: DeepseekV3FP8Converter(src).quantize(out, file_prefix="a/b"), ValueError, r"`file_prefix` must be a plain"),
    ],
)
def test_converter_names_bad_arguments(folders, tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(folders / "single", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_destination_that_is_a_file_without_a_traceback(folders, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    assert main([str(folders / "single"), str(tmp_path / "a-file"), "--no-progress"]) == 1
    assert "error: Cannot save into" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "mine"
    assert main([str(folders / "single"), "", "--no-progress"]) == 1
    assert "`save_dir` must be a folder path" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["/no/such/checkpoint", "./missing-folder", "~/missing-folder", "a/b/c"])
def test_from_pretrained_names_a_local_path_that_does_not_exist(source):
    with pytest.raises(FileNotFoundError, match="No checkpoint folder at"):
        DeepseekV3ForCausalLM.from_pretrained(source)


def test_from_pretrained_names_a_file_given_for_the_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file; from_pretrained takes the folder"):
        DeepseekV3ForCausalLM.from_pretrained(file)


# ---------------------------------------------------------------------------------------------------
# the fp8_block quantizer plugin and FP8 checkpoints; what is not safetensors; load and save arguments
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_plugin_folders(tmp_path_factory):
    """A model trained with `quantizer='fp8_block'` saved (its config.json keeps the plugin), then converted to FP8."""
    root = tmp_path_factory.mktemp("fp8_plugin")
    build_model(tiny_config(quantizer="fp8_block")).save_pretrained(root / "train")
    DeepseekV3FP8Converter(root / "train").quantize(root / "fp8", progress=False)
    return root


def test_fp8_checkpoint_loads_into_the_fp8_block_plugin_in_either_mode(fp8_plugin_folders):
    from modeling_deepseek_v3.quantization import FP8Linear, FP8TrainingLinear

    folder = fp8_plugin_folders / "fp8"
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = load(folder, quantizer=None, quantization_config=DeepseekV3FP8Config(dequantize=True)).eval()
    train = load(folder)  # config.json: quantizer fp8_block, fp8_mode train -> dequantized, then wrapped again
    o_proj = train.model.layers[1].self_attn.o_proj
    assert type(o_proj) is FP8TrainingLinear and o_proj.weight.dtype == torch.float32
    assert train.config._experts_implementation == "deepseek_fp8"
    assert torch.equal(o_proj.weight, plain.model.layers[1].self_attn.o_proj.weight)
    with torch.no_grad():
        assert (train.eval()(ids).logits - plain(ids).logits).abs().max() < 0.1  # FP8 GEMMs vs the fp32 ones
    kept = load(folder, fp8_mode="inference")  # keeps the file's FP8 bytes, on the CPU too
    with safe_open(folder / "model.safetensors", "pt") as f:
        stored = f.get_tensor("model.layers.1.self_attn.o_proj.weight")
    o_proj = kept.model.layers[1].self_attn.o_proj
    assert type(o_proj) is FP8Linear and torch.equal(o_proj.weight.view(torch.uint8), stored.view(torch.uint8))
    for mode, dequantize in (("train", False), ("inference", True)):
        with pytest.raises(ValueError, match=rf"`quantizer='fp8_block'` with `fp8_mode='{mode}'`.*`dequantize={dequantize}`: drop one"):
            load(folder, fp8_mode=mode, quantization_config=DeepseekV3FP8Config(dequantize=dequantize))


def test_fp8_tensor_for_a_high_precision_layer_says_why(folders, fp8_plugin_folders, tmp_path):
    with pytest.raises(CheckpointError, match=r"q_a_proj.weight.*is F32, but .* `fp8_mode='inference'`, which loads FP8 "
                                              r"checkpoints only: load this high-precision folder with `fp8_mode='train'`"):
        load(folders / "single", quantizer="fp8_block", fp8_mode="inference")
    with pytest.raises(CheckpointError, match=r"`quantization_config.modules_to_not_convert` lists 'model.layers.1.self_attn'"):
        load(folders / "fp8", quantization_config=DeepseekV3FP8Config(
            dequantize=False, modules_to_not_convert=["model.layers.1.self_attn"]))
    fp8 = copy(folders, "fp8", tmp_path)
    shard = fp8 / shard_of(fp8, "lm_head.weight")

    def quantized_head(tensors):
        from modeling_deepseek_v3.quantization.formats import quantize_weight_128x128
        tensors["lm_head.weight"], tensors["lm_head.weight_scale_inv"] = quantize_weight_128x128(tensors["lm_head.weight"])

    edit_tensors(shard, quantized_head)
    edit_json(fp8 / INDEX, lambda c: c["weight_map"].update({"lm_head.weight_scale_inv": shard.name}))
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' .* is FP8 .*only the attention and MLP projections in FP8"):
        load_fp8(fp8)


def test_saving_fp8_layers_quantized_in_memory_is_refused(tmp_path):
    model = build_model(tiny_config(num_hidden_layers=2, quantizer="fp8_block", fp8_mode="inference"))
    with pytest.raises(ValueError, match=r"FP8 layers quantized in memory .*fp8_mode='inference'.*deepseek-v3-convert"):
        model.save_pretrained(tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_checkpoint_layers_the_model_does_not_build_are_reported(folders, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.checkpoint"):
        model = load(folders / "single", num_hidden_layers=2)
    assert len(model.model.layers) == 2
    assert any("layer(s) [2]" in r.getMessage() and "num_hidden_layers=2" in r.getMessage() for r in caplog.records)
    stray = copy(folders, "single", tmp_path)
    edit_tensors(stray / "model.safetensors", lambda t: t.update({"model.layers.9.mlp.gate.weight": torch.zeros(8, 64)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.checkpoint"):
        load(stray)
    assert any("layer(s) [9] (e.g. 'model.layers.9.mlp.gate.weight')" in r.getMessage() for r in caplog.records)


def test_pickled_weights_are_refused_naming_the_file(folders, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folders / "single" / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never read")  # the check runs before anything would open it
    with pytest.raises(CheckpointError, match=r"holds pickled weights \(pytorch_model.bin\) and no safetensors file: .*safetensors"):
        load(pickled)
    indexed = copy(folders, "sharded", tmp_path)
    edit_json(indexed / INDEX, lambda c: c["weight_map"].update({"lm_head.weight": "pytorch_model.bin"}))
    (indexed / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that are not safetensors files \(\['pytorch_model.bin'\]\)"):
        load(indexed)
    with pytest.raises(ValueError, match=r"`use_safetensors=False`: this package reads safetensors weights only"):
        load(folders / "single", use_safetensors=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(allow_missing_weights="no"), r"`allow_missing_weights` must be True or False, got 'no'"),
        (dict(config={"hidden_size": 64}), r"`config` must be a DeepseekV3Config .* got dict"),
        (dict(config=transformers.LlamaConfig()), r"`config` is a LlamaConfig of model_type 'llama'; this model needs a DeepseekV3Config"),
    ],
)
def test_bad_load_arguments_are_named(folders, kwargs, message):
    with pytest.raises(TypeError, match=message):
        DeepseekV3ForCausalLM.from_pretrained(folders / "single", **kwargs)


@pytest.mark.parametrize("card", [b"\xff\xfe not text", None])
def test_a_readme_that_is_not_a_text_card_is_the_users_and_kept(tmp_path, card):
    target = tmp_path / "out"
    target.mkdir()
    if card is None:
        (target / "README.md").mkdir()  # a folder of that name
        (target / "README.md" / "notes.txt").write_text("mine")
    else:
        (target / "README.md").write_bytes(card)
    build_model(tiny_config(num_hidden_layers=2)).save_pretrained(target)
    assert (target / "model.safetensors").is_file()
    if card is None:
        assert (target / "README.md" / "notes.txt").read_text() == "mine"
    else:
        assert (target / "README.md").read_bytes() == card
