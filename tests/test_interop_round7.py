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
