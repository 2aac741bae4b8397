"""Ordinary transformers / PEFT / TRL use that was refused or went silently wrong: each test is the valid call, and
what it must give (transformers' own class on the same weights, or what PEFT and TRL document)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from modeling_deepseek_v3.lora import prepare_lora_config  # noqa: E402

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def ids_batch(batch=2, length=7, seed=3):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_a_second_adapter_is_checked_against_the_model_under_the_first():
    # prepare_lora_config takes the PeftModel, whose layers PEFT has already wrapped: the second adapter's targets
    # (the same projections, the stacked experts, the head in modules_to_save) were refused as "not Linear layers"
    # or matched no parameter
    model = build_model(tiny_config(num_hidden_layers=2))
    ids = ids_batch()
    with torch.no_grad():
        base = model(ids).logits
    first = LoraConfig(r=4, target_modules=["q_a_proj", "o_proj"], target_parameters=EXPERTS, modules_to_save=["lm_head"],
                       init_lora_weights=False)
    peft_model = get_peft_model(model, prepare_lora_config(model, first), adapter_name="first")
    second = LoraConfig(r=2, target_modules=["o_proj", "kv_b_proj"], target_parameters=EXPERTS,
                        modules_to_save=["lm_head"], rank_pattern={"o_proj": 3}, init_lora_weights=False)
    peft_model.add_adapter("second", prepare_lora_config(peft_model, second))
    third = LoraConfig(r=2, target_modules=r".*\.q_a_proj", target_parameters=EXPERTS)
    peft_model.add_adapter("third", prepare_lora_config(peft_model, third))
    with torch.no_grad():
        with_first = peft_model(ids).logits
        peft_model.set_adapter("second")
        with_second = peft_model(ids).logits
        with peft_model.disable_adapter():
            without = peft_model(ids).logits
    assert not torch.allclose(with_first, with_second)
    torch.testing.assert_close(without, base)
    # names are still checked, against the model as it is without adapters (an adapter's own modules are no target)
    for target in ("o_projj", "first"):
        with pytest.raises(ValueError, match=f"'{target}' matches no module"):
            prepare_lora_config(peft_model, LoraConfig(r=2, target_modules=[target]))


@pytest.mark.parametrize("task_type", ["SEQ_CLS", peft.TaskType.TOKEN_CLS])
def test_a_classification_adapter_reloads_through_prepare_lora_config(tmp_path, task_type):
    # PEFT's task model adds its head names ("classifier", "score") to the saved config's modules_to_save; our head
    # is `score`, and "classifier", which matches nothing, failed the documented reload path
    import transformers

    build_model(tiny_config(num_hidden_layers=2)).save_pretrained(tmp_path / "base")
    auto = (transformers.AutoModelForSequenceClassification if task_type == "SEQ_CLS"
            else transformers.AutoModelForTokenClassification)
    model = auto.from_pretrained(tmp_path / "base", num_labels=2)
    config = prepare_lora_config(model, LoraConfig(r=4, target_modules=["q_a_proj"], task_type=task_type,
                                                   init_lora_weights=False))
    peft_model = get_peft_model(model, config).eval()
    with torch.no_grad():
        peft_model.base_model.model.score.original_module.weight.normal_()  # not the fresh head of a reload
        peft_model.base_model.model.score.modules_to_save["default"].weight.normal_()
        expected = peft_model(ids_batch()).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert "classifier" in LoraConfig.from_pretrained(tmp_path / "adapter").modules_to_save

    base = auto.from_pretrained(tmp_path / "base", num_labels=2)
    saved = prepare_lora_config(base, LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", config=saved).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids_batch()).logits, expected)
    # an entry of the user's that matches nothing is still named
    with pytest.raises(ValueError, match="'scores' matches no module"):
        prepare_lora_config(base, LoraConfig(r=4, target_modules=["q_a_proj"], task_type=task_type, modules_to_save=["scores"]))


def test_trainer_evaluate_reports_the_loss_of_transformers_class(tmp_path):
    # Trainer takes every forward parameter named like a label for one the batch must carry: with `shift_labels` a
    # named parameter, an eval batch with `labels` alone had "no labels", and evaluate() reported no eval_loss
    import transformers
    from transformers import Trainer, TrainingArguments

    model = build_model(tiny_config(num_hidden_layers=2))
    theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config.from_dict(model.config.to_dict()))
    theirs.load_state_dict(model.state_dict())
    ids = ids_batch(batch=4)
    rows = [{"input_ids": row, "labels": row} for row in ids]
    losses = []
    for each in (model, theirs):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True,
                                 disable_tqdm=True)
        losses.append(Trainer(model=each.eval(), args=args, eval_dataset=rows).evaluate().get("eval_loss"))
    assert losses[0] is not None
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_trl_trainers_load_a_policy_given_by_its_path_with_this_class(tmp_path):
    # TRL loads a path with the transformers class that config.architectures names (transformers' own
    # DeepseekV3ForCausalLM): the trainers then failed with "holds no DeepseekV3Model", or with the path's DPO
    # reference, ran transformers' class
    from pathlib import Path

    from datasets import Dataset
    from transformers import ByT5Tokenizer
    from trl import DPOConfig, SFTConfig

    from modeling_deepseek_v3 import DeepseekV3ForCausalLM
    from modeling_deepseek_v3.trl_trainers import DeepseekV3DPOTrainer, DeepseekV3SFTTrainer

    config = tiny_config(vocab_size=384, pad_token_id=0, eos_token_id=1, num_hidden_layers=2)
    build_model(config).save_pretrained(tmp_path / "start")
    data = Path(__file__).resolve().parents[1] / "examples" / "data"
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                  use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=48)

    sft_rows = Dataset.from_json(str(data / "sft.jsonl")).select(range(2))
    sft = DeepseekV3SFTTrainer(str(tmp_path / "start"), SFTConfig(**common, model_init_kwargs={"dtype": "bfloat16"}),
                               train_dataset=sft_rows, processing_class=ByT5Tokenizer(),
                               peft_config=LoraConfig(r=2, target_modules=["q_a_proj"]))
    policy = sft.model.get_base_model()
    assert isinstance(policy, DeepseekV3ForCausalLM) and policy.dtype == torch.bfloat16  # model_init_kwargs applied
    sft.train()

    dpo_rows = Dataset.from_json(str(data / "dpo.jsonl")).select(range(2))
    dpo = DeepseekV3DPOTrainer(str(tmp_path / "start"), args=DPOConfig(**common), train_dataset=dpo_rows,
                               processing_class=ByT5Tokenizer())
    assert isinstance(dpo.model, DeepseekV3ForCausalLM)
    assert isinstance(dpo.accelerator.unwrap_model(dpo.ref_model), DeepseekV3ForCausalLM)
    dpo.train()


@pytest.mark.parametrize("options", [dict(), dict(num_beams=2)], ids=["greedy", "beam search"])
def test_generate_with_stop_strings_gives_transformers_tokens(tmp_path, options):
    # generate(stop_strings=..., tokenizer=...) leaves the tokenizer in the model inputs of every step: the forward's
    # keyword check refused it
    import transformers

    build_model(tiny_config(vocab_size=384, num_hidden_layers=2)).save_pretrained(tmp_path)
    tokenizer = transformers.ByT5Tokenizer()
    prompt = torch.randint(3, 200, (2, 5), generator=torch.Generator().manual_seed(3))
    outputs = []
    for cls in (transformers.AutoModelForCausalLM, transformers.DeepseekV3ForCausalLM):
        model = cls.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            outputs.append(model.generate(prompt, max_new_tokens=8, stop_strings=["a", "e"], tokenizer=tokenizer,
                                          pad_token_id=0, **options))
    assert torch.equal(*outputs)
