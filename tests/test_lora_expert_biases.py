"""The routing biases of a LoRA fine-tune travel with the adapter: ``expert_bias.safetensors`` beside it.

A PEFT adapter holds only the adapter weights, while the bias steps move buffers of the base model. Ground truth:
the trained PEFT model itself (its logits and biases), and a run that trains straight through against one resumed
from a checkpoint.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_model, tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, ExpertBiasUpdateCallback, load_expert_biases, save_expert_biases
from modeling_deepseek_v3.lora import prepare_lora_config
from modeling_deepseek_v3.training import EXPERT_BIAS_FILE, routers

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def dataset(n: int = 16):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(1, 97, (n, 12), generator=generator)]


def peft_model(base_folder):
    model = DeepseekV3ForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    # a fast bias step, so that 4 optimizer steps move every bias visibly
    model.config.router_bias_update_speed = 0.05
    return get_peft_model(model, prepare_lora_config(model, LoraConfig(r=2, lora_alpha=4, target_modules=MLA)))


def trainer_for(model, folder, **overrides):
    fields = dict(output_dir=str(folder), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=4,
                  logging_steps=1, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    fields.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**fields), train_dataset=dataset(),
                   callbacks=[ExpertBiasUpdateCallback()])


def biases(model) -> dict[str, torch.Tensor]:
    return {name: router.e_score_correction_bias.clone() for name, router in routers(model).items()}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_bias") / "base"
    build_model(tiny_config(num_hidden_layers=3)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(base_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_bias_run")
    model = peft_model(base_folder)
    trainer = trainer_for(model, out)
    trainer.train()
    trainer.save_model()
    return model.eval(), out


def test_adapter_folder_and_checkpoints_hold_the_moved_biases(trained):
    model, out = trained
    final = load_file(out / EXPERT_BIAS_FILE)
    assert set(final) == {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)}
    for name, router in routers(model.get_base_model()).items():
        assert torch.equal(final[f"{name}.e_score_correction_bias"], router.e_score_correction_bias)
        assert router.e_score_correction_bias.abs().sum() > 0  # the steps moved it
    at_2, at_4 = load_file(out / "checkpoint-2" / EXPERT_BIAS_FILE), load_file(out / "checkpoint-4" / EXPERT_BIAS_FILE)
    assert all(torch.equal(at_4[name], final[name]) for name in final)
    assert not all(torch.equal(at_2[name], final[name]) for name in final)  # the file of each step, not the last


def test_adapter_reloaded_with_its_biases_gives_the_trained_logits(trained, base_folder):
    model, out = trained
    ids = dataset(2)[1]["input_ids"][None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(base_folder, dtype=torch.float32), out).eval()
        without = reloaded(input_ids=ids).logits  # the base model's biases: another routing
        load_expert_biases(reloaded, out)
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)
    assert not torch.allclose(without, expected, atol=1e-4)


def test_resumed_run_reads_the_biases_of_its_checkpoint(trained, base_folder, tmp_path):
    model, out = trained
    resumed = peft_model(base_folder)
    trainer_for(resumed, out, save_strategy="no").train(resume_from_checkpoint=str(out / "checkpoint-2"))
    expected = biases(model.get_base_model())
    assert all(torch.equal(b, expected[name]) for name, b in biases(resumed.get_base_model()).items())


def test_resume_without_the_file_says_so(trained, base_folder, tmp_path, caplog):
    _, out = trained
    elsewhere = tmp_path / "copied"
    import shutil

    shutil.copytree(out / "checkpoint-2", elsewhere / "checkpoint-2")
    (elsewhere / "checkpoint-2" / EXPERT_BIAS_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="modeling_deepseek_v3.training"):
        trainer_for(peft_model(base_folder), elsewhere, save_strategy="no", max_steps=3).train(
            resume_from_checkpoint=str(elsewhere / "checkpoint-2"))
    assert EXPERT_BIAS_FILE in caplog.text and "keep the biases of the base model" in caplog.text


def test_bad_bias_files_are_named(trained, base_folder, tmp_path):
    model, out = trained
    with pytest.raises(FileNotFoundError, match=EXPERT_BIAS_FILE):
        load_expert_biases(model, tmp_path)
    # a file of another config: one more MoE layer
    other = tmp_path / "other"
    save_expert_biases(build_model(tiny_config(num_hidden_layers=4)), other)
    with pytest.raises(ValueError, match=r"unexpected model\.layers\.3\.mlp\.gate\.e_score_correction_bias"):
        load_expert_biases(model, other)
    before = biases(model.get_base_model())
    broken = tmp_path / "broken"
    values = load_file(out / EXPERT_BIAS_FILE)
    values["model.layers.2.mlp.gate.e_score_correction_bias"][0] = float("nan")
    broken.mkdir()
    save_file(values, broken / EXPERT_BIAS_FILE)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.gate\.e_score_correction_bias.*finite"):
        load_expert_biases(model, broken)
    values = load_file(out / EXPERT_BIAS_FILE)
    values["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(3)
    save_file(values, broken / EXPERT_BIAS_FILE)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.gate\.e_score_correction_bias` has shape \[3\]"):
        load_expert_biases(model, broken)
    after = biases(model.get_base_model())
    assert all(torch.equal(after[name], before[name]) for name in before)  # nothing half-loaded
