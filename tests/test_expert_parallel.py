"""Expert parallelism, FSDP2, TP and PP through transformers' distributed engine, on CPU ranks over gloo.

The ranks run under ``torchrun`` (``_expert_parallel_worker.py``); the ground truth is one process on the same global
batch in fp32: loss and gathered gradients (relative error < 1e-5), parameters after a few AdamW steps with the
bias update between them, router biases identical on every rank and equal to the single process's, a router that
sends every token to one EP rank's experts losing none, the sharded save byte-identical to a single-process save,
and each token's experts on at most the ranks group-limited routing allows. The layout checks run without any
launch: they must fail before a process group exists.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import build_model, relative_error, save_checkpoint, tiny_config
from transformers import AutoModelForCausalLM, DistributedConfig

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, expert_placement, parallel_plans
from modeling_deepseek_v3.training import routers

sys.path.insert(0, os.path.dirname(__file__))
import _expert_parallel_worker as worker  # noqa: E402

HERE = Path(__file__).parent
OFFICIAL_CONFIG = HERE / "fixtures" / "deepseek_v3_official_config.json"


def config():
    # MTP on (its MoE layer is sharded too), the sequence-wise balance loss on, bias updates on
    return tiny_config(num_nextn_predict_layers=1, aux_loss_alpha=0.01, router_bias_update_speed=0.01)


def launch(nprocs: int, checkpoint: str, out: Path, *scenarios: str) -> list[dict]:
    """Run the worker on ``nprocs`` gloo ranks; the results of each scenario, one dict per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nprocs),
               str(HERE / "_expert_parallel_worker.py"), checkpoint, str(out), *scenarios]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return {s: [torch.load(out / f"{s}.rank{r}.pt", weights_only=False) for r in range(nprocs)] for s in scenarios}


def single_process(checkpoint: str, forced: bool = False, **keywords) -> dict:
    """What the ranks compute, by one process on the whole global batch."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **keywords).train()
    if forced:
        worker.force_rank0_experts(model, model.config.num_experts_per_tok)
    ids = worker.global_batch()
    output = model(ids, labels=ids)
    output.loss.backward()
    result = {"loss": float(output.loss.detach()), "logits": output.logits.detach(),
              "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    optimizer.step()
    model.update_expert_bias()
    for _ in range(worker.STEPS - 1):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        model.update_expert_bias()
    result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    result["biases"] = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(config(), tmp_path_factory.mktemp("ep") / "tiny")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return single_process(checkpoint)


@pytest.fixture(scope="module")
def two_ranks(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    results = launch(2, checkpoint, out, "save", "ep2_fsdp2", "forced", "tp2", "tp2_absorbed", "pp2", "fp8", "resume")
    results["folder"] = out
    return results


def assert_matches_one_process(ranks: list[dict], reference: dict) -> None:
    first = ranks[0]
    assert abs(first["loss"] - reference["loss"]) / abs(reference["loss"]) < 1e-5
    assert first["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert relative_error(first["grads"][name], grad) < 1e-5, name
    for name, param in reference["params"].items():
        assert relative_error(first["params"][name], param) < 1e-5, name
    assert any((b != 0).any() for b in reference["biases"].values())
    for rank in ranks:  # identical on every rank, and equal to one process's on the union of the batches
        for name, bias in reference["biases"].items():
            assert torch.equal(rank["biases"][name], bias), (rank["rank"], name)


def test_ep2_fsdp2_trains_like_one_process(two_ranks, reference):
    assert_matches_one_process(two_ranks["ep2_fsdp2"], reference)


def test_training_resumed_from_a_distributed_checkpoint_is_uninterrupted_training(two_ranks, reference):
    # after step 1: save_pretrained from the sharded ranks + the sharded AdamW state, then load both and go on
    assert_matches_one_process(two_ranks["resume"], reference)


def test_tp2_trains_like_one_process(two_ranks, reference):
    # MLA split by heads (expanded attention in training), the dense MLPs and shared experts column-/row-wise
    assert_matches_one_process(two_ranks["tp2"], reference)


def test_tp2_absorbed_mla_trains_like_one_process(two_ranks, checkpoint):
    # absorbed attention reads the whole latent on every rank: its gradient is summed over the TP ranks
    assert_matches_one_process(two_ranks["tp2_absorbed"], single_process(checkpoint, mla_mode="absorbed"))


def test_fp8_block_trains_with_sharded_experts(two_ranks, checkpoint):
    """FP8 training (fp8_block quantizer) under EP 2 × FSDP 2. The forward quantizes activations per token and
    weights per 128×128 block, so the loss is one process's. The weight-gradient GEMMs quantize along the token axis,
    so a gradient is exactly what the GEMM saw: each routed expert receives, through the all-to-all, the tokens of
    both ranks (one process's gradient on the whole batch); every other weight gets the average of the two ranks'
    gradients on their own halves (one process's average over the two half batches) — the data-parallel FP8
    gradient of the paper, a few percent (FP8 rounding) away from the whole-batch one."""
    fp8 = dict(quantizer="fp8_block", fp8_mode="train")
    ranks = two_ranks["fp8"]
    assert {rank["experts_implementation"] for rank in ranks} == {"deepseek_fp8"}
    whole = single_process(checkpoint, **fp8)
    assert abs(ranks[0]["loss"] - whole["loss"]) / abs(whole["loss"]) < 1e-5
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **fp8).train()
    ids = worker.global_batch()
    for half in ids.chunk(2):
        model(half, labels=half).loss.backward()
    halves = {name: p.grad / 2 for name, p in model.named_parameters() if p.grad is not None}
    assert ranks[0]["grads"].keys() == whole["grads"].keys() == halves.keys()
    for name, grad in ranks[0]["grads"].items():
        expected = whole["grads"][name] if ".mlp.experts." in name else halves[name]
        assert relative_error(grad, expected) < 1e-5, name
    assert relative_error(whole["grads"]["model.layers.1.self_attn.o_proj.weight"],
                          halves["model.layers.1.self_attn.o_proj.weight"]) > 1e-3  # the two really differ
    assert any((b != 0).any() for b in ranks[0]["biases"].values())
    for name, bias in ranks[0]["biases"].items():  # the bias update counted both ranks' tokens
        assert torch.equal(ranks[1]["biases"][name], bias), name


def test_each_ep_rank_holds_its_contiguous_block_of_experts(two_ranks, checkpoint):
    full = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).model.layers[1].mlp.experts.gate_up_proj
    for rank in two_ranks["ep2_fsdp2"]:
        r = rank["rank"]
        assert torch.equal(rank["local_experts"], full[4 * r : 4 * (r + 1)])


def test_group_limited_routing_bounds_the_ranks_a_token_reaches(two_ranks):
    # 8 experts in 2 groups, topk_group=1, ep 2: each group is one rank's block, so every token reaches one rank
    assert expert_placement.max_destination_ranks(config(), 2) == 1
    for rank in two_ranks["ep2_fsdp2"]:
        assert rank["fan_out_worst"] == 1
        assert rank["fan_out_histogram"][2] == 0 and rank["fan_out_histogram"][1] > 0


def test_tokens_all_sent_to_one_rank_are_none_lost(two_ranks, checkpoint):
    reference = single_process(checkpoint, forced=True)
    ranks = two_ranks["forced"]
    for rank in ranks:
        assert rank["pairs_per_rank"][0] > 0 and rank["pairs_per_rank"][1] == 0
    # both ranks' tokens went to rank 0's experts, rank 1's experts got none: outputs and gradients are still exact
    logits = torch.cat([rank["logits"] for rank in ranks])
    assert relative_error(logits, reference["logits"]) < 1e-5
    for name, grad in reference["grads"].items():
        assert relative_error(ranks[0]["grads"][name], grad) < 1e-5, name


def test_pipeline_stages_give_one_process_logits(two_ranks, checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(worker.global_batch()).logits
    for rank in two_ranks["pp2"]:  # the last stage's logits, broadcast to every stage
        assert relative_error(rank["logits"], expected) < 1e-5


def test_sharded_save_equals_single_process_save(two_ranks, checkpoint, tmp_path):
    AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).save_pretrained(tmp_path / "single")
    sharded = two_ranks["folder"] / "sharded_save"
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in sharded.iterdir()) == files
    assert "model.safetensors" in files
    for name in files:
        assert filecmp.cmp(tmp_path / "single" / name, sharded / name, shallow=False), name


@pytest.mark.slow
def test_four_ranks_ep4_and_ep2_dp2_train_like_one_process(checkpoint, reference, tmp_path):
    results = launch(4, checkpoint, tmp_path, "ep4", "ep2_dp2")
    assert_matches_one_process(results["ep4"], reference)
    assert_matches_one_process(results["ep2_dp2"], reference)
    # ep 4: each group spans two ranks, so a token reaches at most two
    assert expert_placement.max_destination_ranks(config(), 4) == 2
    assert max(rank["fan_out_worst"] for rank in results["ep4"]) == 2
    assert all(rank["fan_out_histogram"][3] == rank["fan_out_histogram"][4] == 0 for rank in results["ep4"])


# --- no launch: plans, placement arithmetic, layout checks before any communication ------------------------------


@pytest.mark.parametrize("overrides", [dict(num_nextn_predict_layers=1), dict(q_lora_rank=None, n_shared_experts=2)])
def test_every_plan_rule_names_our_parameters(overrides):
    model = build_model(tiny_config(**overrides))
    names = parallel_plans.wildcard_names(model.model)
    for plan in (model.config.base_model_ep_plan, model.config.base_model_tp_plan, model.config.base_model_fsdp_plan,
                 model.config.base_model_pp_plan):
        assert parallel_plans.unmatched_rules(plan, names) == []
    assert model.config.base_model_ep_plan is parallel_plans.EP_PLAN


def test_max_destination_ranks():
    official = DeepseekV3Config.from_json_file(OFFICIAL_CONFIG)  # 256 experts, 8 groups, topk_group 4, 8 per token
    assert expert_placement.max_destination_ranks(official, 8) == 4  # one group per rank: the paper's 4 nodes
    assert expert_placement.max_destination_ranks(official, 64) == 8  # 8 ranks per group, capped by 8 experts
    assert expert_placement.max_destination_ranks(official, 4) == 4
    straddling = tiny_config(n_routed_experts=12, n_group=3, topk_group=1)  # groups of 4 over blocks of 6
    assert not expert_placement.groups_align_with_ranks(3, 2)
    assert expert_placement.max_destination_ranks(straddling, 2) == 2
    ids = torch.tensor([[0, 1, 2], [0, 4, 7], [3, 4, 5]])
    assert expert_placement.destination_ranks(ids, 8, 2).tolist() == [1, 2, 2]
    assert expert_placement.fan_out_histogram(ids, 8, 2) == [0, 1, 2]


@pytest.mark.parametrize(
    "world, sizes, message",
    [
        (3, dict(ep_size=3, fsdp_size=3), "ep_size=3 does not divide the model's n_routed_experts=8"),
        (4, dict(ep_size=2, fsdp_size=2), "multiply to 2, but the world size is 4"),
        (2, dict(ep_size=2, fsdp_size=2, ep_plan={"model.layers.*.mlp.experts.w1": "grouped_gemm"}),
         r"ep_plan names \['model.layers.\*.mlp.experts.w1'\]"),
        (2, dict(fsdp_size=2, fsdp_plan={"model.layers.*.mlp.moe": "free_full_weight"}), "fsdp_plan names"),
    ],
)
def test_bad_layouts_fail_before_any_communication(tiny_checkpoint, launched_as, world, sizes, message):
    launched_as(world)
    with pytest.raises(ValueError, match=message):
        DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, distributed_config=DistributedConfig(**sizes))
    assert not dist.is_initialized()


def test_ep_size_not_dividing_the_world_or_given_as_a_bad_dict(tiny_checkpoint, launched_as):
    launched_as(6)
    with pytest.raises(ValueError, match="ep_size=4 does not divide the world size 6"):
        DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, distributed_config=DistributedConfig(ep_size=4, fsdp_size=4))
    with pytest.raises(ValueError, match=r"distributed_config=\{'ep_size': 4, 'fsdp_size': 6\}"):
        AutoModelForCausalLM.from_pretrained(tiny_checkpoint, distributed_config={"ep_size": 4, "fsdp_size": 6})
    assert not dist.is_initialized()


def test_a_sharded_layout_outside_a_launch_names_the_launcher(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        DeepseekV3ForCausalLM.from_pretrained(tiny_checkpoint, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2))


def test_groups_straddling_ranks_warn(tmp_path, launched_as):
    folder = save_checkpoint(tiny_config(n_routed_experts=12, n_group=3, topk_group=1), tmp_path / "straddling")
    launched_as(2)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="names"):
        warnings.simplefilter("always")
        # the plan error stops it before any process group; the placement warning came first
        DeepseekV3ForCausalLM.from_pretrained(
            folder, distributed_config=DistributedConfig(ep_size=2, fsdp_size=2, ep_plan={"nothing": "grouped_gemm"})
        )
    assert any("routing groups straddle" in str(w.message) and "can reach 2 of the 2 ranks" in str(w.message) for w in caught)


def test_update_bias_moves_toward_balance():
    router = build_model(config()).model.layers[1].mlp.gate
    before = router.e_score_correction_bias.clone()
    router.update_bias(torch.tensor([5.0, 1, 3, 3, 3, 3, 3, 3]), 0.1)
    step = router.e_score_correction_bias - before
    assert torch.allclose(step, torch.tensor([-0.1, 0.1, 0, 0, 0, 0, 0, 0]))
    router.update_bias(torch.zeros(8), 0.1)  # nothing routed: no step
    router.update_bias(torch.ones(8) * 7, 0.0)
    assert torch.allclose(router.e_score_correction_bias - before, step)
    with pytest.raises(ValueError, match="one count per routed expert"):
        router.update_bias(torch.ones(4), 0.1)
