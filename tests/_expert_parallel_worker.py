"""One rank of the expert-parallel tests, started by ``torchrun`` from ``test_expert_parallel.py``.

``python -m torch.distributed.run --nproc-per-node N _expert_parallel_worker.py CHECKPOINT OUT SCENARIO...`` loads
the checkpoint with transformers' distributed engine for each scenario, runs it on this rank's share of the global
batch (``global_batch``), and writes what the test compares against one process into ``OUT`` (``torch.save``):
rank 0 writes the gathered values, every rank its own router biases.

Scenarios (name -> DistributedConfig): see ``SCENARIOS``. Each trains: one forward/backward (loss, gathered
gradients), then ``STEPS`` AdamW steps each followed by the bias update (parameters, biases), while a hook on every
experts module records how many EP ranks each token's experts lie on. ``forced`` sends every token to the experts
of EP rank 0; ``pp2`` runs inference only (transformers' pipeline stages have no backward); ``save`` writes the
sharded model with ``save_pretrained`` before training; ``fp8`` trains EP 2 × FSDP 2 with FP8 GEMMs; ``resume``
stops after the first step, writes the model (``save_pretrained``, official layout, router biases included) and the
sharded AdamW state (transformers' ``save_optimizer_distributed``), loads both into a freshly sharded model and
optimizer, and trains on.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import modeling_deepseek_v3  # noqa: F401  (registers our classes with the Auto factories)
from modeling_deepseek_v3 import expert_placement
from modeling_deepseek_v3.training import routers
from transformers import AutoModelForCausalLM, DistributedConfig
from transformers.distributed.checkpoint import load_optimizer_distributed, save_optimizer_distributed

STEPS = 3
LR = 1e-3
SCENARIOS = {
    "ep2_fsdp2": dict(ep_size=2, fsdp_size=2),
    "tp2": dict(tp_size=2),
    "tp2_absorbed": dict(tp_size=2),
    "pp2": dict(pp_size=2),
    "forced": dict(ep_size=2, fsdp_size=2),
    "ep4": dict(ep_size=4, fsdp_size=4),
    "ep2_dp2": dict(ep_size=2, fsdp_size=2, dp_replicate_size=2),
    "save": dict(ep_size=2, fsdp_size=2),
    "fp8": dict(ep_size=2, fsdp_size=2),
    "resume": dict(ep_size=2, fsdp_size=2),
}
# from_pretrained keywords of a scenario beyond the layout: "fp8" trains through the fp8_block quantizer
# (FP8 GEMMs over high-precision master weights, the routed experts through the grouped FP8 implementation)
LOAD_KEYWORDS = {"fp8": dict(quantizer="fp8_block", fp8_mode="train"), "tp2_absorbed": dict(mla_mode="absorbed")}


def global_batch() -> torch.Tensor:
    """4 sequences of 12 tokens, no padding: every data-parallel rank gets an equal share."""
    return torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(7))


def force_rank0_experts(model, top_k: int) -> None:
    """Bias every router so that each token picks experts 0..top_k-1 (all held by EP rank 0)."""
    with torch.no_grad():
        for router in routers(model).values():
            router.e_score_correction_bias[:top_k] += 100.0


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def local_batch(distributed_config: DistributedConfig) -> torch.Tensor:
    # dense mesh (pp, dp_replicate, fsdp, tp), tp fastest: the ranks of a TP group (and the stages of a pipeline)
    # share a batch, the dp ranks split it
    ids = global_batch()
    dp_rank = (dist.get_rank() // distributed_config.tp_size) % distributed_config.dp_size
    share = ids.shape[0] // distributed_config.dp_size
    return ids[dp_rank * share : (dp_rank + 1) * share]


class FanOut:
    """Records how many EP ranks each token's experts lie on (worst case, histogram) and the (token, expert) pairs
    sent to each rank."""

    def __init__(self, model, ep_size: int):
        self.worst, self.histogram = 0, [0] * (ep_size + 1)
        self.pairs_per_rank = [0] * ep_size  # (token, expert) pairs sent to each EP rank
        n_experts = model.config.n_routed_experts
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                module.register_forward_pre_hook(self._hook(n_experts, ep_size))

    def _hook(self, n_experts, ep_size):
        def hook(module, args):
            hist = expert_placement.fan_out_histogram(args[1], n_experts, ep_size)
            pairs = torch.bincount(expert_placement.rank_of_expert(args[1], n_experts, ep_size).reshape(-1), minlength=ep_size)
            self.pairs_per_rank = [a + b for a, b in zip(self.pairs_per_rank, pairs.tolist())]
            self.histogram = [a + b for a, b in zip(self.histogram, hist)]
            self.worst = max(self.worst, max(d for d, n in enumerate(hist) if n))

        return hook


def run(checkpoint: str, out: str, name: str) -> dict:
    distributed_config = DistributedConfig(ep_implementation="all_to_all", **SCENARIOS[name])
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, distributed_config=distributed_config, dtype=torch.float32, **LOAD_KEYWORDS.get(name, {})
    )
    ids = local_batch(distributed_config)
    result = {"rank": dist.get_rank(), "experts_implementation": model.config._experts_implementation}
    if name == "pp2":
        model.eval()
        with torch.no_grad():
            result["logits"] = model(ids).logits
        return result
    if name == "save":
        model.save_pretrained(os.path.join(out, "sharded_save"))
        return result
    if name == "forced":
        force_rank0_experts(model, model.config.num_experts_per_tok)
    fan_out = FanOut(model, distributed_config.ep_size) if distributed_config.ep_size > 1 else None
    model.train()
    experts = model.model.layers[model.config.first_k_dense_replace].mlp.experts
    result["local_experts"] = full(experts.gate_up_proj.to_local() if isinstance(experts.gate_up_proj, DTensor) else experts.gate_up_proj)

    output = model(ids, labels=ids)
    output.loss.backward()
    loss = output.loss.detach().clone()
    dist.all_reduce(loss)
    result["loss"] = float(loss) / dist.get_world_size()
    result["grads"] = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    if name == "forced":
        result["logits"] = full(output.logits)
        result["fan_out_histogram"], result["pairs_per_rank"] = fan_out.histogram, fan_out.pairs_per_rank
        return result

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    optimizer.step()
    model.update_expert_bias()
    if name == "resume":
        model, optimizer = save_and_resume(model, optimizer, distributed_config, os.path.join(out, "resume"))
    for _ in range(STEPS - 1):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        model.update_expert_bias()
    result["params"] = {n: full(p) for n, p in model.named_parameters()}
    result["biases"] = {n: r.e_score_correction_bias.detach().clone() for n, r in routers(model).items()}
    if fan_out is not None:
        result["fan_out_worst"], result["fan_out_histogram"] = fan_out.worst, fan_out.histogram
    return result


def save_and_resume(model, optimizer, distributed_config, folder: str):
    """Checkpoint the training state and start again from it, as a restarted job would."""
    model.save_pretrained(os.path.join(folder, "model"))
    save_optimizer_distributed(model, optimizer, os.path.join(folder, "optimizer"))
    dist.barrier()
    resumed = AutoModelForCausalLM.from_pretrained(
        os.path.join(folder, "model"), distributed_config=distributed_config, dtype=torch.float32
    ).train()
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=LR)
    load_optimizer_distributed(resumed, resumed_optimizer, os.path.join(folder, "optimizer"))
    return resumed, resumed_optimizer


def run_scenarios(run) -> None:
    """``<checkpoint> <out> <scenario>...`` from the command line: each scenario's ``run(checkpoint, out, name)``
    result saved per rank as ``<out>/<name>.rank<r>.pt`` (the round-8 worker runs its scenarios the same way)."""
    checkpoint, out, *names = sys.argv[1:]
    torch.set_num_threads(1)
    for name in names:
        result = run(checkpoint, out, name)
        torch.save(result, os.path.join(out, f"{name}.rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
