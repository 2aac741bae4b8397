"""Config fields reach the model the way the docs say, on every route (a fresh config, a from_pretrained override, a
field set on a made config): each either takes effect or is an error naming the field and the value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from conftest import YARN, build_model, tiny_config
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

OFFICIAL = Path(__file__).resolve().parent / "fixtures" / "deepseek_v3_official_config.json"
IDS = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("config_fields")
    build_model(tiny_config()).save_pretrained(root / "noaux_tc")
    build_model(tiny_config(topk_method="greedy")).save_pretrained(root / "greedy")
    return root


def load(folder, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def router_of(model):
    return model.model.layers[1].mlp.gate  # layer 0 is dense


def check_router_scores(router, expected: str) -> None:
    logits = torch.randn(5, router.n_routed_experts, generator=torch.Generator().manual_seed(1))
    want = logits.sigmoid() if expected == "sigmoid" else logits.softmax(dim=-1)
    torch.testing.assert_close(router.scores(logits), want)


# ---------------------------------------------------------------------------------------------------
# from_pretrained overrides go through the config's __init__, like the file's own values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["eager", "batched_mm", "deepseek_fp8"])
def test_experts_backend_override_selects_the_experts_implementation(folders, name):
    model = load(folders / "noaux_tc", experts_backend=name)
    assert (model.config.experts_backend, model.config._experts_implementation) == (name, name)
    # an explicit experts_implementation still wins over the field, as documented
    model = load(folders / "noaux_tc", experts_backend=name, experts_implementation="eager")
    assert model.config._experts_implementation == "eager"


@pytest.mark.filterwarnings("ignore:FP8 kernels need a CUDA GPU")
def test_experts_backend_override_changes_the_computation(folders):
    # deepseek_fp8 runs the experts' GEMMs in FP8: the logits move off the default implementation's, onto its own
    logits = {}
    for name, kwargs in [("default", {}), ("field", dict(experts_backend="deepseek_fp8")),
                         ("keyword", dict(experts_implementation="deepseek_fp8"))]:
        with torch.no_grad():
            logits[name] = load(folders / "noaux_tc", **kwargs).eval()(IDS).logits
    torch.testing.assert_close(logits["field"], logits["keyword"], rtol=0, atol=0)
    assert not torch.allclose(logits["field"], logits["default"])


@pytest.mark.parametrize("folder, expected", [("noaux_tc", "sigmoid"), ("greedy", "softmax")])
def test_scoring_func_none_means_the_routers_own_on_every_route(folders, folder, expected):
    # an override at load
    model = load(folders / folder, scoring_func=None)
    assert model.config.scoring_func == expected
    check_router_scores(router_of(model), expected)
    # a field set back to None on a made config
    config = tiny_config(topk_method=folder, scoring_func="softmax" if expected == "sigmoid" else "sigmoid")
    config.scoring_func = None
    assert config.scoring_func == expected
    check_router_scores(router_of(build_model(config)), expected)
    # the router changed on a made config: unset, the function follows it
    other = "greedy" if folder == "noaux_tc" else "noaux_tc"
    config = tiny_config(topk_method=other)
    config.topk_method = folder
    assert config.scoring_func == expected and config.to_dict()["scoring_func"] == expected
    check_router_scores(router_of(build_model(config)), expected)


def test_an_explicit_scoring_func_is_kept(folders):
    check_router_scores(router_of(load(folders / "noaux_tc", scoring_func="softmax")), "softmax")
    check_router_scores(router_of(build_model(tiny_config(topk_method="greedy", scoring_func="sigmoid"))), "sigmoid")


def test_rope_scaling_none_override_gives_plain_rope(folders, tmp_path):
    model = load(folders / "noaux_tc", rope_scaling=None)
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    with torch.no_grad():
        logits = model(IDS).logits
    # the same weights with plain RoPE written into the file give the same model
    folder = shutil.copytree(folders / "noaux_tc", tmp_path / "plain")
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("rope_scaling")
    saved["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(saved))
    with torch.no_grad():
        torch.testing.assert_close(load(folder)(IDS).logits, logits)


def test_rope_scaling_override_rebuilds_rope_parameters_with_the_files_theta(folders, tmp_path):
    model = load(folders / "noaux_tc", rope_scaling={"type": "linear", "factor": 2.0})
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("linear", 2.0, 10000.0)
    assert "beta_fast" not in rope  # nothing of the file's YaRN block is left behind
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
    # a new theta inside the block, or beside it, is the one used
    assert load(folders / "noaux_tc", rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 300.0}).config.rope_parameters["rope_theta"] == 300.0
    assert load(folders / "noaux_tc", rope_scaling=None, rope_theta=300.0).config.rope_parameters["rope_theta"] == 300.0
    # rope_parameters, the transformers 5 name, replaces the file's blocks the same way
    config = load(folders / "noaux_tc", rope_parameters={"rope_type": "linear", "factor": 3.0}).config
    assert (config.rope_parameters["rope_type"], config.rope_parameters["factor"], config.rope_parameters["rope_theta"]) == ("linear", 3.0, 10000.0)


def test_rope_theta_override_reaches_rope_parameters_and_the_saved_folder(folders, tmp_path):
    model = load(folders / "noaux_tc", rope_theta=500.0)
    rope = model.config.rope_parameters
    assert (rope["rope_type"], rope["rope_theta"], rope["factor"]) == ("yarn", 500.0, 4.0)
    rotary = model.model.rotary_emb
    expected = type(rotary)(tiny_config(rope_theta=500.0)).inv_freq
    torch.testing.assert_close(rotary.inv_freq, expected)
    model.save_pretrained(tmp_path / "saved")
    for cls in (DeepseekV3Config, transformers.DeepseekV3Config):
        assert cls.from_pretrained(tmp_path / "saved").rope_parameters["rope_theta"] == 500.0, cls


def test_rope_theta_override_of_the_released_config_layout(tmp_path):
    # the released file keeps a top-level rope_theta beside a legacy rope_scaling block without one
    (tmp_path / "config.json").write_text(OFFICIAL.read_text())
    rope = transformers.AutoConfig.from_pretrained(tmp_path, rope_theta=50000.0).rope_parameters
    assert (rope["rope_type"], rope["rope_theta"], rope["factor"]) == ("yarn", 50000.0, 40)


def test_other_overrides_still_resolve_and_are_validated(folders):
    config = transformers.AutoConfig.from_pretrained(folders / "noaux_tc", num_key_value_heads=None, num_mtp_layers=0)
    assert (config.num_key_value_heads, config.num_nextn_predict_layers) == (4, 0)
    with pytest.raises(ValueError, match=r"`num_experts_per_tok` \(100\)"):
        load(folders / "noaux_tc", num_experts_per_tok=100)
    # a keyword that is not a config field is still the model's (an unknown one is transformers' TypeError)
    with pytest.raises(TypeError, match="no_such_argument"):
        load(folders / "noaux_tc", no_such_argument=1)


# ---------------------------------------------------------------------------------------------------
# values no model can be built from, named where they enter
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_key_value_heads=2), r"`num_key_value_heads` \(2\) must equal `num_attention_heads` \(4\) for attention_backend 'mla'"),
        (dict(num_key_value_heads=2, attention_backend="mha"), r"`num_key_value_heads` \(2\).*attention_backend 'mha'"),
        (dict(head_dim=16), r"`head_dim` \(16\) must equal `qk_rope_head_dim` \(8\)"),
        (dict(qk_head_dim=32), r"`qk_head_dim` \(32\) must equal `qk_nope_head_dim` \+ `qk_rope_head_dim` \(20\)"),
        (dict(rope_scaling={**YARN, "rope_type": "linear"}), r"entries `type` \('yarn'\) and `rope_type` \('linear'\) disagree"),
        (dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "type": "linear", "factor": 2.0}), r"`type` \('linear'\) and `rope_type` \('yarn'\)"),
        (dict(rope_scaling={**YARN, "beta_fast": 1, "beta_slow": 32}), r"entry `beta_fast` \(1\) must be at least `beta_slow` \(32\) for rope type 'yarn'"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "beta_slow": 40}), r"`beta_fast` \(32\) must be at least `beta_slow` \(40\)"),  # default beta_fast
        (dict(dtype="float8_e4m3fn"), r"`dtype` must be one of float32, bfloat16, float16, float64.*'float8_e4m3fn'.*`quantization_config`"),
        (dict(dtype=torch.float8_e5m2), r"`dtype` must be one of.*float8_e5m2"),
        (dict(quantization_config={}), r"`quantization_config` needs a `quant_method` entry.*got \{\}"),
        (dict(quantization_config={"fmt": "e4m3"}), r"`quantization_config` needs a `quant_method`"),
    ],
)
def test_bad_config_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


@pytest.mark.parametrize("heads, message", [
    (16, r"`num_attention_heads` \(16\) must be a multiple of `num_key_value_heads` \(128\)\. 128 is transformers' default"),
    (256, r"`num_key_value_heads` \(128\) must equal `num_attention_heads` \(256\).*128 is transformers' default for a "
          r"config that does not set `num_key_value_heads`: set it to `num_attention_heads` \(256\)"),
])
def test_a_head_count_beside_the_default_key_value_heads_says_so(heads, message):
    # a config that sets num_attention_heads only gets transformers' 128 key/value heads, not its own head count
    with pytest.raises(ValueError, match=message):
        DeepseekV3Config(num_attention_heads=heads)


def test_values_transformers_derives_the_same_way_are_accepted():
    config = tiny_config(head_dim=8, qk_head_dim=20, num_key_value_heads=None)
    assert (config.head_dim, config.qk_head_dim, config.num_key_value_heads) == (8, 20, 4)
    assert tiny_config(rope_scaling={**YARN, "rope_type": "yarn"}).rope_parameters["rope_type"] == "yarn"
    assert tiny_config(dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_key_value_heads=2), r"`num_key_value_heads` \(2\) must equal `num_attention_heads`"),
        (dict(head_dim=16), r"`head_dim` \(16\)"),
        (dict(dtype=torch.float8_e4m3fn), r"`dtype` must be one of.*float8_e4m3fn.*quantization_config"),
        (dict(rope_scaling={**YARN, "beta_fast": 1, "beta_slow": 32}), r"`beta_fast` \(1\) must be at least `beta_slow` \(32\)"),
    ],
)
def test_bad_from_pretrained_overrides_name_the_field(folders, override, message):
    with pytest.raises(ValueError, match=message):
        load(folders / "noaux_tc", **override)


def test_a_quantization_config_without_quant_method_in_config_json_is_named(folders, tmp_path):
    folder = shutil.copytree(folders / "noaux_tc", tmp_path / "q")
    saved = json.loads((folder / "config.json").read_text())
    saved["quantization_config"] = {}
    (folder / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"`quantization_config` needs a `quant_method` entry"):
        load(folder)


def test_folders_we_save_are_read_by_transformers_class(tmp_path):
    # the configs refused above would save a folder transformers' class cannot build; one it can is unchanged
    build_model(tiny_config(head_dim=8)).save_pretrained(tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, load(tmp_path).eval()(IDS).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# fields set on a made config: checked again when a model is built and when the config is saved
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("routed_scaling_factor", -1.0, r"`routed_scaling_factor` must be a positive finite number, got -1.0"),
        ("num_experts_per_tok", 100, r"`num_experts_per_tok` \(100\) exceeds"),
        ("n_group", 3, r"`n_routed_experts` \(8\) must be divisible by `n_group` \(3\)"),
        ("qk_rope_head_dim", 7, r"`qk_rope_head_dim` must be even.*7"),
        ("first_k_dense_replace", 5, r"`first_k_dense_replace` \(5\) exceeds `num_hidden_layers` \(3\)"),
        ("num_key_value_heads", 2, r"`num_key_value_heads` \(2\) must equal `num_attention_heads` \(4\)"),
        ("topk_method", "sinkhorn", r"Unknown router plugin 'sinkhorn' in config field `topk_method`"),
        ("scoring_func", "tanh", r"`scoring_func` must be one of"),
        ("rope_scaling", None, r"`rope_parameters` must be a dict holding `rope_type` and `rope_theta`.*None"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, r"`rope_parameters` must be a dict holding `rope_type` and `rope_theta`"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 1, "beta_slow": 32}, r"`beta_fast` \(1\)"),
    ],
)
def test_fields_set_on_a_made_config_are_checked_when_the_model_is_built(field, value, message):
    config = tiny_config()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        DeepseekV3ForCausalLM(config)


def test_fields_set_on_a_made_config_are_checked_before_config_json_is_written(tmp_path):
    model = build_model(tiny_config())
    model.config.first_k_dense_replace = 5
    with pytest.raises(ValueError, match=r"`first_k_dense_replace` \(5\) exceeds `num_hidden_layers` \(3\)"):
        model.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "config.json").exists()
    config = tiny_config()
    config.routed_scaling_factor = 0.0
    with pytest.raises(ValueError, match=r"`routed_scaling_factor`"):
        config.save_pretrained(tmp_path / "config")
    assert not (tmp_path / "config" / "config.json").exists()


def test_transformers_config_is_refused_with_the_conversion(folders):
    theirs = transformers.DeepseekV3Config.from_pretrained(folders / "noaux_tc")
    assert type(theirs) is transformers.DeepseekV3Config
    message = r"need a modeling_deepseek_v3\.DeepseekV3Config, got transformers\..*DeepseekV3Config.*DeepseekV3Config\.from_dict\(config\.to_dict\(\)\)"
    with pytest.raises(TypeError, match=message):
        DeepseekV3ForCausalLM(theirs)
    with pytest.raises(TypeError, match=message):
        DeepseekV3ForCausalLM.from_pretrained(folders / "noaux_tc", config=theirs)
    # the conversion the message gives loads the folder
    ours = DeepseekV3Config.from_dict(theirs.to_dict())
    model = DeepseekV3ForCausalLM.from_pretrained(folders / "noaux_tc", config=ours)
    assert model.config.rope_parameters == load(folders / "noaux_tc").config.rope_parameters


def test_a_folder_of_another_architecture_is_named(tmp_path):
    transformers.LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has model_type 'llama' and none of the DeepSeek-V3 fields .*not a DeepSeek-V3 checkpoint"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    kimi = tiny_config().to_dict() | {"model_type": "kimi_k2"}  # a DeepSeek-V3 under another name still reads
    (tmp_path / "config.json").write_text(json.dumps(kimi))
    assert DeepseekV3Config.from_pretrained(tmp_path).kv_lora_rank == 16



@pytest.mark.parametrize("model_type, config_class", [("deepseek_v32", "DeepseekV32Config"), ("glm4_moe_lite", "Glm4MoeLiteConfig")])
def test_a_relative_transformers_implements_itself_is_named(tmp_path, model_type, config_class):
    # MLA and MoE fields, but an architecture of its own (an indexer, other weights): not loaded as DeepSeek-V3
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict() | {"model_type": model_type}))
    with pytest.raises(ValueError, match=rf"model_type '{model_type}', which transformers implements as another "
                                         rf"architecture \(its config class: {config_class}\).*set its `\"model_type\"` to \"deepseek_v3\""):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
