"""Ordinary use of a model sharded by transformers' distributed engine, against one process on the same global
batch in fp32 (round 8 of the distributed probes): PEFT LoRA on an EP-2 model (forward, gradients, an adapter saved
by the ranks reloaded in one process) and the refusal of LoRA on split stacked experts, greedy decoding with dynamic
and static caches, the sequence-classification head, FSDP 2 alone with MTP and bias updates, gradient
checkpointing, padded batches, and ``update_expert_bias`` with a process group.

All scenarios run in one ``torchrun`` of 2 gloo ranks (``_distributed_round8_worker.py``); each test reads its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import relative_error, save_checkpoint, tiny_config
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_deepseek_v3.training import routers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _distributed_round8_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow

SCENARIOS = ("lora", "lora_tp2", "generate", "seq_cls", "fsdp_mtp", "checkpointing", "padded", "process_group")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # MTP on, the sequence-wise balance loss on, bias updates on
    config = tiny_config(num_nextn_predict_layers=1, aux_loss_alpha=0.01, router_bias_update_speed=0.01)
    return save_checkpoint(config, tmp_path_factory.mktemp("round8") / "tiny")


@pytest.fixture(scope="module")
def ranks(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("round8_ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "_distributed_round8_worker.py"), checkpoint, str(out), *SCENARIOS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    results = {s: [torch.load(out / f"{s}.rank{r}.pt", weights_only=False) for r in range(2)] for s in SCENARIOS}
    results["folder"] = out
    return results


def one_process(checkpoint, model_class=AutoModelForCausalLM, **keywords):
    return model_class.from_pretrained(checkpoint, dtype=torch.float32, **keywords)


def assert_same_grads(actual: dict, model) -> None:
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert relative_error(actual[name], grad) < 1e-5, name


def test_lora_on_an_ep2_model_computes_and_saves_what_one_process_does(ranks, checkpoint):
    from peft import PeftModel, get_peft_model

    from modeling_deepseek_v3.lora import prepare_lora_config

    model = one_process(checkpoint)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, prepare_lora_config(model, worker.lora_config())).train()
    ids = worker.global_batch()
    output = peft_model(ids, labels=ids)
    output.loss.backward()
    logits = torch.cat([rank["logits"] for rank in ranks["lora"]])
    assert relative_error(logits, output.logits.detach()) < 1e-5
    expected = {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert expected and ranks["lora"][0]["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        # the adapters are plain tensors beside the sharded base: each rank's gradient is of its own half, and their
        # mean (what transformers' Trainer all-reduces for such parameters) is one process's on the whole batch
        mean = (ranks["lora"][0]["grads"][name] + ranks["lora"][1]["grads"][name]) / 2
        assert relative_error(mean, grad) < 1e-5, name
    reloaded = PeftModel.from_pretrained(one_process(checkpoint), ranks["folder"] / "adapter.rank1").train()
    with torch.no_grad():
        assert relative_error(reloaded(ids).logits, logits) < 1e-5


@pytest.mark.parametrize("scenario, sizes", [("lora", "ep_size=2"), ("lora_tp2", "tp_size=2")])
def test_lora_on_stacked_experts_split_over_ranks_is_refused_by_name(ranks, scenario, sizes):
    # PEFT's update of the whole [E, out, in] tensor cannot be added to the rank's DTensor share: the forward failed
    # with "got mixed torch.Tensor and DTensor" (EP) and get_peft_model with "'ParamWrapper' object has no attribute
    # 'weight'" (TP), naming neither the experts nor the layout
    for rank in ranks[scenario]:
        message = rank["refusal"]
        assert "'model.layers.1.mlp.experts." in message and f"DistributedConfig({sizes})" in message, message
        assert "fsdp_size only" in message


def test_lora_on_stacked_experts_under_fsdp_alone_is_accepted(tiny_checkpoint):
    from peft import LoraConfig

    from modeling_deepseek_v3.lora import prepare_lora_config

    model = one_process(tiny_checkpoint)
    config = LoraConfig(r=2, target_parameters=worker.EXPERT_TARGETS)
    assert prepare_lora_config(model, config).target_parameters == worker.EXPERT_TARGETS


def test_greedy_generation_on_an_ep2_model_is_one_process(ranks, checkpoint):
    model = one_process(checkpoint).eval()
    expected = model.generate(worker.prompts(), max_new_tokens=worker.MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
    for cache in ("dynamic", "static"):
        assert torch.equal(torch.cat([rank[cache] for rank in ranks["generate"]]), expected), cache


def test_sequence_classification_on_an_ep2_model_is_one_process(ranks, checkpoint):
    first, second = ranks["seq_cls"]
    assert torch.equal(first["score"], second["score"])  # initialised at load, the same on both ranks
    model = one_process(checkpoint, AutoModelForSequenceClassification, num_labels=3).train()
    with torch.no_grad():
        model.score.weight.copy_(first["score"])
    output = model(worker.global_batch(), labels=worker.LABELS)
    output.loss.backward()
    assert relative_error(torch.cat([first["logits"], second["logits"]]), output.logits.detach()) < 1e-5
    assert abs(first["loss"] - output.loss.item()) < 1e-5 * abs(output.loss.item())
    assert_same_grads(first["grads"], model)


def test_fsdp2_alone_trains_mtp_and_biases_like_one_process(ranks, checkpoint):
    model = one_process(checkpoint).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    ids = worker.global_batch()
    losses = []
    for _ in range(worker.STEPS):
        optimizer.zero_grad()
        output = model(ids, labels=ids)
        output.loss.backward()
        losses.append(output.loss.item())
        optimizer.step()
        model.update_expert_bias()
    first = ranks["fsdp_mtp"][0]
    assert first["losses"] == pytest.approx(losses, rel=1e-5)
    assert any(name.startswith("model.layers.3.") for name in first["params"])  # the MTP module trained too
    for name, param in model.named_parameters():
        assert relative_error(first["params"][name], param.detach()) < 1e-5, name
    assert any((r.e_score_correction_bias != 0).any() for r in routers(model).values())
    for rank in ranks["fsdp_mtp"]:
        for name, router in routers(model).items():
            assert torch.equal(rank["biases"][name], router.e_score_correction_bias), name


@pytest.mark.parametrize("scenario", ["checkpointing", "padded"])
def test_ep2_backward_with_checkpointing_or_padding_is_one_process(ranks, checkpoint, scenario):
    model = one_process(checkpoint).train()
    if scenario == "padded":
        ids, mask, labels = worker.padded_batch()
        output = model(ids, attention_mask=mask, labels=labels)
    else:
        output = model(worker.global_batch(), labels=worker.global_batch())
    output.loss.backward()
    first = ranks[scenario][0]
    assert abs(first["loss"] - output.loss.item()) < 1e-5 * output.loss.item()
    assert_same_grads(first["grads"], model)


def test_update_expert_bias_with_a_process_group_on_an_ep2_model(ranks, checkpoint):
    model = one_process(checkpoint).train()
    with torch.no_grad():
        model(worker.global_batch())
    stats = model.update_expert_bias()
    for rank in ranks["process_group"]:
        for name, load in stats.load.items():
            assert torch.equal(rank["load"][name], load), name
            assert rank["eval_load"][name].sum() == 0, name  # eval forwards count nothing
            assert torch.equal(rank["biases"][name], routers(model)[name].e_score_correction_bias), name
