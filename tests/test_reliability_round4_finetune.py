"""Fine-tuning and FP8 inputs that PEFT, TRL or torch would take silently or reject without naming them: LoRA
targets and options, FP8 dtypes and frozen storage, merging broken adapters, TRL references and reward functions."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
from conftest import build_model, tiny_config
from peft import LoraConfig, get_peft_model

from modeling_deepseek_v3 import ExpertBiasUpdateCallback
from modeling_deepseek_v3.lora import merge_and_unload, prepare_lora_config
from modeling_deepseek_v3.quantization import FP8BlockQuantizer, FP8Linear, dequantize_state_dict
from modeling_deepseek_v3.quantization.experts import FP8Experts

IDS = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(4))


def model(**fields):
    return build_model(tiny_config(num_hidden_layers=2, **fields))


def fp8_model():
    return model(quantizer="fp8_block", fp8_mode="inference")


def adapted(peft_model) -> set[str]:
    """The names (in the base model) of the modules carrying a LoRA adapter."""
    return {name.removeprefix("base_model.model.").rpartition(".lora_A")[0]
            for name, _ in peft_model.named_modules() if name.endswith("lora_A")}


# --- target_modules="all-linear" --------------------------------------------------------------------------------


def test_all_linear_adapts_the_dense_and_shared_expert_mlps():
    # PEFT rewrites target modules named gate_proj/up_proj/down_proj into the routed experts' parameters for
    # DeepSeek-V3, which left the dense MLP of layer 0 and the shared experts without adapters
    base = model()
    config = prepare_lora_config(base, LoraConfig(r=2, target_modules="all-linear"))
    peft_model = get_peft_model(base, config)
    names = adapted(peft_model)
    for projection in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.{projection}" in names, names
        assert f"model.layers.1.mlp.shared_experts.{projection}" in names, names
    assert "model.layers.1.self_attn.q_a_proj" in names and "model.layers.1.mlp.experts" in names
    assert "lm_head" not in names
    # the dense adapters train
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.normal_(0, 0.1)
    peft_model.train()
    peft_model(input_ids=IDS, labels=IDS).loss.backward()
    dense = [p for n, p in peft_model.named_parameters() if "layers.0.mlp.gate_proj" in n and "lora_A" in n]
    assert dense and dense[0].grad is not None and dense[0].grad.abs().sum() > 0


def test_all_linear_over_fp8_mlps_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'all-linear': model\.layers\.0\.mlp\.(gate|up|down)_proj is stored in FP8"):
        prepare_lora_config(fp8_model(), LoraConfig(r=2, target_modules="all-linear"))


# --- target modules LoRA cannot adapt ---------------------------------------------------------------------------


@pytest.mark.parametrize("targets, message", [
    (r".*mlp\.experts", r"reaches model\.layers\.1\.mlp\.experts, the routed experts module.*target_parameters="),
    (r".*input_layernorm", r"reaches model\.layers\.0\.input_layernorm \(DeepseekV3RMSNorm\), which LoRA cannot adapt"),
    (["mlp"], r"'mlp' reaches model\.layers\.0\.mlp \(DeepseekV3MLP\), which LoRA cannot adapt"),
    (["self_attn"], r"'self_attn' reaches model\.layers\.0\.self_attn \(MultiHeadLatentAttention\)"),
])
def test_target_modules_that_reach_no_linear_layer_are_named(targets, message):
    base = model()
    with pytest.raises(ValueError, match=message) as error:
        prepare_lora_config(base, LoraConfig(r=2, target_modules=targets))
    assert len(str(error.value)) < 600  # not the module's repr (PEFT printed whole decoder layers)


@pytest.mark.parametrize("target, message", [
    ("self_attn.q_a_proj.weight", r"'model\.layers\.0\.self_attn\.q_a_proj\.weight' is stored in FP8 \(FP8Linear\)"),
    ("self_attn.o_proj.weight_scale_inv", r"'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv' is stored in FP8"),
])
def test_target_parameters_stored_in_fp8_are_refused(target, message):
    # PEFT's parameter LoRA would add its update to the e4m3 bytes, ignoring their block scales
    with pytest.raises(ValueError, match=message):
        prepare_lora_config(fp8_model(), LoraConfig(r=2, target_modules=[], target_parameters=[target]))


def test_target_parameters_that_are_not_matrices_or_names_are_named():
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.input_layernorm\.weight' has shape \[64\]: LoRA adapts a matrix"):
        prepare_lora_config(model(), LoraConfig(r=2, target_modules=[], target_parameters=["input_layernorm.weight"]))
    with pytest.raises(ValueError, match=r"'\.\*gate_up_proj' matches no parameter .* names, not regular expressions"):
        prepare_lora_config(model(), LoraConfig(r=2, target_modules=[], target_parameters=[".*gate_up_proj"]))


# --- options that would change nothing --------------------------------------------------------------------------


@pytest.mark.parametrize("options, field", [
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(alpha_pattern={"q_a_proj": 0}), r"alpha_pattern\['q_a_proj'\]"),
])
def test_zero_alpha_is_refused(options, field):
    # scaling alpha/r = 0: the adapters add nothing and get no gradient (the trainer reported grad_norm 0)
    with pytest.raises(ValueError, match=rf"LoRA `{field}` is 0: .*training would change nothing"):
        prepare_lora_config(model(), LoraConfig(r=2, target_modules=["q_a_proj"], **options))


@pytest.mark.parametrize("options, message", [
    (dict(rank_pattern={"q_typo": 4}), r"`rank_pattern` key 'q_typo' matches no module or parameter"),
    (dict(alpha_pattern={"o_prj": 4}), r"`alpha_pattern` key 'o_prj' matches no module or parameter"),
    (dict(rank_pattern={"q_a_proj(": 4}), r"`rank_pattern` key 'q_a_proj\(' is not a valid regular expression"),
    (dict(modules_to_save=["lm_haed"]), r"`modules_to_save` entry 'lm_haed' matches no module"),
])
def test_patterns_and_modules_to_save_that_match_nothing_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        prepare_lora_config(model(), LoraConfig(r=2, target_modules=["q_a_proj"], **options))


def test_patterns_and_modules_to_save_that_match_stay_allowed():
    base = model()
    config = prepare_lora_config(base, LoraConfig(r=2, target_modules=["q_a_proj", "o_proj"], rank_pattern={"o_proj": 4},
                                                  alpha_pattern={r"layers\.0\..*q_a_proj": 16}, modules_to_save=["lm_head"]))
    peft_model = get_peft_model(base, config)
    assert peft_model.base_model.model.model.layers[1].self_attn.o_proj.r["default"] == 4


# --- FP8 dtypes and frozen storage ------------------------------------------------------------------------------


def test_dequantize_dtypes_are_checked_where_given():
    linear = FP8Linear.from_linear(torch.nn.Linear(256, 128))
    with pytest.raises(ValueError, match=r"`dtype` must be a floating-point torch.dtype .* got torch.int32"):
        linear.dequantize(torch.int32)  # failed inside nn.Parameter ("Only Tensors of floating point ...")
    experts = FP8Experts.from_experts(model().model.layers[1].mlp.experts)
    with pytest.raises(ValueError, match=r"got torch.float8_e4m3fn"):
        experts.dequantize(torch.float8_e4m3fn)  # built experts of FP8 bytes without their scales
    quantized = fp8_model()
    with pytest.raises(ValueError, match=r"got torch.int8"):
        FP8BlockQuantizer.dequantize(quantized, torch.int8)
    assert any(isinstance(m, FP8Linear) for m in quantized.modules())  # refused before any layer was swapped
    with pytest.raises(ValueError, match=r"got 'bfloat16'"):
        dequantize_state_dict({}, "bfloat16")


def test_fp8_storage_set_to_require_grad_is_refused_in_a_training_forward():
    quantized = fp8_model().requires_grad_(True)
    with torch.no_grad():  # inference never trains: allowed
        quantized(IDS)
    quantized.train()
    with pytest.raises(ValueError, match=r"FP8Linear\.weight requires grad, but weights stored in FP8 are frozen"):
        quantized(input_ids=IDS, labels=IDS)
    for module in quantized.modules():  # the attention projections are fixed: the experts are named too
        if isinstance(module, FP8Linear):
            module.requires_grad_(False)
    with pytest.raises(ValueError, match=r"FP8Experts\.gate_up_proj requires grad"):
        quantized(input_ids=IDS, labels=IDS)


@pytest.mark.parametrize("fp8", ["requantize", "dequantize"])
def test_merging_a_non_finite_adapter_names_the_layer(fp8):
    peft_model = get_peft_model(base := fp8_model(), prepare_lora_config(base, LoraConfig(r=2, target_modules=["o_proj"])))
    layer = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = math.inf
    # the dense route wrote inf into the merged model; the FP8 one named only "`merged weight`"
    with pytest.raises(ValueError, match=r"NaN or inf in the merged weights of model\.layers\.1\.self_attn\.o_proj "
                                         r"\(adapter\(s\) \['default'\]\)"):
        merge_and_unload(peft_model, fp8=fp8, dtype=torch.float32)


# --- the bias callback ------------------------------------------------------------------------------------------


def test_log_per_layer_must_be_a_bool():
    with pytest.raises(TypeError, match=r"`log_per_layer` must be True or False, got 'no'"):
        ExpertBiasUpdateCallback(log_per_layer="no")


# --- TRL --------------------------------------------------------------------------------------------------------


def test_a_peft_dpo_reference_is_named(tmp_path):
    pytest.importorskip("trl")
    from test_finetune_trl import common, dataset, policy
    from transformers import ByT5Tokenizer
    from trl import DPOConfig

    from modeling_deepseek_v3.trl_trainers import DeepseekV3DPOTrainer

    reference = get_peft_model(base := policy(), prepare_lora_config(base, LoraConfig(r=2, target_modules=["q_a_proj"])))
    with pytest.raises(TypeError, match=r"`ref_model` is a PeftModel: pass its merged weights"):
        DeepseekV3DPOTrainer(policy(), ref_model=reference, args=DPOConfig(**common(tmp_path)),
                             train_dataset=dataset("dpo", 4), processing_class=ByT5Tokenizer())


def test_a_dpo_reference_in_training_mode_counts_nothing(tmp_path):
    pytest.importorskip("trl")
    from test_finetune_trl import common, dataset, policy
    from transformers import ByT5Tokenizer
    from trl import DPOConfig

    from modeling_deepseek_v3.training import routers
    from modeling_deepseek_v3.trl_trainers import DeepseekV3DPOTrainer

    reference = policy().train()
    trainer = DeepseekV3DPOTrainer(policy(), ref_model=reference, args=DPOConfig(**common(tmp_path, max_steps=1), max_length=64),
                                   train_dataset=dataset("dpo", 4), processing_class=ByT5Tokenizer())
    assert not reference.training
    trainer.train()
    assert all(router.tokens_per_expert.sum() == 0 for router in routers(reference).values())


@pytest.mark.parametrize("returned, message", [
    (1.0, r"returned float 1.0; it must return a list of 4 rewards"),
    ("1111", r"returned str '1111'; it must return a list"),
    ({"reward": 1.0}, r"returned dict .*; it must return a list"),
    (torch.ones(4, 2), r"returned a tensor of shape \[4, 2\]; it must return one reward per completion \(4\)"),
    (["1"] * 4, r"returned '1' \(str\) for completion 0; a reward is a real number or None"),
    ([0.0, math.inf, 0.0, 0.0], r"returned inf for completion 1: an infinite reward makes the advantages"),
    ([0.0, 0.0, -math.inf, 0.0], r"returned -inf for completion 2"),
    ([1.0, 0.0, 1.0], r"returned 3 rewards for 4 completions; it must return one per completion"),
])
def test_bad_reward_returns_are_named(returned, message):
    from modeling_deepseek_v3.trl_trainers import _checked_reward

    def correctness(completions, **kwargs):
        return returned

    checked = _checked_reward(correctness, "correctness")
    assert checked.__name__ == "correctness"  # TRL logs rewards under the function's name
    with pytest.raises(ValueError, match=rf"The reward function 'correctness' {message}"):
        checked(prompts=["p"] * 4, completions=["c"] * 4, completion_ids=[[1]] * 4)


@pytest.mark.parametrize("returned", [[1.0, None, math.nan, 0], [True, False, True, False], numpy.ones(4),
                                      torch.ones(4), [torch.tensor(1.0)] * 4])
def test_good_reward_returns_pass_unchanged(returned):
    from modeling_deepseek_v3.trl_trainers import _checked_reward

    checked = _checked_reward(lambda completions, **kwargs: returned, "r")
    assert checked(prompts=["p"] * 4, completions=["c"] * 4) is returned


def test_grpo_checks_what_its_reward_functions_return(tmp_path):
    pytest.importorskip("trl")
    from test_finetune_trl import common, dataset, lora, policy
    from transformers import ByT5Tokenizer
    from trl import GRPOConfig

    from modeling_deepseek_v3.trl_trainers import DeepseekV3GRPOTrainer

    def exact(completions, **kwargs):
        return [math.inf] * len(completions)

    args = GRPOConfig(**common(tmp_path, max_steps=1), num_generations=4, max_completion_length=2, beta=0.0)
    trainer = DeepseekV3GRPOTrainer(policy(), reward_funcs=exact, args=args, train_dataset=dataset("grpo", 4),
                                    processing_class=ByT5Tokenizer(), peft_config=lora(experts=False))
    with pytest.raises(ValueError, match=r"The reward function 'exact' returned inf for completion 0"):
        trainer.train()
