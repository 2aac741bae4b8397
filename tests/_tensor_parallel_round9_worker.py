"""One rank of ``test_tensor_parallel_round9.py``'s multi-process tests, started by ``torchrun``.

``python -m torch.distributed.run --nproc-per-node 2 _tensor_parallel_round9_worker.py CHECKPOINT OUT SCENARIO...``
loads the checkpoint split by transformers' engine (``DistributedConfig(tp_size=2)`` unless said otherwise), runs it
on the whole ``batch()`` (the ranks of a tensor-parallel group share a batch), and writes what the test compares
against one process into ``OUT/SCENARIO.rank{r}.pt``.

Scenarios:

- ``forward``: training-mode logits, loss and the gathered gradients of one backward.
- ``generate``: greedy decoding with dynamic and static caches, of left-padded prompts, and MTP self-speculative
  decoding (``use_mtp=True``).
- ``mla_modes``: eval logits and greedy decoding with ``config.mla_mode`` set to each of ``MLA_MODES`` in turn.
- ``tp_ep`` (``tp_size=2, ep_size=2``): as ``forward``, the routed experts split by experts, attention by heads.
- ``lora``: the messages of ``prepare_lora_config`` for the targets tensor parallelism splits in a way PEFT's LoRA
  layer does not follow (``REFUSED_TARGETS``), then LoRA on the ones it does (``LORA_TARGETS``, random adapters):
  the adapters' whole values, logits, loss and gathered adapter gradients; each rank saves the adapter to
  ``OUT/adapter.rank{r}``.
- ``save`` (``tp_size=2``) and ``save_tp_ep`` (``tp_size=2, ep_size=2``): ``save_pretrained`` into ``OUT/<scenario>``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import modeling_deepseek_v3  # noqa: F401  (registers our classes with the Auto factories)
from _expert_parallel_worker import run_scenarios  # the script's folder (tests/) is on sys.path
from transformers import AutoModelForCausalLM, DistributedConfig

MAX_NEW_TOKENS = 6
MLA_MODES = ("expanded", "absorbed", "auto")
LORA_TARGETS = ["q_a_proj", "q_b_proj", "kv_b_proj", "embed_tokens", "eh_proj"]
# {name of the check: LoraConfig targets} refused under tensor parallelism
REFUSED_TARGETS = {
    "o_proj": dict(target_modules=["o_proj"]),
    "kv_a_proj_with_mqa": dict(target_modules=["kv_a_proj_with_mqa"]),
    "lm_head": dict(target_modules=["lm_head"]),
    "all-linear": dict(target_modules="all-linear"),
    "dense weight": dict(target_parameters=["model.layers.0.mlp.gate_proj.weight"]),
}
SIZES = {"tp_ep": dict(tp_size=2, ep_size=2), "save_tp_ep": dict(tp_size=2, ep_size=2)}


def batch() -> torch.Tensor:
    return torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(3))


def prompts() -> torch.Tensor:
    return batch()[:, :5]


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts()`` with the second row left-padded by 2 tokens."""
    ids = prompts().clone()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def lora_config(**targets):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **(targets or {"target_modules": LORA_TARGETS}))


def full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def load(checkpoint: str, name: str):
    config = DistributedConfig(ep_implementation="all_to_all", **SIZES.get(name, dict(tp_size=2)))
    return AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=config, dtype=torch.float32)


def greedy(model, ids, **keywords):
    return model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0, **keywords)


def backward(model) -> dict:
    ids = batch()
    output = model(ids, labels=ids)
    output.loss.backward()
    return {"logits": full(output.logits), "loss": output.loss.item(),
            "grads": {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}}


def refusal(model, targets: dict) -> str:
    from modeling_deepseek_v3.lora import prepare_lora_config

    try:
        prepare_lora_config(model, lora_config(**targets))
    except ValueError as error:
        return str(error)
    return "accepted"


def run(checkpoint: str, out: str, name: str) -> dict:
    model = load(checkpoint, name)
    if name in ("forward", "tp_ep"):
        return backward(model.train())
    if name == "generate":
        model.eval()
        padded, mask = padded_prompts()
        return {"dynamic": greedy(model, prompts()), "static": greedy(model, prompts(), cache_implementation="static"),
                "mtp": greedy(model, prompts()[:1], use_mtp=True), "padded": greedy(model, padded, attention_mask=mask)}
    if name == "mla_modes":
        model.eval()
        result = {}
        for mode in MLA_MODES:
            model.config.mla_mode = mode  # read at every forward
            with torch.no_grad():
                result[mode] = {"logits": full(model(batch()).logits), "tokens": greedy(model, prompts())}
        return result
    if name == "lora":
        from peft import get_peft_model

        from modeling_deepseek_v3.lora import prepare_lora_config

        model.train()
        result = {"refusals": {check: refusal(model, targets) for check, targets in REFUSED_TARGETS.items()}}
        torch.manual_seed(0)
        peft_model = get_peft_model(model, prepare_lora_config(model, lora_config()))
        result["adapters"] = {n: full(p) for n, p in peft_model.named_parameters() if "lora_" in n}
        result.update(backward(peft_model))
        result["grads"] = {n: g for n, g in result["grads"].items() if "lora_" in n}
        peft_model.save_pretrained(os.path.join(out, f"adapter.rank{dist.get_rank()}"))
        return result
    if name in ("save", "save_tp_ep"):
        model.save_pretrained(os.path.join(out, name))
        return {}
    raise ValueError(f"unknown scenario {name!r}")


def main() -> None:
    run_scenarios(run)


if __name__ == "__main__":
    main()
