"""TRL's SFT, DPO, GRPO and reward trainers on DeepSeek-V3 (modeling_deepseek_v3.trl_trainers), a few steps on the tiny
shipped data: the model's balance loss is in the optimised loss, every optimizer step moves each router bias by ±γ
from the loads of the policy's training forwards only (reference, old-policy and generation forwards count nothing),
MaxVio is logged; bad references are named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, tiny_config
from peft import LoraConfig
from transformers import AutoModelForCausalLM, ByT5Tokenizer
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from modeling_deepseek_v3 import DeepseekV3FP8Config, DeepseekV3ForCausalLM, ExpertBiasUpdateCallback
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter
from modeling_deepseek_v3.plugins.routing.topk_router import TopKRouter, in_backward_pass
from modeling_deepseek_v3.training import routers
from modeling_deepseek_v3.trl_trainers import (
    DeepseekV3DPOTrainer,
    DeepseekV3GRPOTrainer,
    DeepseekV3SFTTrainer,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
GAMMA = 0.01
TOP_K = 3
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def rows(name: str, count: int) -> list[dict]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle][:count]


def dataset(name: str, count: int = 8):
    from datasets import Dataset

    return Dataset.from_list(rows(name, count))


def policy() -> DeepseekV3ForCausalLM:
    """The conftest tiny model with the byte tokenizer's 384 ids, a visible balance loss and a large γ."""
    config = tiny_config(vocab_size=384, pad_token_id=0, eos_token_id=1, num_hidden_layers=2,
                         aux_loss_alpha=0.01, router_bias_update_speed=GAMMA)
    model = build_model(config).train()
    for router in routers(model).values():
        router.e_score_correction_bias.zero_()
    return model


def common(tmp_path, **overrides) -> dict:
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                  learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    fields.update(overrides)
    return fields


class BiasSteps(ExpertBiasUpdateCallback):
    """The bias update, recording per optimizer step the routers' loads and their biases before and after."""

    def __init__(self):
        super().__init__()
        self.steps, self.tokens = [], 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        found = routers(model)
        loads = {n: r.tokens_per_expert.sum().item() for n, r in found.items()}
        before = {n: r.e_score_correction_bias.clone() for n, r in found.items()}
        control = super().on_step_end(args, state, control, model=model, **kwargs)
        after = {n: r.e_score_correction_bias.clone() for n, r in found.items()}
        self.steps.append((self.tokens, loads, before, after))
        self.tokens = 0
        return control


def recording(trainer_class, real_tokens):
    """``trainer_class`` that adds up the real tokens of the batches its training loss is computed on."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training and torch.is_grad_enabled():
                self.bias_steps.tokens += int(real_tokens(inputs))
            return super().compute_loss(model, inputs, *args, **kwargs)

    return Recording


def check_bias_steps(trainer, callback, steps: int) -> None:
    assert len(callback.steps) == steps
    for tokens, loads, before, after in callback.steps:
        assert tokens > 0
        for name in loads:
            # every real token of the policy's training forwards was routed to K experts, nothing else was counted
            assert loads[name] == tokens * TOP_K, name
            step = after[name] - before[name]
            moved = step != 0
            assert moved.any(), name
            assert torch.allclose(step[moved].abs(), torch.full_like(step[moved], GAMMA)), name
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == steps and all("max_vio_mean" in entry and "balance_loss" in entry for entry in logged)


def balance_loss_of(model, input_ids, attention_mask) -> torch.Tensor:
    """The backbone's own balance loss on these tokens in training mode (the ground truth the trainers add); the
    routers' token counts are left as they were."""
    backbone = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    counts = {name: router._tokens_per_expert for name, router in routers(model).items()}
    with torch.enable_grad():
        loss = backbone(input_ids=input_ids, attention_mask=attention_mask).aux_loss
    for name, router in routers(model).items():
        router._tokens_per_expert = counts[name]
    return loss.detach()


def reset_counts(model) -> None:
    for router in routers(model).values():
        router.reset_counts()


def lora(experts: bool = True) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=list(MLA),
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts else None)


def test_sft_optimises_the_balance_loss_and_steps_the_bias(tmp_path):
    model = policy()
    trainer_class = recording(DeepseekV3SFTTrainer, lambda inputs: inputs["attention_mask"].sum())
    callback = BiasSteps()
    args = SFTConfig(**common(tmp_path, gradient_accumulation_steps=2), max_length=64)
    trainer = trainer_class(model, args=args, train_dataset=dataset("sft"), processing_class=ByT5Tokenizer(),
                            peft_config=lora(), callbacks=[callback])
    trainer.bias_steps = callback
    assert sum(isinstance(cb, ExpertBiasUpdateCallback) for cb in trainer.callback_handler.callbacks) == 1

    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    ours = DeepseekV3SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    trl_loss = SFTTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    balance = balance_loss_of(trainer.model, inputs["input_ids"], inputs["attention_mask"])
    assert balance > 0 and torch.allclose(ours.detach() - trl_loss.detach(), balance, rtol=1e-4, atol=1e-7)
    reset_counts(trainer.model)  # the two losses above were training forwards too

    trainer.train()
    check_bias_steps(trainer, callback, steps=2)


def test_sft_over_a_kept_fp8_base(tmp_path):
    policy().save_pretrained(tmp_path / "fp32")
    DeepseekV3FP8Converter.from_pretrained(tmp_path / "fp32").quantize(tmp_path / "fp8", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=DeepseekV3FP8Config(dequantize=False),
                                                 dtype=torch.float32)
    fp8 = [(p, p.detach().view(torch.uint8).clone()) for p in model.parameters() if p.dtype == torch.float8_e4m3fn]
    callback = BiasSteps()
    trainer = recording(DeepseekV3SFTTrainer, lambda inputs: inputs["attention_mask"].sum())(
        model, args=SFTConfig(**common(tmp_path, max_steps=1), max_length=48), train_dataset=dataset("sft", 4),
        processing_class=ByT5Tokenizer(), peft_config=lora(experts=False), callbacks=[callback])
    trainer.bias_steps = callback
    trainer.train()
    check_bias_steps(trainer, callback, steps=1)
    assert fp8 and all(torch.equal(p.detach().view(torch.uint8), before) for p, before in fp8)


def dpo_tokens(inputs):
    return inputs["attention_mask"].sum()


def test_dpo_with_the_adapter_disabled_reference(tmp_path, monkeypatch):
    balance_calls = []
    original = TopKRouter.balance_loss
    def spy(self, *args, **kwargs):
        if not in_backward_pass():  # TRL's DPO checkpoints activations: the recomputation runs the router again
            balance_calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TopKRouter, "balance_loss", spy)
    model = policy()
    callback = BiasSteps()
    trainer = recording(DeepseekV3DPOTrainer, dpo_tokens)(
        model, args=DPOConfig(**common(tmp_path), max_length=64), train_dataset=dataset("dpo"),
        processing_class=ByT5Tokenizer(), peft_config=lora(), callbacks=[callback])
    trainer.bias_steps = callback
    assert trainer.ref_model is None  # the reference is the policy with its adapters disabled

    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    ours = DeepseekV3DPOTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    trl_loss = DPOTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    balance = balance_loss_of(trainer.model, inputs["input_ids"], inputs["attention_mask"])
    assert torch.allclose(ours.detach() - trl_loss.detach(), balance, rtol=1e-4, atol=1e-7)
    reset_counts(trainer.model)

    balance_calls.clear()
    trainer.train()
    check_bias_steps(trainer, callback, steps=2)
    # the reference forwards computed no balance loss: one per MoE layer per training forward, all with autograd
    assert balance_calls and all(balance_calls) and len(balance_calls) == 2 * 1


def test_dpo_reference_reloaded_from_the_saved_folder(tmp_path):
    policy().save_pretrained(tmp_path / "start")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "start", dtype=torch.float32)
    callback = BiasSteps()
    trainer = recording(DeepseekV3DPOTrainer, dpo_tokens)(
        model, args=DPOConfig(**common(tmp_path, max_steps=1), max_length=64), train_dataset=dataset("dpo", 4),
        processing_class=ByT5Tokenizer(), callbacks=[callback])
    trainer.bias_steps = callback
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert isinstance(reference, DeepseekV3ForCausalLM) and not reference.training
    trainer.train()
    check_bias_steps(trainer, callback, steps=1)
    assert all(r.tokens_per_expert.sum() == 0 for r in routers(reference).values())


def test_grpo_generation_and_scoring_count_nothing(tmp_path):
    def reward(completions, answer, **kwargs):
        return [1.0 if text.startswith(right) else float(text[:1].isdigit()) / 4 for text, right in zip(completions, answer)]

    class Checked(recording(DeepseekV3GRPOTrainer, lambda inputs: inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())):
        differences = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            if not self.differences:  # first training loss: ours minus TRL's is the backbone's balance loss
                with torch.no_grad():  # a forward without autograd runs as inference: nothing counted
                    trl_loss = GRPOTrainer.compute_loss(self, model, inputs)
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
                mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
                with self.accelerator.autocast():  # as GRPO scores the tokens (bf16 autocast by default)
                    self.differences.append((trl_loss, balance_loss_of(model, ids, mask)))
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if len(self.differences) == 1:
                self.differences.append(loss.detach())
            return loss

    callback = BiasSteps()
    args = GRPOConfig(**common(tmp_path), num_generations=4, max_completion_length=4, beta=0.0)
    trainer = Checked(policy(), reward_funcs=reward, args=args, train_dataset=dataset("grpo"),
                      processing_class=ByT5Tokenizer(), peft_config=lora(experts=False), callbacks=[callback])
    trainer.bias_steps = callback
    trainer.train()
    check_bias_steps(trainer, callback, steps=2)
    (trl_loss, balance), ours = trainer.differences
    assert balance > 0 and torch.allclose((ours - trl_loss).float(), balance.float(), rtol=1e-3, atol=1e-6)


def test_dpo_reference_of_another_architecture_is_named(tmp_path):
    other = build_model(tiny_config(vocab_size=384, num_hidden_layers=2, hidden_size=32))
    with pytest.raises(ValueError, match="config field `hidden_size`: policy 64, reference 32"):
        DeepseekV3DPOTrainer(policy(), ref_model=other, args=DPOConfig(**common(tmp_path)),
                             train_dataset=dataset("dpo", 4), processing_class=ByT5Tokenizer())


def test_dpo_without_any_reference_is_named(tmp_path):
    with pytest.raises(ValueError, match="No reference model.*`ref_model="):
        DeepseekV3DPOTrainer(policy(), args=DPOConfig(**common(tmp_path)), train_dataset=dataset("dpo", 4),
                             processing_class=ByT5Tokenizer())


def test_trls_mixtral_balance_term_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`router_aux_loss_coef`=0.5"):
        DeepseekV3SFTTrainer(policy(), args=SFTConfig(**common(tmp_path), router_aux_loss_coef=0.5),
                             train_dataset=dataset("sft", 4), processing_class=ByT5Tokenizer(), peft_config=lora())


def test_grpo_with_a_rebuilt_reference_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`beta`=0.1 and no adapters"):
        DeepseekV3GRPOTrainer(policy(), reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
                              args=GRPOConfig(**common(tmp_path), num_generations=4, beta=0.1),
                              train_dataset=dataset("grpo", 4), processing_class=ByT5Tokenizer())


@pytest.mark.slow
def test_two_process_sft_keeps_the_biases_identical(tmp_path):
    """2 data-parallel processes (torchrun, gloo): every bias update uses both ranks' tokens and leaves the same biases
    on both."""
    worker = Path(__file__).resolve().parent / "_finetune_dp_worker.py"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker), str(tmp_path)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for (tokens0, local0, _, after0, load0), (tokens1, local1, _, after1, load1) in zip(*ranks):
        for name in after0:
            assert local0[name] == tokens0 * TOP_K and local1[name] == tokens1 * TOP_K, name  # each rank's own
            assert load0[name].sum() == load1[name].sum() == (tokens0 + tokens1) * TOP_K, name  # summed over both
            assert torch.equal(after0[name], after1[name]), name
    for step in range(2):
        for name, bias in ranks[0][step][3].items():
            moved = bias - ranks[0][step][2][name]
            assert moved.any() and torch.allclose(moved[moved != 0].abs(), torch.full_like(moved[moved != 0], GAMMA))


def test_reward_trainer_optimises_the_balance_loss_and_steps_the_bias(tmp_path):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from modeling_deepseek_v3 import DeepseekV3ForSequenceClassification
    from modeling_deepseek_v3.trl_trainers import DeepseekV3RewardTrainer

    policy().save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1).train()
    assert isinstance(model, DeepseekV3ForSequenceClassification)
    callback = BiasSteps()
    trainer_class = recording(DeepseekV3RewardTrainer, lambda inputs: inputs["attention_mask"].sum())
    args = RewardConfig(**common(tmp_path), max_length=256)
    trainer = trainer_class(model, args=args, train_dataset=dataset("dpo"), processing_class=ByT5Tokenizer(),
                            callbacks=[callback])
    trainer.bias_steps = callback

    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ours = DeepseekV3RewardTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    trl_loss = RewardTrainer.compute_loss(trainer, trainer.model, dict(inputs))
    balance = balance_loss_of(trainer.model, inputs["input_ids"], inputs["attention_mask"])
    assert balance > 0 and torch.allclose(ours.detach() - trl_loss.detach(), balance, rtol=1e-4, atol=1e-7)
    reset_counts(trainer.model)

    trainer.train()
    check_bias_steps(trainer, callback, steps=2)
