"""Training through accelerate's own parallelism (not transformers' DistributedConfig) on 2 gloo CPU ranks: its DDP,
its FSDP plugin (FSDP2 and FSDP1, TRANSFORMER_BASED_WRAP from our ``_no_split_modules``, ``activation_checkpointing``,
``cpu_ram_efficient_loading``) in a plain loop, and ``transformers.Trainer`` under DDP and FSDP2 with
FULL_STATE_DICT and SHARDED_STATE_DICT checkpoints, resumed from the middle one.

One launch runs every scenario (``_accelerate_parallel_round11_worker.py``). The ground truth is one process on the
same global batch in fp32: the loss, its balance and MTP parts and the gathered gradients (the MTP module shares the
embedding and the head with the main model across FSDP units), the parameters after a few AdamW steps, the router
biases after the bias steps (all-reduced loads: identical on both ranks), and a Trainer checkpoint that
transformers' own class reads. FP8 training (``fp8_block``) under DDP gets the average of the two ranks' FP8
gradients on their own halves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import relative_error, save_checkpoint, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3 import DeepseekV3ForCausalLM as TransformersDeepseekV3

from modeling_deepseek_v3.training import routers

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _accelerate_parallel_round11_worker as worker  # noqa: E402

LOOPS = ["ddp", "fsdp2", "fsdp1", "fsdp2_ac", "fsdp2_ram_efficient", "ddp_fp8"]
TRAINERS = list(worker.TRAINER_SCENARIOS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config(num_nextn_predict_layers=1, aux_loss_alpha=0.01, router_bias_update_speed=0.01)
    return save_checkpoint(config, tmp_path_factory.mktemp("accelerate") / "tiny")


@pytest.fixture(scope="module")
def ranks(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "_accelerate_parallel_round11_worker.py"), checkpoint, str(out), *LOOPS, *TRAINERS]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    results = {s: [torch.load(out / f"{s}.rank{r}.pt", weights_only=False) for r in range(2)] for s in LOOPS + TRAINERS}
    results["folder"] = out
    return results


def one_process(checkpoint: str, **keywords) -> dict:
    """What the ranks compute, by one process on the whole global batch."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **keywords).train()
    ids = worker.global_batch()
    output = model(ids, labels=ids)
    output.loss.backward()
    result = {part: float(getattr(output, part)) for part in ("loss", "aux_loss", "mtp_loss")}
    result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    optimizer.step()
    result["loads"] = {n: load.clone() for n, load in model.update_expert_bias().load.items()}
    for _ in range(worker.STEPS - 1):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        model.update_expert_bias()
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    result["biases"] = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
    return result


@pytest.fixture(scope="module")
def reference(checkpoint):
    return one_process(checkpoint)


@pytest.fixture(scope="module")
def trainer_reference(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_trainer")
    return worker.train(checkpoint, str(folder), None, batch_size=4), folder


def assert_same_biases(ranks: list[dict], expected: dict, key: str = "biases") -> None:
    assert expected and any((b != 0).any() for b in expected.values())
    for rank in ranks:  # identical on every rank, and equal to one process's on the union of the batches
        assert rank[key].keys() == expected.keys()
        for name, bias in expected.items():
            assert torch.equal(rank[key][name], bias), name


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2", "fsdp1", "fsdp2_ac", "fsdp2_ram_efficient"])
def test_accelerate_loop_trains_like_one_process(ranks, reference, checkpoint, scenario):
    """Loss, balance loss and MTP loss, gradients (FSDP1 keeps only flat shards of them), the loads the bias step
    used (activation checkpointing recomputes the layers but counts their tokens once), parameters and biases."""
    first = ranks[scenario][0]
    assert first["distributed_type"] == ("DistributedType.MULTI_CPU" if scenario == "ddp" else "DistributedType.FSDP")
    for part in ("loss", "aux_loss", "mtp_loss"):
        assert abs(first[part] - reference[part]) / abs(reference[part]) < 1e-5, part
    if scenario != "fsdp1":
        assert first["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            assert relative_error(first["grads"][name], grad) < 1e-5, name
    for name, load in reference["loads"].items():
        assert torch.equal(first["loads"][name], load), name
    assert first["params"].keys() == reference["params"].keys()
    for name, param in reference["params"].items():
        assert relative_error(first["params"][name], param) < 1e-5, name
    assert_same_biases(ranks[scenario], reference["biases"])


def test_fsdp_wraps_each_decoder_layer_and_the_mtp_module(ranks):
    """TRANSFORMER_BASED_WRAP reads `_no_split_modules`: every decoder layer and the MTP module (layer 3) is an FSDP
    unit of its own, the MTP module's shared embedding and head stay in theirs; with `activation_checkpointing`
    every one of them is checkpointed."""
    layers = [f"model.layers.{i}" for i in range(4)]
    for scenario in ("fsdp2", "fsdp2_ac", "fsdp2_ram_efficient"):
        assert ranks[scenario][0]["units"] == sorted(["", "lm_head", "model.embed_tokens", "model.norm", *layers])
    assert {"", *layers} <= set(ranks["fsdp1"][0]["units"])
    assert ranks["fsdp2_ac"][0]["checkpointed"] == layers
    assert ranks["fsdp2"][0]["checkpointed"] == []


def test_cpu_ram_efficient_loading_broadcasts_rank0_weights_and_biases(ranks, checkpoint):
    """With `cpu_ram_efficient_loading` the plugin takes rank 0's weights and buffers: rank 1's were changed before
    `prepare` (its embedding shifted, its routing biases zeroed), and it trains like one process all the same (the
    loop test above) from the checkpoint's biases."""
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    expected = {name.removesuffix(".e_score_correction_bias"): saved[name] for name in saved
                if name.endswith("e_score_correction_bias")}
    assert_same_biases(ranks["fsdp2_ram_efficient"], expected, key="biases_at_start")


def test_fp8_block_under_ddp_averages_each_rank_fp8_gradient(ranks, checkpoint):
    """fp8_block's weight-gradient GEMMs quantize along the token axis, so each rank's gradient is the FP8 gradient of
    its own half; DDP averages them. The forward quantizes per token and per block: one process's loss."""
    fp8 = worker.LOAD_KEYWORDS["ddp_fp8"]
    first = ranks["ddp_fp8"][0]
    whole = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **fp8).train()
    ids = worker.global_batch()
    loss = float(whole(ids, labels=ids).loss)
    assert abs(first["loss"] - loss) / abs(loss) < 1e-5
    for half in ids.chunk(2):
        whole(half, labels=half).loss.backward()
    halves = {name: p.grad / 2 for name, p in whole.named_parameters() if p.grad is not None}
    assert first["grads"].keys() == halves.keys()
    for name, grad in halves.items():
        assert relative_error(first["grads"][name], grad) < 1e-5, name
    assert any((b != 0).any() for b in first["biases"].values())
    for name, bias in first["biases"].items():
        assert torch.equal(ranks["ddp_fp8"][1]["biases"][name], bias), name


@pytest.mark.parametrize("scenario", TRAINERS)
def test_trainer_trains_and_resumes_like_one_process(ranks, trainer_reference, scenario):
    """Trainer with ExpertBiasUpdateCallback, 2 ranks of batch 2 against one process of batch 4; the run resumed from
    the step-2 checkpoint ends where the uninterrupted one does."""
    expected = trainer_reference[0]
    for run in ("whole", "resumed"):
        first = ranks[scenario][0][run]
        assert first["distributed_type"] == ("DistributedType.MULTI_CPU" if scenario == "trainer_ddp" else "DistributedType.FSDP")
        assert first["params"].keys() == expected["params"].keys()
        for name, param in expected["params"].items():
            assert relative_error(first["params"][name], param) < 1e-5, (run, name)
        assert_same_biases([rank[run] for rank in ranks[scenario]], expected["biases"])


def _assert_official_folder(folder: Path, expected: Path) -> None:
    """The folder holds the official layout (per-expert names, the MTP layer's copies of embedding and head) with the
    one-process run's values, and transformers' own class reads it to our logits."""
    ours, theirs = load_file(folder / "model.safetensors"), load_file(expected / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert "model.layers.3.embed_tokens.weight" in ours and "model.layers.1.mlp.experts.7.down_proj.weight" in ours
    for name, tensor in theirs.items():
        assert relative_error(ours[name], tensor) < 1e-5, name
    ids = worker.global_batch()
    with torch.no_grad():
        logits = TransformersDeepseekV3.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
        ours_logits = AutoModelForCausalLM.from_pretrained(expected, dtype=torch.float32).eval()(ids).logits
    assert relative_error(logits, ours_logits) < 1e-5


def test_fsdp_trainer_checkpoints_hold_the_official_layout(ranks, trainer_reference):
    """FULL_STATE_DICT: each checkpoint is a from_pretrained folder; SHARDED_STATE_DICT checkpoints are accelerate's
    distributed checkpoint (resumable, not a model folder). Either way the final save with a full state dict is."""
    folder, (_, one) = ranks["folder"], trainer_reference
    files = ranks["trainer_full"][0]["checkpoint_files"]
    assert {"config.json", "model.safetensors"} <= set(files)
    _assert_official_folder(folder / "trainer_full" / "checkpoint-2", one / "checkpoint-2")
    assert "pytorch_model_fsdp_0" in ranks["trainer_sharded"][0]["checkpoint_files"]
    for scenario in ("trainer_full", "trainer_sharded"):
        _assert_official_folder(folder / scenario / "final", one / f"checkpoint-{worker.TRAINER_STEPS}")
