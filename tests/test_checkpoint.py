"""Official checkpoint layout both ways: FP8 (e4m3 + 128x128 scales) and MTP load/save, bad input, atomic saves.

Tiny checkpoints are generated here, with sides that are not multiples of 128 (hidden 200, kv_lora 72 -> the
kv_a_proj_with_mqa has 88 rows, q_lora 136), one MTP module and many shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import modeling_deepseek_v3
from conftest import build_model, tiny_config
from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.checkpoint import CheckpointError, DeepseekV3FP8Config
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter
from modeling_deepseek_v3.quantization.linear import FP8Linear

SHARD = "200KB"


def odd_config(**overrides):
    fields = dict(hidden_size=200, kv_lora_rank=72, qk_rope_head_dim=16, q_lora_rank=136, intermediate_size=260,
                  moe_intermediate_size=72, num_nextn_predict_layers=1)
    fields.update(overrides)
    return tiny_config(**fields)


def read_folder(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():
                    out[key] = f.get_tensor(key)
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    build_model(odd_config()).to(torch.bfloat16).save_pretrained(root / "bf16", max_shard_size=SHARD)
    DeepseekV3FP8Converter.from_pretrained(root / "bf16").quantize(root / "fp8", progress=False)
    DeepseekV3FP8Converter.from_pretrained(root / "fp8", to="fp32").quantize(root / "deq32", progress=False)
    return root


def test_fp8_folder_is_official_layout(folders):
    fp8 = folders / "fp8"
    tensors = read_folder(fp8)
    assert len([n for n in os.listdir(fp8) if n.endswith(".safetensors")]) > 3
    kv = "model.layers.1.self_attn.kv_a_proj_with_mqa"
    assert tensors[f"{kv}.weight"].dtype == torch.float8_e4m3fn and tensors[f"{kv}.weight"].shape == (88, 200)
    assert tensors[f"{kv}.weight_scale_inv"].dtype == torch.float32 and tensors[f"{kv}.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.1.mlp.experts.7.down_proj.weight_scale_inv"].shape == (2, 1)
    for high in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.3.eh_proj.weight", "model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
        assert tensors[high].dtype == torch.bfloat16, high
        assert high.replace("weight", "weight_scale_inv") not in tensors
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    config = json.load(open(fp8 / "config.json"))
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "weight_block_size": [128, 128]}
    index = json.load(open(fp8 / "model.safetensors.index.json"))["weight_map"]
    assert set(index) == set(tensors)


def test_fp8_logits_against_transformers_on_dequantized_weights(folders):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folders / "deq32", dtype=torch.float32).eval()
    fp8 = transformers.AutoModelForCausalLM.from_pretrained(
        folders / "fp8", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=False)
    ).eval()
    deq = transformers.AutoModelForCausalLM.from_pretrained(
        folders / "fp8", dtype=torch.float32, quantization_config=DeepseekV3FP8Config(dequantize=True)
    ).eval()
    assert isinstance(fp8, DeepseekV3ForCausalLM)
    assert isinstance(fp8.model.layers[1].self_attn.kv_a_proj_with_mqa, FP8Linear)
    assert type(deq.model.layers[1].self_attn.kv_a_proj_with_mqa) is torch.nn.Linear
    assert getattr(deq.config, "quantization_config", None) is None  # dequantized: saves as a plain model
    with torch.no_grad():
        ref = theirs(ids).logits
        out_deq = deq(ids).logits
        out_fp8 = fp8(ids).logits
    # dequantized weights: the same numbers as transformers' own class
    assert ((out_deq - ref).norm() / ref.norm()).item() < 1e-5
    # FP8 GEMMs additionally quantize activations per 1x128 tile: FP8-sized error (docs/equations.md, FP8), not garbage
    rel = ((out_fp8 - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.2, rel  # random data at E4M3 resolution, a few layers deep; garbage is ~1


def test_fp8_save_round_trip_is_bit_exact(folders, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folders / "fp8", dtype=torch.bfloat16, quantization_config=DeepseekV3FP8Config(dequantize=False)
    )
    model.save_pretrained(tmp_path / "out", max_shard_size=SHARD)
    a, b = read_folder(folders / "fp8"), read_folder(tmp_path / "out")
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(raw(a[key]), raw(b[key])), key
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert saved["quantization_config"]["quant_method"] == "fp8"
    assert saved["rope_scaling"]["type"] == "yarn"  # legacy form for vLLM / SGLang / old transformers
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # transformers' own class still reads the config we wrote
    theirs_config = transformers.DeepseekV3Config.from_pretrained(tmp_path / "out")
    assert theirs_config.rope_parameters["rope_type"] == "yarn" and theirs_config.rope_parameters["factor"] == 4.0


def test_mtp_tensors_are_loaded_and_shared_copies_written(folders, tmp_path):
    stored = read_folder(folders / "bf16")
    model = transformers.AutoModelForCausalLM.from_pretrained(folders / "bf16", dtype=torch.bfloat16)
    mtp = model.model.layers[3]
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight"):
        assert torch.equal(mtp.get_parameter(name), stored[f"model.layers.3.{name}"]), name
    # the routed experts are stacked: expert 5's up rows are the second half of its gate_up_proj
    inter = model.config.moe_intermediate_size
    assert torch.equal(mtp.mlp.experts.gate_up_proj[5, inter:], stored["model.layers.3.mlp.experts.5.up_proj.weight"])
    assert torch.equal(mtp.mlp.experts.down_proj[5], stored["model.layers.3.mlp.experts.5.down_proj.weight"])
    model.save_pretrained(tmp_path / "out", max_shard_size=SHARD)
    saved = read_folder(tmp_path / "out")
    assert torch.equal(saved["model.layers.3.embed_tokens.weight"], saved["model.embed_tokens.weight"])
    assert torch.equal(saved["model.layers.3.shared_head.head.weight"], saved["lm_head.weight"])
    assert set(saved) == set(stored)


def test_missing_mtp_warns_and_zero_depth_skips(tmp_path, caplog):
    build_model(odd_config(num_nextn_predict_layers=0)).save_pretrained(tmp_path / "nomtp")
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.checkpoint"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nomtp", num_nextn_predict_layers=1)
    assert any("MTP layer(s) [3]" in r.getMessage() and "freshly initialised" in r.getMessage() for r in caplog.records)
    assert len(model.model.layers) == 4
    build_model(odd_config()).save_pretrained(tmp_path / "mtp")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.checkpoint"):
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mtp", num_nextn_predict_layers=0)
    assert len(model.model.layers) == 3 and not caplog.records


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _shard_of(folder, key):
    return json.load(open(folder / "model.safetensors.index.json"))["weight_map"][key]


def _rewrite_shard(folder, shard, edit):
    with safe_open(folder / shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})


KV = "model.layers.1.self_attn.kv_a_proj_with_mqa"


def _load_fp8(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=DeepseekV3FP8Config(dequantize=False))


def test_missing_scale_names_tensor_and_file(folders, tmp_path):
    folder = _copy(folders / "fp8", tmp_path / "c")
    shard = _shard_of(folder, f"{KV}.weight_scale_inv")
    _rewrite_shard(folder, shard, lambda t: t.pop(f"{KV}.weight_scale_inv"))
    index = json.load(open(folder / "model.safetensors.index.json"))
    del index["weight_map"][f"{KV}.weight_scale_inv"]
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=rf"{KV}\.weight.*{_shard_of(folder, KV + '.weight')}.*weight_scale_inv"):
        _load_fp8(folder)
    with pytest.raises(CheckpointError, match=rf"{KV}\.weight"):
        DeepseekV3FP8Converter.from_pretrained(folder, to="bf16").quantize(tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_wrong_scale_grid_names_tensor_and_file(folders, tmp_path):
    folder = _copy(folders / "fp8", tmp_path / "c")
    shard = _shard_of(folder, f"{KV}.weight_scale_inv")
    _rewrite_shard(folder, shard, lambda t: t.__setitem__(f"{KV}.weight_scale_inv", torch.ones(2, 2)))
    with pytest.raises(CheckpointError, match=rf"{KV}\.weight_scale_inv.*{shard}.*\[2, 2\].*\[1, 2\]"):
        _load_fp8(folder)


def test_wrong_tensor_shape_names_tensor_and_file(folders, tmp_path):
    folder = _copy(folders / "bf16", tmp_path / "c")
    key = "model.layers.0.mlp.up_proj.weight"
    shard = _shard_of(folder, key)
    _rewrite_shard(folder, shard, lambda t: t.__setitem__(key, torch.zeros(259, 200, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"{key}.*{shard}.*\[259, 200\].*\[260, 200\]"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_truncated_shard_names_file(folders, tmp_path):
    folder = _copy(folders / "fp8", tmp_path / "c")
    shard = _shard_of(folder, f"{KV}.weight")
    path = folder / shard
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard}.*truncated"):
        _load_fp8(folder)
    path.write_bytes(struct.pack("<Q", 10**6) + b"{")  # header longer than the file: corrupt
    with pytest.raises(CheckpointError, match=rf"{shard}.*(truncated|corrupt)"):
        _load_fp8(folder)
    with pytest.raises(CheckpointError, match=shard):
        DeepseekV3FP8Converter.from_pretrained(folder, to="bf16").quantize(tmp_path / "never", progress=False)


def test_index_naming_missing_shard(folders, tmp_path):
    folder = _copy(folders / "bf16", tmp_path / "c")
    shard = _shard_of(folder, "lm_head.weight")
    os.remove(folder / shard)
    with pytest.raises((CheckpointError, OSError), match=rf"{shard}"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=rf"lm_head\.weight|{shard}"):
        DeepseekV3FP8Converter.from_pretrained(folder).quantize(tmp_path / "never", progress=False)


def test_failed_save_leaves_target_untouched(folders, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(folders / "bf16", dtype=torch.bfloat16)
    target = tmp_path / "target"
    model.save_pretrained(target, max_shard_size=SHARD)
    before = {p: (target / p).read_bytes() for p in os.listdir(target)}
    with pytest.raises(ValueError):
        model.save_pretrained(target, max_shard_size="not-a-size")
    assert {p: (target / p).read_bytes() for p in os.listdir(target)} == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # a successful re-save with fewer shards removes the old shards the new index no longer names
    model.save_pretrained(target)
    assert sorted(p for p in os.listdir(target) if p.endswith(".safetensors")) == ["model.safetensors"]
    assert not (target / "model.safetensors.index.json").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(target) is not None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scale_values_are_named_at_load_and_in_the_converter(folders, tmp_path, bad):
    folder = _copy(folders / "fp8", tmp_path / "c")
    shard = _shard_of(folder, f"{KV}.weight_scale_inv")

    def corrupt(tensors):
        tensors[f"{KV}.weight_scale_inv"][0, 0] = bad

    _rewrite_shard(folder, shard, corrupt)
    with pytest.raises(CheckpointError, match=rf"{KV}\.weight_scale_inv.*not finite and positive"):
        _load_fp8(folder)
    with pytest.raises(CheckpointError, match=rf"{KV}\.weight_scale_inv.*{shard}.*not finite and positive"):
        DeepseekV3FP8Converter.from_pretrained(folder, to="bf16").quantize(tmp_path / "never", progress=False)


def test_index_that_is_not_json_names_the_file(folders, tmp_path):
    folder = _copy(folders / "bf16", tmp_path / "c")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        DeepseekV3FP8Converter.from_pretrained(folder).quantize(tmp_path / "never", progress=False)


def test_integer_typed_weight_is_named(folders, tmp_path):
    folder = _copy(folders / "bf16", tmp_path / "c")
    key = "model.layers.0.mlp.up_proj.weight"
    shard = _shard_of(folder, key)
    _rewrite_shard(folder, shard, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    with pytest.raises(CheckpointError, match=rf"{key}.*{shard}.*I32"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("key", ["model.layers.1.self_attn.o_proj.weight", "model.layers.2.mlp.gate.e_score_correction_bias",
                                 "model.layers.1.mlp.experts.3.down_proj.weight", "model.norm.weight"])
def test_missing_decoder_tensor_is_an_error_unless_allowed(folders, tmp_path, key):
    folder = _copy(folders / "bf16", tmp_path / "c")
    shard = _shard_of(folder, key)
    _rewrite_shard(folder, shard, lambda t: t.pop(key))
    index = json.load(open(folder / "model.safetensors.index.json"))
    del index["weight_map"][key]
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))
    if ".experts." in key:  # an incomplete set of experts cannot be stacked at all: named, no opt-out
        with pytest.raises(CheckpointError, match=rf"no {re.escape(repr(key))}: every one of the 8 routed experts"):
            transformers.AutoModelForCausalLM.from_pretrained(folder, allow_missing_weights=True)
        return
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}.*allow_missing_weights=True"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, allow_missing_weights=True)
    assert isinstance(model, transformers.PreTrainedModel)


def test_heads_missing_from_a_base_checkpoint_keep_transformers_behaviour(tmp_path):
    base = modeling_deepseek_v3.DeepseekV3Model(tiny_config())
    base.save_pretrained(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)  # fresh `score`
    assert model.score.weight.shape == (2, 64)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_a_checkpoint_under_another_model_type_loads_as_deepseek_v3(folders, kind, tmp_path):
    # Kimi K2 is released under model_type "kimi_k2": its per-expert tensors must still be stacked on load (the
    # conversion is keyed by the model type), and FP8 weights keep their scales
    shutil.copytree(folders / kind, tmp_path / kind)
    config = json.loads((tmp_path / kind / "config.json").read_text())
    (tmp_path / kind / "config.json").write_text(json.dumps(config | {"model_type": "kimi_k2"}))
    kwargs = dict(dtype=torch.float32)
    if kind == "fp8":
        kwargs["quantization_config"] = DeepseekV3FP8Config(dequantize=False)
    renamed = DeepseekV3ForCausalLM.from_pretrained(tmp_path / kind, **kwargs).eval()
    original = DeepseekV3ForCausalLM.from_pretrained(folders / kind, **kwargs).eval()
    assert renamed.config.model_type == "deepseek_v3"
    for (name, a), (_, b) in zip(renamed.state_dict().items(), original.state_dict().items()):
        assert torch.equal(raw(a), raw(b)), name


def test_the_released_folder_layout_loads(folders, tmp_path):
    # as the released FP8 folders are laid out: a shard per decoder layer named model-0000k-of-0000NN (six digits for
    # the count), files without safetensors metadata, an index with total_size, the released config.json's extra
    # fields (auto_map, the transformers_version that wrote it, torch_dtype, the legacy YaRN block)
    tensors = read_folder(folders / "fp8")
    layer_of = lambda name: int(name.split(".")[2]) + 1 if name.startswith("model.layers.") else 0  # noqa: E731
    groups = sorted({layer_of(n) for n in tensors})
    released = tmp_path / "released"
    released.mkdir()
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        shard = f"model-{number:05d}-of-{len(groups):06d}.safetensors"
        part = {n: t for n, t in tensors.items() if layer_of(n) == group}
        save_file(part, released / shard)
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (released / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = json.loads((folders / "fp8" / "config.json").read_text())
    rope = {k: v for k, v in config.pop("rope_parameters").items() if k not in ("rope_type", "rope_theta")}
    config.update(rope_scaling=dict(rope, type="yarn"), rope_theta=10000, torch_dtype="bfloat16", transformers_version="4.46.3",
                  auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    config.pop("dtype", None)
    (released / "config.json").write_text(json.dumps(config))

    kwargs = dict(dtype=torch.float32, quantization_config=DeepseekV3FP8Config(dequantize=False))
    ours = transformers.AutoModelForCausalLM.from_pretrained(released, **kwargs).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folders / "fp8", **kwargs).eval()
    assert isinstance(ours.model.layers[1].self_attn.kv_a_proj_with_mqa, FP8Linear)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, reference(ids).logits)
