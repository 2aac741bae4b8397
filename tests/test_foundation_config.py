"""Config: the released config.json loads unchanged; plugin fields; validation errors name the field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import transformers
from conftest import tiny_config

from modeling_deepseek_v3 import DeepseekV3Config

# The released DeepSeek-V3 config.json, verbatim.
OFFICIAL = Path(__file__).resolve().parent / "fixtures" / "deepseek_v3_official_config.json"


@pytest.fixture
def official_dict():
    return json.loads(OFFICIAL.read_text())


def test_official_config_loads_unchanged(official_dict, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(official_dict))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, DeepseekV3Config)
    for field in ("hidden_size", "num_hidden_layers", "n_routed_experts", "n_group", "topk_group", "kv_lora_rank",
                  "q_lora_rank", "topk_method", "scoring_func", "num_nextn_predict_layers", "routed_scaling_factor",
                  "auto_map", "first_k_dense_replace", "moe_layer_freq", "ep_size"):
        assert getattr(config, field) == official_dict[field], field
    quantization = config.quantization_config
    quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else quantization
    assert official_dict["quantization_config"].items() <= quantization.items()
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40 and rope["rope_theta"] == 10000
    assert rope["original_max_position_embeddings"] == 4096 and rope["mscale_all_dim"] == 1.0
    # The paper's choices are what the official file selects.
    assert (config.attention_backend, config.topk_method, config.quantizer) == ("mla", "noaux_tc", None)


def test_official_softmax_scale_has_yarn_mscale(official_dict):
    from modeling_deepseek_v3.layers import yarn_softmax_scale

    config = DeepseekV3Config(**official_dict)
    expected = 192**-0.5 * (0.1 * 1.0 * math.log(40) + 1) ** 2
    assert yarn_softmax_scale(config, 192) == pytest.approx(expected, rel=1e-12)


def test_transformers5_rope_parameters_load():
    config = tiny_config(rope_scaling=None, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0,
                                                              "original_max_position_embeddings": 64, "mscale_all_dim": 1.0})
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["rope_theta"] == 5000.0


@pytest.mark.parametrize("rope", [
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale_all_dim": 1.0},
    {"rope_type": "default"},
], ids=["yarn", "default"])
def test_a_non_default_rope_theta_survives_save_and_reload(rope, tmp_path):
    # Kimi K2 and Moonlight use theta 50000 with YaRN; transformers reads the legacy `rope_scaling` block we also
    # write, so it carries the theta (ours and transformers' class read it back)
    blocks = {"rope_scaling": None, "rope_parameters": rope} if "rope_type" in rope else {"rope_scaling": rope}
    tiny_config(**blocks, rope_theta=50000.0).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in saved  # beside rope_scaling it would break transformers' generic reader (below)
    for cls in (DeepseekV3Config, transformers.DeepseekV3Config):
        assert cls.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 50000.0, cls
    # what the Trainer's resume reads the checkpoint's config.json with
    transformers.PreTrainedConfig.from_json_file(tmp_path / "config.json")


def test_a_rope_block_reused_for_a_second_config_is_not_changed():
    # transformers writes rope_theta and rope_type into the dict it is handed; ours copies it first
    rope = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    tiny_config(rope_scaling=rope, rope_theta=500.0)
    assert rope == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert tiny_config(rope_scaling=rope, rope_theta=20000.0).rope_parameters["rope_theta"] == 20000.0


def test_two_different_rope_thetas_are_an_error():
    with pytest.raises(ValueError, match=r"`rope_theta` \(20000.0\) differs from the `rope_theta` entry of `rope_parameters` \(500.0\)"):
        tiny_config(rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rope_theta=20000.0)


def test_config_round_trip_keeps_plugin_fields(tmp_path):
    config = tiny_config(attention_backend="mha", topk_method="greedy", mla_mode="absorbed", router_bias_update_speed=0.01)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["attention_backend"] == "mha" and saved["topk_method"] == "greedy" and saved["model_type"] == "deepseek_v3"
    again = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (again.attention_backend, again.topk_method, again.mla_mode, again.router_bias_update_speed) == ("mha", "greedy", "absorbed", 0.01)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(attention_backend="flash_mla_v9"), "attention_backend"),
        (dict(topk_method="sinkhorn"), "topk_method"),
        (dict(experts_backend="nope"), "experts_backend"),
        (dict(quantizer="int3"), "quantizer"),
        (dict(mtp_backend="parallel"), "mtp_backend"),
    ],
)
def test_unknown_plugin_names_list_registered(overrides, field):
    with pytest.raises(ValueError, match=rf"`{field}`.*registered"):
        tiny_config(**overrides)


def test_unknown_attention_backend_lists_names():
    with pytest.raises(ValueError) as error:
        tiny_config(attention_backend="flash_mla_v9")
    assert "'mla'" in str(error.value) and "'mha'" in str(error.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
        (dict(topk_group=3, n_group=2), "topk_group"),
        (dict(num_experts_per_tok=5, n_group=2, topk_group=1), "num_experts_per_tok"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_hidden_layers=-1), "num_hidden_layers"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(n_routed_experts=8, n_group=8, topk_group=2, num_experts_per_tok=2), "n_group"),
        (dict(router_bias_update_speed=-0.001), "router_bias_update_speed"),
        (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"),
        (dict(mtp_loss_weight=-0.3), "mtp_loss_weight"),
        (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"`{field}`"):
        tiny_config(**overrides)


def test_greedy_router_does_not_need_groups():
    config = tiny_config(topk_method="greedy", n_group=8, topk_group=8, num_experts_per_tok=2)
    assert config.topk_method == "greedy"


@pytest.mark.parametrize("overrides, message", [
    (dict(seq_aux="yes"), r"`seq_aux` must be true or false, got 'yes'"),
    (dict(seq_aux=False), r"`seq_aux` \(false\) asks for a batch-wise balance loss, but router `topk_method`='noaux_tc' computes a sequence-wise one"),
    (dict(seq_aux=True, topk_method="greedy"), r"`seq_aux` \(true\) asks for a sequence-wise balance loss, but router `topk_method`='greedy'"),
])
def test_seq_aux_that_disagrees_with_the_router_is_an_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_seq_aux_that_agrees_with_the_router_is_accepted():
    assert tiny_config(seq_aux=True).seq_aux is True
    assert tiny_config(seq_aux=False, topk_method="greedy").seq_aux is False


# The released config.json fields of DeepSeek-V3 and of two checkpoints of the same architecture: Kimi K2 (under its own
# model_type, theta 50000, YaRN with equal betas, 384 experts in one group) and Moonlight-16B-A3B (no q-LoRA, plain
# RoPE at theta 50000, 64 experts).
RELEASED = {
    "deepseek-v3": OFFICIAL,
    "kimi-k2": OFFICIAL.parent / "kimi_k2_config.json",
    "moonlight-16b-a3b": OFFICIAL.parent / "moonlight_16b_a3b_config.json",
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_build_transformers_layout(name, tmp_path):
    import torch

    from modeling_deepseek_v3 import DeepseekV3ForCausalLM

    released = json.loads(RELEASED[name].read_text())
    (tmp_path / "config.json").write_text(json.dumps(released))
    config = DeepseekV3Config.from_pretrained(tmp_path)
    theirs_config = transformers.DeepseekV3Config.from_pretrained(tmp_path)
    assert config.rope_parameters == theirs_config.rope_parameters
    with torch.device("meta"):
        ours = DeepseekV3ForCausalLM(config)
        theirs = transformers.DeepseekV3ForCausalLM(theirs_config)
    ours_shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    theirs_shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    # every tensor of transformers' class, of the same shape; ours adds only the MTP layers after the decoder stack
    # (Moonlight's file has no num_nextn_predict_layers: 1 by default, as in transformers' and DeepSeek's configs)
    assert {n: ours_shapes.get(n) for n in theirs_shapes} == theirs_shapes
    extra_layers = {int(n.split(".")[2]) for n in set(ours_shapes) - set(theirs_shapes)}
    depth = released.get("num_nextn_predict_layers", 1)
    assert config.num_nextn_predict_layers == depth
    assert extra_layers == set(range(released["num_hidden_layers"], released["num_hidden_layers"] + depth))
