"""Inputs written by the rest of the ecosystem that our loading and saving must take as transformers' class does:
transformers' Trainer resuming from our checkpoints (one shard at a time), state dicts in the official layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import load_sharded_checkpoint

from conftest import build_model, tiny_config

EXPERTS = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model with MTP, saved in shards small enough that one layer's experts span several of them."""
    folder = tmp_path_factory.mktemp("interop") / "sharded"
    model = build_model(tiny_config(num_nextn_predict_layers=1), seed=1)
    model.save_pretrained(folder, max_shard_size="60KB")
    return model, folder


def test_trainer_resumes_from_a_sharded_checkpoint_shard_by_shard(trained):
    # transformers' Trainer resumes from a sharded checkpoint with load_sharded_checkpoint, which hands the model one
    # shard at a time to load_state_dict(strict=False): a shard holds part of a layer's experts (all gate_proj rows,
    # or experts 0-4), so the per-expert tensors of a shard must load into their rows of the stacked tensors
    model, folder = trained
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards_of_layer = {weight_map[f"{EXPERTS}.{e}.{p}_proj.weight"] for e in range(8) for p in ("gate", "up", "down")}
    assert len(shards_of_layer) > 1  # the case at hand
    resumed = build_model(tiny_config(num_nextn_predict_layers=1), seed=2)
    load_sharded_checkpoint(resumed, folder, strict=False)
    expected = model.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_a_state_dict_holding_some_experts_loads_them_and_names_the_others(trained):
    model, folder = trained
    saved = {}
    for shard in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(shard))
    part = {k: v for k, v in saved.items() if k.startswith(f"{EXPERTS}.3.") or k.startswith(f"{EXPERTS}.6.up_proj")}
    resumed = build_model(tiny_config(num_nextn_predict_layers=1), seed=2)
    before = resumed.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    result = resumed.load_state_dict(part, strict=False)
    gate_up = resumed.model.layers[1].mlp.experts.gate_up_proj
    inter = gate_up.shape[1] // 2
    assert torch.equal(gate_up[3], model.model.layers[1].mlp.experts.gate_up_proj[3])
    assert torch.equal(gate_up[6, inter:], saved[f"{EXPERTS}.6.up_proj.weight"])
    assert torch.equal(gate_up[6, :inter], before[6, :inter]) and torch.equal(gate_up[0], before[0])
    assert f"{EXPERTS}.6.gate_proj.weight" in result.missing_keys and f"{EXPERTS}.0.down_proj.weight" in result.missing_keys
    assert f"{EXPERTS}.3.gate_proj.weight" not in result.missing_keys and not result.unexpected_keys


def test_a_saved_file_loads_strictly_with_its_mtp_copies(tmp_path):
    # every save writes the MTP layer's copies of the embedding and head (vLLM and SGLang read them there), which are
    # not parameters: `model.load_state_dict(load_file(...))`, strict by default, refused them as unexpected keys
    model = build_model(tiny_config(num_nextn_predict_layers=1), seed=1)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.layers.3.embed_tokens.weight" in saved and "model.layers.3.shared_head.head.weight" in saved
    resumed = build_model(tiny_config(num_nextn_predict_layers=1), seed=2)
    result = resumed.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    expected = model.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
