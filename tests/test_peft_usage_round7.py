"""PEFT used as its documentation describes, on this model: layer selection of target parameters, initialisations,
PEFT methods other than LoRA, AutoPeftModel, adapters on the MTP modules and decoding through a PEFT model. Ground
truth: PEFT's documented meaning of each option (the same options on target modules), the PEFT model itself before
a save, and plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

from modeling_deepseek_v3 import DeepseekV3ForCausalLM  # noqa: E402
from modeling_deepseek_v3.lora import prepare_lora_config  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
IDS = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(3))


def adapted(peft_model) -> set[str]:
    """The names (in the base model) of the modules carrying a LoRA adapter, parameter wrappers read as their module."""
    return {name.removeprefix("base_model.model.").rpartition(".lora_A")[0].removesuffix(".base_layer")
            for name, _ in peft_model.named_modules() if name.endswith("lora_A")}


@pytest.fixture(scope="module")
def mtp_folder(tmp_path_factory):
    """Three decoder layers (layer 0 dense) and one MTP module (layer 3)."""
    folder = tmp_path_factory.mktemp("peft_round7") / "base"
    build_model(tiny_config(num_hidden_layers=3, num_nextn_predict_layers=1)).save_pretrained(folder)
    return folder


def load(folder) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 0
    return model


# --- layers_to_transform and exclude_modules reach target_parameters ----------------------------------------------


def test_layers_to_transform_selects_the_layers_of_the_expert_parameters(mtp_folder, tmp_path):
    # PEFT applies layers_to_transform to target modules only: the stacked experts of every MoE layer and of the MTP
    # module got adapters, while q_a_proj was adapted in layer 1 alone
    model = load(mtp_folder)
    config = prepare_lora_config(model, LoraConfig(r=2, target_modules=["q_a_proj"], target_parameters=EXPERTS,
                                                   layers_to_transform=[1]))
    peft_model = get_peft_model(model, config)
    assert adapted(peft_model) == {"model.layers.1.self_attn.q_a_proj", "model.layers.1.mlp.experts"}
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(mtp_folder), tmp_path / "adapter")
    assert adapted(reloaded) == adapted(peft_model)
    # the saved config, prepared again, selects the same parameters
    again = prepare_lora_config(load(mtp_folder), LoraConfig.from_pretrained(tmp_path / "adapter"))
    assert sorted(again.target_parameters) == ["model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj"]
    # layers_pattern is read as PEFT reads it for modules
    model = load(mtp_folder)
    config = LoraConfig(r=2, target_modules=["q_a_proj"], target_parameters=EXPERTS, layers_to_transform=[2, 3],
                        layers_pattern="layers")
    assert adapted(get_peft_model(model, prepare_lora_config(model, config))) == {
        f"model.layers.{i}.{name}" for i in (2, 3) for name in ("self_attn.q_a_proj", "mlp.experts")}


def test_exclude_modules_keeps_all_linear_off_the_excluded_mlps_and_experts(mtp_folder):
    # "all-linear" adapts the dense and shared-expert MLPs and the stacked experts as target parameters, which PEFT's
    # exclude_modules did not reach: layer 0's dense MLP kept its adapters
    model = load(mtp_folder)
    config = LoraConfig(r=2, target_modules="all-linear", exclude_modules=r".*layers\.0\..*")
    names = adapted(get_peft_model(model, prepare_lora_config(model, config)))
    assert not any(name.startswith("model.layers.0.") for name in names), sorted(names)
    assert {"model.layers.1.mlp.experts", "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.3.eh_proj"} <= names
    model = load(mtp_folder)
    config = LoraConfig(r=2, target_modules="all-linear", exclude_modules=["experts", "down_proj"])
    names = adapted(get_peft_model(model, prepare_lora_config(model, config)))
    assert not any(name.endswith((".experts", "down_proj")) for name in names), sorted(names)
    assert {"model.layers.0.mlp.gate_proj", "model.layers.2.mlp.shared_experts.up_proj"} <= names


def test_a_layer_selection_that_leaves_no_target_parameter_is_named(mtp_folder):
    # layer 0 is dense: it has no routed experts
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] leave out every parameter.*layers\.1\.mlp\.experts"):
        prepare_lora_config(load(mtp_folder), LoraConfig(r=2, target_parameters=EXPERTS, layers_to_transform=[0]))


# --- initialisations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "orthogonal"])
def test_initialisations_that_read_the_weight_are_refused_on_the_stacked_experts(mtp_folder, init):
    # PEFT failed with "'DeepseekV3Experts' object has no attribute 'weight'" (for transformers' class too)
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*'model\.layers\.1\.mlp\.experts\.down_proj'"):
        prepare_lora_config(load(mtp_folder), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=init))


def test_pissa_over_all_linear_without_the_experts_starts_at_the_base(mtp_folder):
    model = load(mtp_folder)
    with torch.no_grad():
        base = model(IDS).logits
    config = LoraConfig(r=2, target_modules="all-linear", exclude_modules=["experts"], init_lora_weights="pissa_niter_2")
    peft_model = get_peft_model(model, prepare_lora_config(model, config))
    assert "model.layers.0.mlp.gate_proj" in adapted(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, base, atol=1e-5, rtol=0)  # PiSSA moves W into the adapter


# --- other PEFT methods -----------------------------------------------------------------------------------------


def test_prefix_tuning_is_refused_by_name_and_prompt_tuning_decodes_without_mtp(mtp_folder):
    # PEFT's prefix tuning builds per-head keys and values; MLA caches the latent and the rotary key, and the refusal
    # said only "a model of another config"
    peft_model = get_peft_model(load(mtp_folder), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="prefix tuning does not apply"):
        peft_model(IDS)
    peft_model = get_peft_model(load(mtp_folder), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    out = peft_model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False)
    ids = IDS[:1]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, peft_model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[:, -ids.shape[1]:], ids)
    # MTP speculative decoding would verify drafts through PEFT's step inputs, which keep one token of each
    # verification step once the virtual tokens are cached: the output silently differed from the greedy one
    for options in (dict(), dict(cache_implementation="static")):
        with pytest.raises(ValueError, match=r"`use_mtp=True` does not run under PEFT's prompt learning \(PROMPT_TUNING\)"):
            peft_model.generate(input_ids=IDS[:1], max_new_tokens=4, do_sample=False, use_mtp=True, **options)


# --- AutoPeftModel, MTP adapters, decoding ----------------------------------------------------------------------


def test_mtp_adapters_train_through_the_mtp_loss_reload_and_decode(mtp_folder, tmp_path):
    model = load(mtp_folder)
    config = prepare_lora_config(model, LoraConfig(r=2, target_modules=["q_a_proj", "kv_b_proj", "eh_proj"],
                                                   target_parameters=EXPERTS, task_type="CAUSAL_LM",
                                                   init_lora_weights=False))
    peft_model = get_peft_model(model, config)
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).mtp_loss.backward()
    grads = {name: param.grad for name, param in peft_model.named_parameters() if "layers.3." in name and param.requires_grad}
    assert any("eh_proj" in name for name in grads) and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=IDS, labels=IDS, return_mtp_loss=True)
    peft_model.save_pretrained(tmp_path / "adapter")

    # AutoPeftModelForCausalLM goes through AutoModelForCausalLM (task_type CAUSAL_LM): our class, the same MTP loss
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    assert type(auto.get_base_model()) is DeepseekV3ForCausalLM
    with torch.no_grad():
        got = auto(input_ids=IDS, labels=IDS, return_mtp_loss=True)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.mtp_loss, expected.mtp_loss)

    # greedy decoding through the PEFT model: the same tokens with the static cache and MTP speculative decoding
    prompt = IDS[:1]
    reference = peft_model.generate(prompt, max_new_tokens=6, do_sample=False)
    for options in (dict(cache_implementation="static"), dict(use_mtp=True),
                    dict(use_mtp=True, cache_implementation="static")):
        assert torch.equal(peft_model.generate(prompt, max_new_tokens=6, do_sample=False, **options), reference), options


def test_oft_on_the_mla_projections_trains_and_merges_into_what_transformers_reads(mtp_folder, tmp_path):
    # kv_b_proj got the latent as [B, 1, S, r], which PEFT's OFT reshapes as a Conv2d input ("shape '[272, 4, 4]' is
    # invalid for input of size 0"; transformers' class fails the same way)
    import transformers

    model = load(mtp_folder)
    config = peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_a_proj", "kv_b_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "oft_R" in name:
                param.normal_(0, 0.2)  # a rotation away from the identity the default initialisation gives
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    kv_b = [p for n, p in peft_model.named_parameters() if "kv_b_proj.oft_R" in n]
    assert kv_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in kv_b)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(IDS).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(peft_model(IDS).logits, expected, atol=1e-3)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=1e-5)
