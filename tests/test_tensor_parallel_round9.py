"""A model split by transformers' tensor-parallel engine (``DistributedConfig(tp_size=2)``, MLA by heads) against
one process on the same weights in fp32: logits, loss and gradients, greedy and MTP self-speculative decoding, the
MLA execution modes, tensor parallelism combined with expert parallelism, LoRA (what PEFT's LoRA layer follows under
tensor parallelism, and the refusal of what it does not), ``save_pretrained`` from the ranks, and layouts refused
before any process group starts.

All multi-process scenarios run in one ``torchrun`` of 2 gloo ranks (``_tensor_parallel_round9_worker.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import relative_error, save_checkpoint, tiny_config
from transformers import AutoModelForCausalLM, DistributedConfig

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _tensor_parallel_round9_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow

SCENARIOS = ("forward", "generate", "mla_modes", "tp_ep", "lora", "save", "save_tp_ep")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_config(num_nextn_predict_layers=1), tmp_path_factory.mktemp("round9_tp") / "tiny")


@pytest.fixture(scope="module")
def ranks(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("round9_tp_ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "_tensor_parallel_round9_worker.py"), checkpoint, str(out), *SCENARIOS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    results = {s: [torch.load(out / f"{s}.rank{r}.pt", weights_only=False) for r in range(2)] for s in SCENARIOS}
    results["folder"] = out
    return results


def one_process(checkpoint, **keywords):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **keywords)


def assert_backward_matches(rank: dict, model) -> None:
    ids = worker.batch()
    output = model(ids, labels=ids)
    output.loss.backward()
    assert relative_error(rank["logits"], output.logits.detach()) < 1e-5
    assert abs(rank["loss"] - output.loss.item()) < 1e-5 * output.loss.item()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert rank["grads"].keys() == expected.keys()
    for name, grad in expected.items():
        assert relative_error(rank["grads"][name], grad) < 1e-5, name


@pytest.mark.parametrize("scenario", ["forward", "tp_ep"])
def test_tp2_and_tp2_ep2_compute_one_process_logits_loss_and_gradients(ranks, checkpoint, scenario):
    for rank in ranks[scenario]:  # every rank of the group holds the whole result
        assert_backward_matches(rank, one_process(checkpoint).train())


def test_greedy_and_mtp_decoding_under_tp2_are_one_process(ranks, checkpoint):
    model = one_process(checkpoint).eval()
    expected = worker.greedy(model, worker.prompts())
    static = worker.greedy(model, worker.prompts(), cache_implementation="static")
    mtp = worker.greedy(model, worker.prompts()[:1], use_mtp=True)
    assert torch.equal(mtp, expected[:1])  # speculative decoding decodes greedy's tokens
    ids, mask = worker.padded_prompts()
    padded = worker.greedy(model, ids, attention_mask=mask)
    for rank in ranks["generate"]:
        assert torch.equal(rank["dynamic"], expected)
        assert torch.equal(rank["static"], static)
        assert torch.equal(rank["mtp"], mtp)
        assert torch.equal(rank["padded"], padded)


def test_every_mla_mode_under_tp2_is_one_process(ranks, checkpoint):
    model = one_process(checkpoint).eval()
    for mode in worker.MLA_MODES:
        model.config.mla_mode = mode
        with torch.no_grad():
            logits = model(worker.batch()).logits
        tokens = worker.greedy(model, worker.prompts())
        for rank in ranks["mla_modes"]:
            assert relative_error(rank[mode]["logits"], logits) < 1e-5, mode
            assert torch.equal(rank[mode]["tokens"], tokens), mode


def test_lora_on_the_layers_tp_splits_by_columns_or_keeps_whole_is_one_process(ranks, checkpoint):
    from peft import PeftModel, get_peft_model

    from modeling_deepseek_v3.lora import prepare_lora_config

    model = one_process(checkpoint).train()
    peft_model = get_peft_model(model, prepare_lora_config(model, worker.lora_config()))
    first = ranks["lora"][0]
    parameters = dict(peft_model.named_parameters())
    assert first["adapters"].keys() == {n for n in parameters if "lora_" in n}
    with torch.no_grad():  # PEFT draws a column-wise layer's lora_B per rank: the ranks' adapters, gathered
        for name, value in first["adapters"].items():
            parameters[name].copy_(value)
    ids = worker.batch()
    output = peft_model(ids, labels=ids)
    output.loss.backward()
    for rank in ranks["lora"]:
        assert relative_error(rank["logits"], output.logits.detach()) < 1e-5
        assert rank["grads"].keys() == first["adapters"].keys()
        for name in rank["grads"]:
            assert relative_error(rank["grads"][name], parameters[name].grad) < 1e-5, name
    reloaded = PeftModel.from_pretrained(one_process(checkpoint), ranks["folder"] / "adapter.rank0")
    with torch.no_grad():
        assert relative_error(reloaded(ids).logits, output.logits.detach()) < 1e-5


@pytest.mark.parametrize("check, style", [
    ("o_proj", "'rowwise'"),
    ("kv_a_proj_with_mqa", "'mla_kv_a_proj'"),  # accepted, it trained with wrong adapter gradients
    ("lm_head", "'colwise_gather_output'"),
    ("all-linear", "'mla_kv_a_proj'"),
    ("dense weight", "'colwise'"),
])
def test_lora_targets_tp_splits_otherwise_are_refused_by_name(ranks, check, style):
    for rank in ranks["lora"]:
        message = rank["refusals"][check]
        assert "DistributedConfig(tp_size=2)" in message and style in message and "fsdp_size" in message, message
        if check != "dense weight":
            assert "['eh_proj', 'embed_tokens', 'kv_b_proj', 'q_a_proj', 'q_b_proj']" in message, message


def test_lora_refusals_are_for_tensor_parallelism_only(checkpoint):
    from modeling_deepseek_v3.lora import prepare_lora_config

    model = one_process(checkpoint)
    for targets in worker.REFUSED_TARGETS.values():
        prepare_lora_config(model, worker.lora_config(**targets))


@pytest.mark.parametrize("scenario", ["save", "save_tp_ep"])
def test_save_pretrained_under_tp2_writes_the_one_process_folder(ranks, checkpoint, scenario, tmp_path):
    one_process(checkpoint).save_pretrained(tmp_path)
    saved = ranks["folder"] / scenario
    assert sorted(os.listdir(saved)) == sorted(os.listdir(tmp_path))
    for name in ("model.safetensors", "config.json"):
        assert (saved / name).read_bytes() == (tmp_path / name).read_bytes(), name


@pytest.mark.parametrize("sizes, overrides, message", [
    (dict(tp_size=2), dict(num_attention_heads=3, num_key_value_heads=3), "tp_size=2 does not divide the model's num_attention_heads=3"),
    (dict(tp_size=4), {}, "tp_size=4 multiply to 4, but the world size is 2"),
    (dict(tp_size=2, fsdp_size=2), {}, "fsdp_size=2 × tp_size=2 multiply to 4, but the world size is 2"),
])
def test_tp_layouts_that_cannot_work_are_named_before_any_process_group(checkpoint, launched_as, sizes, overrides, message):
    import torch.distributed as dist

    launched_as(2)
    with pytest.raises(ValueError, match=message):
        one_process(checkpoint, distributed_config=DistributedConfig(**sizes), **overrides)
    assert not dist.is_initialized()
