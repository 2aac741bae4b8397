"""Configs and checkpoints as a careful transformers user hands them around: transformers' own DeepseekV3 classes on
the same folders, the config API, state-dict round trips (stacked and per-expert names, meta-device assignment),
from_pretrained overrides, and the config.json fields serving engines read."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import build_model, edit_tensors, tiny_config
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.checkpoint import CheckpointError

OFFICIAL = os.path.join(os.path.dirname(__file__), "fixtures", "deepseek_v3_official_config.json")


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module, skip: str | None = None):
    got, want = actual.state_dict(), expected.state_dict()
    names = [name for name in want if skip is None or not name.startswith(skip)]
    assert names and set(names) <= set(got)
    for name in names:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("interop7") / "mtp"
    model = build_model(tiny_config(num_nextn_predict_layers=1), seed=3)
    model.save_pretrained(folder)
    return model, folder


# ---------------------------------------------------------------------------------------------------------------
# state dicts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["official", "stacked"])
def test_a_state_dict_assigned_to_a_model_built_on_the_meta_device(mtp_model, layout):
    # `with torch.device("meta"): model = ...; model.load_state_dict(sd, assign=True)` is PyTorch's way to load without
    # a first random init. With the official per-expert names the experts module's hook merged them into a clone of
    # its meta tensors, so the experts stayed on meta behind "All keys matched successfully"
    model, folder = mtp_model
    state_dict = saved_tensors(folder) if layout == "official" else model.state_dict()
    with torch.device("meta"):
        empty = DeepseekV3ForCausalLM(model.config)
    result = empty.load_state_dict(dict(state_dict), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not [name for name, p in empty.named_parameters() if p.is_meta]
    gate_up = empty.model.layers[1].mlp.experts.gate_up_proj
    assert isinstance(gate_up, torch.nn.Parameter) and gate_up.requires_grad
    assert_same_weights(empty, model)


def test_a_meta_model_given_some_experts_of_a_projection_names_the_first_it_lacks(mtp_model):
    model, folder = mtp_model
    part = {k: v for k, v in saved_tensors(folder).items() if k != "model.layers.1.mlp.experts.5.up_proj.weight"}
    with torch.device("meta"):
        empty = DeepseekV3ForCausalLM(model.config)
    with pytest.raises(CheckpointError, match=r"no 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight'.*meta device"):
        empty.load_state_dict(part, strict=False, assign=True)
    # a stacked tensor no entry names stays on meta and is reported missing, as torch leaves any other one
    no_gate_up = {k: v for k, v in saved_tensors(folder).items() if not k.endswith(("gate_proj.weight", "up_proj.weight"))
                  or ".mlp.experts." not in k}
    with torch.device("meta"):
        empty = DeepseekV3ForCausalLM(model.config)
    result = empty.load_state_dict(no_gate_up, strict=False, assign=True)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in result.missing_keys
    assert empty.model.layers[1].mlp.experts.gate_up_proj.is_meta
    assert not empty.model.layers[1].mlp.experts.down_proj.is_meta


def test_an_assigned_state_dict_gives_the_experts_its_dtype_as_every_other_tensor(tmp_path):
    # assign=True keeps the state dict's tensors (dtype included): the per-expert entries were merged into the
    # module's own fp32 tensors, so a bf16 checkpoint left the experts alone in fp32
    build_model(tiny_config(), seed=3).to(torch.bfloat16).save_pretrained(tmp_path)
    model = build_model(tiny_config(), seed=4)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True, assign=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[1].mlp.experts.gate_up_proj.requires_grad
    # without assign the model keeps its dtype, experts included
    model = build_model(tiny_config(), seed=4)
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_state_dict_round_trips_are_strict_and_bit_exact_in_both_names(mtp_model):
    model, folder = mtp_model
    for state_dict in (model.state_dict(), saved_tensors(folder)):
        fresh = build_model(model.config, seed=11)
        result = fresh.load_state_dict(dict(state_dict), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert_same_weights(fresh, model)
    assert_same_weights(copy.deepcopy(model), model)
    rebuilt = DeepseekV3ForCausalLM.from_pretrained(None, config=model.config, state_dict=saved_tensors(folder))
    assert_same_weights(rebuilt, model)


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained overrides
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(n_routed_experts=16), dict(n_routed_experts=4, n_group=1, topk_group=1)])
def test_another_expert_count_with_ignore_mismatched_sizes_reinitialises_as_transformers(mtp_model, overrides):
    # transformers' class re-initialises the stacked experts and the router of another size and reports them; ours
    # refused the per-expert checkpoint as an incomplete (or surplus) set of experts even with ignore_mismatched_sizes
    model, folder = mtp_model
    ours, info = DeepseekV3ForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, output_loading_info=True, **overrides)
    theirs, their_info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, ignore_mismatched_sizes=True, output_loading_info=True, dtype=torch.float32, **overrides)
    mismatched = {key for key, *_ in info["mismatched_keys"]}
    mtp = {key for key in mismatched if key.startswith("model.layers.3.")}  # transformers' class builds no MTP module
    assert mtp and mismatched - mtp == {key for key, *_ in their_info["mismatched_keys"]}
    assert "model.layers.1.mlp.experts.gate_up_proj" in mismatched and "model.layers.2.mlp.gate.weight" in mismatched
    assert ours.model.layers[1].mlp.experts.gate_up_proj.shape[0] == overrides["n_routed_experts"]
    kept = {k: v for k, v in model.state_dict().items() if ".mlp.experts." not in k and ".mlp.gate." not in k}
    loaded = ours.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in kept.items())
    # without the flag the count is still named
    with pytest.raises(CheckpointError, match=r"holds 8 routed experts for .*`n_routed_experts` is \d+; `ignore_mismatched_sizes=True` re-initialises"):
        DeepseekV3ForCausalLM.from_pretrained(folder, **overrides)


def test_ignore_mismatched_sizes_still_names_a_hole_in_the_experts(mtp_model, tmp_path):
    model, _ = mtp_model
    folder = tmp_path / "hole"
    model.save_pretrained(folder)
    edit_tensors(folder / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.experts.5.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"no 'model\.layers\.2\.mlp\.experts\.5\.down_proj\.weight'"):
        DeepseekV3ForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, n_routed_experts=16)


# ---------------------------------------------------------------------------------------------------------------
# folders written by transformers' own class, and read by it
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtp, tied", [(0, False), (1, False), (0, True), (1, True)])
def test_sharded_folders_pass_bit_exact_between_transformers_class_and_ours(tmp_path, mtp, tied):
    model = build_model(tiny_config(num_nextn_predict_layers=mtp, tie_word_embeddings=tied), seed=3)
    model.save_pretrained(tmp_path / "ours", max_shard_size="100KB")
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "theirs", max_shard_size="100KB")
    ours_on_disk, theirs_on_disk = saved_tensors(tmp_path / "ours"), saved_tensors(tmp_path / "theirs")
    # the same names (per expert) and bytes, but the MTP layer, which transformers' class does not build
    mtp_keys = {k for k in ours_on_disk if k.startswith("model.layers.3.")}
    assert bool(mtp_keys) == bool(mtp) and set(ours_on_disk) - mtp_keys == set(theirs_on_disk)
    for name, tensor in theirs_on_disk.items():
        assert tensor.dtype == ours_on_disk[name].dtype and torch.equal(tensor, ours_on_disk[name]), name
    if mtp:  # the MTP layer's copies of the (tied) embedding and head
        assert torch.equal(ours_on_disk["model.layers.3.shared_head.head.weight"], model.lm_head.weight)
        assert torch.equal(ours_on_disk["model.layers.3.embed_tokens.weight"], model.model.embed_tokens.weight)
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "theirs", num_nextn_predict_layers=0)
    assert_same_weights(back, model, skip="model.layers.3.")
    assert (back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()) == tied


def test_folders_with_stacked_expert_names_load_both_ways(mtp_model, tmp_path):
    # save_original_format=False writes transformers' in-memory names (mlp.experts.gate_up_proj)
    model, folder = mtp_model
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs.save_pretrained(tmp_path / "theirs", save_original_format=False, max_shard_size="60KB")
    assert "model.layers.1.mlp.experts.gate_up_proj" in saved_tensors(tmp_path / "theirs")
    assert_same_weights(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "theirs", num_nextn_predict_layers=0), theirs)
    model.save_pretrained(tmp_path / "ours", save_original_format=False)
    assert "model.layers.1.mlp.experts.gate_up_proj" in saved_tensors(tmp_path / "ours")
    assert_same_weights(transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32), theirs)
    assert_same_weights(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours"), model)


def test_save_stays_safetensors_and_a_variant_reloads(mtp_model, tmp_path):
    model, _ = mtp_model
    model.save_pretrained(tmp_path / "unsafe", safe_serialization=False)
    names = sorted(os.listdir(tmp_path / "unsafe"))
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    model.save_pretrained(tmp_path / "variant", variant="v1", push_to_hub=False)
    assert (tmp_path / "variant" / "model.v1.safetensors").exists()
    assert_same_weights(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "variant", variant="v1"), model)


# ---------------------------------------------------------------------------------------------------------------
# config API and config.json
# ---------------------------------------------------------------------------------------------------------------


def test_config_api_round_trips(tmp_path):
    config = tiny_config(num_nextn_predict_layers=1, experts_backend="eager", mla_mode="absorbed")
    assert copy.deepcopy(config) == config and "DeepseekV3Config" in repr(config)
    again, unused = DeepseekV3Config.from_dict(config.to_dict(), return_unused_kwargs=True, not_a_field=1, aux_loss_alpha=0.5)
    assert unused == {"not_a_field": 1} and again.aux_loss_alpha == 0.5 and again.mla_mode == "absorbed"
    assert {k: v for k, v in again.to_dict().items() if k != "aux_loss_alpha"} == {
        k: v for k, v in config.to_dict().items() if k != "aux_loss_alpha"}
    config.save_pretrained(tmp_path / "a")
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "a")
    assert type(loaded) is DeepseekV3Config and loaded._experts_implementation == "eager"
    loaded.save_pretrained(tmp_path / "b")
    assert DeepseekV3Config.from_pretrained(tmp_path / "b") == loaded  # a loaded config reloads equal
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()
    diff = json.loads(config.to_json_string(use_diff=True))
    assert diff["scoring_func"] == "sigmoid" and diff["mla_mode"] == "absorbed"
    loaded.update({"mla_mode": "expanded", "topk_method": "greedy"})
    assert loaded.mla_mode == "expanded" and loaded.scoring_func == "sigmoid"  # the file's, written explicitly
    assert type(transformers.AutoModelForCausalLM.from_config(loaded)) is DeepseekV3ForCausalLM
    assert type(transformers.AutoModel.from_config(loaded)).__name__ == "DeepseekV3Model"


# the fields vLLM and SGLang read from a DeepSeek-V3 config.json
ENGINE_FIELDS = (
    "architectures", "model_type", "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace",
    "moe_layer_freq", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "topk_method",
    "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func", "num_nextn_predict_layers",
    "num_experts_per_tok", "quantization_config", "tie_word_embeddings", "max_position_embeddings", "vocab_size",
)


def test_released_config_json_keeps_what_serving_engines_read(tmp_path):
    released = json.loads(open(OFFICIAL).read())
    (tmp_path / "released").mkdir()
    (tmp_path / "released" / "config.json").write_text(json.dumps(released))
    DeepseekV3Config.from_pretrained(tmp_path / "released").save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    for field in ENGINE_FIELDS:
        assert saved[field] == released[field] and type(saved[field]) is type(released[field]), field
    legacy = saved["rope_scaling"]
    assert {k: v for k, v in legacy.items() if k != "rope_theta"} == released["rope_scaling"]
    assert type(legacy["factor"]) is int and legacy["type"] == "yarn"
    assert saved["dtype"] == released["torch_dtype"]


def test_a_saved_model_writes_the_engine_fields_with_the_released_types(tmp_path):
    released = json.loads(open(OFFICIAL).read())
    small = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                 qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3,
                 first_k_dense_replace=1, max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
    fields = {k: v for k, v in released.items() if k not in ("quantization_config", "auto_map")} | small
    fields["rope_scaling"] = dict(released["rope_scaling"], original_max_position_embeddings=32)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(fields))
    build_model(DeepseekV3Config.from_pretrained(tmp_path / "src")).save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    for field in ENGINE_FIELDS:
        if field != "quantization_config":
            expected = fields[field]
            assert saved[field] == expected and type(saved[field]) is type(expected), field
    assert "quantization_config" not in saved
    theirs = transformers.AutoConfig.for_model(**{k: v for k, v in saved.items() if k != "model_type"}, model_type="deepseek_v3")
    assert theirs.rope_parameters["rope_type"] == "yarn" and theirs.rope_parameters["factor"] == 40


# ---------------------------------------------------------------------------------------------------------------
# from_pretrained keywords and the generation side files, against transformers' class
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_runtime_overrides_of_from_pretrained_match_transformers_class(mtp_model):
    _, folder = mtp_model
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_router_logits=True, attn_implementation="eager").eval()
    ours = DeepseekV3ForCausalLM.from_pretrained(folder, output_router_logits=True, attn_implementation="eager").eval()
    assert ours.config._attn_implementation == "eager" and ours.config.output_router_logits
    mine, reference = ours(ids, labels=ids), theirs(ids, labels=ids)
    assert len(mine.router_logits) == len(reference.router_logits) == 2
    for a, b in zip(mine.router_logits, reference.router_logits):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(mine.logits, reference.logits)
    torch.testing.assert_close(mine.loss, reference.loss)
    absorbed = DeepseekV3ForCausalLM.from_pretrained(folder, mla_mode="absorbed").eval()
    assert absorbed.config.mla_mode == "absorbed"
    torch.testing.assert_close(absorbed(ids).logits, reference.logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"`mla_mode` must be one of"):
        DeepseekV3ForCausalLM.from_pretrained(folder, mla_mode="fast")


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_the_dtype_a_config_json_declares_is_the_default_as_in_transformers_class(tmp_path, key):
    build_model(tiny_config(), seed=3).to(torch.bfloat16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype")
    config[key] = "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert ours.dtype == transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert ours.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ours.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"


@torch.no_grad()
def test_generation_config_json_is_read_used_and_written_back(tmp_path):
    model = build_model(tiny_config(bos_token_id=1, eos_token_id=2), seed=3)
    model.save_pretrained(tmp_path)
    assert model.can_generate() and json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    written = {"bos_token_id": 1, "eos_token_id": [2, 5], "max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.3}
    (tmp_path / "generation_config.json").write_text(json.dumps(written))
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.name_or_path == os.fspath(tmp_path)
    assert ours.generation_config.max_new_tokens == 6 and ours.generation_config.eos_token_id == [2, 5]
    ids = torch.tensor([[1, 7, 8, 9]])
    assert torch.equal(ours.generate(ids), theirs.generate(ids))
    ours.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "generation_config.json").read_text())
    assert {k: again[k] for k in written} == written
