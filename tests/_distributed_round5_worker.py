"""One rank of ``test_distributed_round5.py``'s multi-process tests, started by ``torchrun``.

``python -m torch.distributed.run --nproc-per-node 2 _distributed_round5_worker.py OUT SCENARIO=CHECKPOINT[,ARG...]...``
runs each scenario in turn in one launch (a launch costs each rank seconds of imports): it loads the scenario's
checkpoint sharded as the scenario says and writes what the test compares against one process (or between the
ranks) into ``OUT/SCENARIO.rank{r}.pt``.

Scenarios:

- ``mtp_generate_eos EOS0 EOS1`` (EP 2 × FSDP 2): greedy MTP self-speculative decoding of rank r's own prompt
  (``prompt(r)``) with ``eos_token_id=EOS_r``, so that one rank finishes before the other (``synced_gpus``, which
  generate turns on for an FSDP-managed model, keeps the finished rank in the forwards).
- ``new_head_tp2`` (TP 2): a sequence-classification model over the causal-LM checkpoint, whose ``score`` head
  from_pretrained initialises; the head and the logits of the batch both ranks share.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import modeling_deepseek_v3  # noqa: F401  (registers our classes with the Auto factories)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DistributedConfig

MAX_NEW_TOKENS = 6


def prompt(rank: int) -> torch.Tensor:
    return torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(100 + rank))


def generate(model, rank: int, eos: int, return_dict: bool = False):
    return model.generate(prompt(rank), max_new_tokens=MAX_NEW_TOKENS, do_sample=False, use_mtp=True, eos_token_id=eos,
                          pad_token_id=0, return_dict_in_generate=return_dict)


def run(out: str, name: str, checkpoint: str, *args: str) -> None:
    result = {}
    if name == "new_head_tp2":
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, num_labels=3, distributed_config=DistributedConfig(tp_size=2), dtype=torch.float32
        ).eval()
        result["score"] = model.score.weight.detach().clone()
        with torch.no_grad():
            result["logits"] = model(prompt(0)).logits
    if name == "mtp_generate_eos":
        distributed_config = DistributedConfig(ep_size=2, fsdp_size=2, ep_implementation="all_to_all")
        model = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=distributed_config, dtype=torch.float32)
        model.eval()
        eos = int(args[dist.get_rank()])  # the process group exists once the engine has loaded the model
        result["sequences"] = generate(model, dist.get_rank(), eos)
        result["dict_sequences"] = generate(model, dist.get_rank(), eos, return_dict=True).sequences
    torch.save(result, os.path.join(out, f"{name}.rank{dist.get_rank()}.pt"))


def main() -> None:
    out, *scenarios = sys.argv[1:]
    torch.set_num_threads(1)
    for scenario in scenarios:
        name, arguments = scenario.split("=", 1)
        run(out, name, *arguments.split(","))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
