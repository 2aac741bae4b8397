"""One rank of ``test_distributed_round8.py``'s multi-process tests, started by ``torchrun``.

``python -m torch.distributed.run --nproc-per-node 2 _distributed_round8_worker.py CHECKPOINT OUT SCENARIO...`` loads
the checkpoint sharded as each scenario says, runs it on this rank's half of ``global_batch()`` (or on
``prompts()``), and writes what the test compares against one process into ``OUT/SCENARIO.rank{r}.pt``.

Scenarios (EP 2 × FSDP 2 unless said otherwise):

- ``lora``: PEFT LoRA on the attention projections (``LORA_TARGETS``, random non-zero adapters from seed 0): the
  training-mode logits and the adapters' gradients; each rank saves the adapter to ``OUT/adapter.rank{r}``. Then the message
  ``prepare_lora_config`` gives for ``target_parameters`` on the stacked experts.
- ``lora_tp2`` (TP 2): that message only.
- ``generate``: greedy decoding of this rank's two prompts, dynamic and static cache.
- ``seq_cls``: a 3-label sequence-classification model over the causal-LM checkpoint (its ``score`` head
  initialised at load): logits, loss and gradients of one backward.
- ``fsdp_mtp`` (FSDP 2 alone): 3 AdamW steps of the MTP + balance loss, each followed by the bias update.
- ``checkpointing``: loss and gradients of one backward with gradient checkpointing on.
- ``padded``: loss and gradients of one backward on left-padded rows (labels -100 on the padding), as many targets
  on each rank.
- ``process_group``: counts of a training-mode forward summed by ``update_expert_bias(process_group=...)``, then an
  eval-mode forward (which counts nothing) and a default update.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import modeling_deepseek_v3  # noqa: F401  (registers our classes with the Auto factories)
from modeling_deepseek_v3.training import routers
from _expert_parallel_worker import run_scenarios  # the script's folder (tests/) is on sys.path
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DistributedConfig

LR = 1e-3
STEPS = 3
LORA_TARGETS = ["q_b_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LABELS = torch.tensor([0, 1, 2, 1])
MAX_NEW_TOKENS = 5


def global_batch() -> torch.Tensor:
    return torch.randint(1, 97, (4, 10), generator=torch.Generator().manual_seed(3))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows 1 and 2 left-padded by 3 tokens: each rank's half holds one padded row, so as many targets."""
    ids = global_batch()
    mask = torch.ones_like(ids)
    mask[1:3, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def prompts() -> torch.Tensor:
    return global_batch()[:, :5]


def lora_config(**targets):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **(targets or {"target_modules": LORA_TARGETS}))


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def half(tensor: torch.Tensor) -> torch.Tensor:
    # torchrun's RANK: the engine starts the process group only when it loads the model
    rank, share = int(os.environ["RANK"]), tensor.shape[0] // 2
    return tensor[rank * share : (rank + 1) * share]


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def grads(model) -> dict:
    return {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def load(checkpoint: str, model_class=AutoModelForCausalLM, sizes=None, **keywords):
    config = DistributedConfig(ep_implementation="all_to_all", **(sizes or dict(ep_size=2, fsdp_size=2)))
    return model_class.from_pretrained(checkpoint, distributed_config=config, dtype=torch.float32, **keywords)


def expert_lora_refusal(model) -> str:
    from modeling_deepseek_v3.lora import prepare_lora_config

    try:
        prepare_lora_config(model, lora_config(target_parameters=EXPERT_TARGETS))
    except ValueError as error:
        return str(error)
    return "accepted"


def run(checkpoint: str, out: str, name: str) -> dict:
    ids = half(global_batch())
    if name == "lora":
        from peft import get_peft_model

        from modeling_deepseek_v3.lora import prepare_lora_config

        model = load(checkpoint)
        result = {"refusal": expert_lora_refusal(model)}
        torch.manual_seed(0)
        peft_model = get_peft_model(model, prepare_lora_config(model, lora_config())).train()
        output = peft_model(ids, labels=ids)
        output.loss.backward()
        result["logits"] = output.logits.detach()
        result["grads"] = {n: p.grad.clone() for n, p in peft_model.named_parameters() if "lora_" in n}
        # every rank saves (the state dict of the sharded base is collective), each to its own folder
        peft_model.save_pretrained(os.path.join(out, f"adapter.rank{dist.get_rank()}"))
        return result
    if name == "lora_tp2":
        return {"refusal": expert_lora_refusal(load(checkpoint, sizes=dict(tp_size=2)))}
    if name == "generate":
        model = load(checkpoint).eval()
        keywords = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
        return {"dynamic": model.generate(half(prompts()), **keywords),
                "static": model.generate(half(prompts()), cache_implementation="static", **keywords)}
    if name == "seq_cls":
        model = load(checkpoint, AutoModelForSequenceClassification, num_labels=3).train()
        output = model(ids, labels=half(LABELS))
        output.loss.backward()
        return {"logits": output.logits.detach(), "loss": mean_over_ranks(output.loss), "score": full(model.score.weight),
                "grads": grads(model)}
    if name == "fsdp_mtp":
        model = load(checkpoint, sizes=dict(fsdp_size=2)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        losses = []
        for _ in range(STEPS):
            optimizer.zero_grad()
            output = model(ids, labels=ids)
            output.loss.backward()
            losses.append(mean_over_ranks(output.loss))
            optimizer.step()
            model.update_expert_bias()
        return {"losses": losses, "params": {n: full(p) for n, p in model.named_parameters()},
                "biases": {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}}
    if name == "checkpointing":
        model = load(checkpoint).train()
        model.gradient_checkpointing_enable()
        output = model(ids, labels=ids)
        output.loss.backward()
        return {"loss": mean_over_ranks(output.loss), "grads": grads(model)}
    if name == "padded":
        model = load(checkpoint).train()
        padded, mask, labels = (half(t) for t in padded_batch())
        output = model(padded, attention_mask=mask, labels=labels)
        output.loss.backward()
        return {"loss": mean_over_ranks(output.loss), "grads": grads(model)}
    if name == "process_group":
        model = load(checkpoint).train()
        with torch.no_grad():
            model(ids)
        stats = model.update_expert_bias(process_group=dist.new_group([0, 1]))
        model.eval()
        with torch.no_grad():
            model(ids)
        eval_stats = model.update_expert_bias()
        return {"load": stats.load, "eval_load": eval_stats.load,
                "biases": {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}}
    raise ValueError(f"unknown scenario {name!r}")


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
