"""One rank of ``test_accelerate_parallel_round11.py``: training through accelerate's own parallelism (its DDP and
its FSDP plugin, not transformers' DistributedConfig), started by ``torchrun`` on gloo CPU ranks.

``python -m torch.distributed.run --nproc-per-node 2 _accelerate_parallel_round11_worker.py CHECKPOINT OUT SCENARIO...``
runs each scenario on this rank's half of the global batch and saves what the test compares against one process
(``OUT/<scenario>.rank<r>.pt``, see ``_expert_parallel_worker.run_scenarios``).

accelerate turns its FSDP plugin on for accelerator devices only: on CPU processes (``MULTI_CPU``) it ignores the
plugin and trains with DDP. ``CPUFSDPAccelerator`` sets the state it would have set on GPUs, so that the same code
path (``fully_shard`` / FSDP1 wrapping, the plugin's auto-wrap policy, its state-dict saves) runs over gloo.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
import torch.distributed as dist
import transformers
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _expert_parallel_worker import run_scenarios  # noqa: E402
from modeling_deepseek_v3 import ExpertBiasUpdateCallback, compat, update_expert_bias  # noqa: E402  (registers the Auto classes)
from modeling_deepseek_v3.training import routers  # noqa: E402

STEPS = 2
LR = 1e-3


def global_batch() -> torch.Tensor:
    """4 sequences of 12 tokens, no padding: each of the 2 ranks gets 2."""
    return torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(7))


def trainer_data() -> list[dict]:
    ids = torch.randint(1, 97, (16, 12), generator=torch.Generator().manual_seed(8))
    return [{"input_ids": row, "labels": row} for row in ids]


class CPUFSDPAccelerator(Accelerator):
    """An Accelerator that honours its FSDP plugin on CPU processes (see the module docstring)."""

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState re-reads it
            # MULTI_CPU's device is `cpu:<local rank>`, which FSDP1 compares with the parameters' `cpu` and refuses
            self.state.device = PartialState._shared_state["device"] = torch.device("cpu")


def full(tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()


def canonical(name: str) -> str:
    # DDP's `module.`, FSDP1's `_fsdp_wrapped_module.`, activation checkpointing's `_checkpoint_wrapped_module.`
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name.removeprefix("module.")


def biases(model) -> dict:
    return {canonical(n): r.e_score_correction_bias.detach().clone() for n, r in routers(model).items()}


def plugin(version: int = 2, **fields) -> FullyShardedDataParallelPlugin:
    return FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap", **fields)


LOOP_PLUGINS = {
    "ddp": None,
    "fsdp2": dict(version=2),
    "fsdp1": dict(version=1, use_orig_params=True),
    "fsdp2_ac": dict(version=2, activation_checkpointing=True),
    "fsdp2_ram_efficient": dict(version=2, cpu_ram_efficient_loading=True),
}
LOAD_KEYWORDS = {"ddp_fp8": dict(quantizer="fp8_block", fp8_mode="train")}


def run_loop(checkpoint: str, name: str) -> dict:
    """A plain accelerate loop: one forward/backward (loss, its parts, gathered gradients), then STEPS AdamW steps
    each followed by the bias update (parameters, biases)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    fields = dict(LOOP_PLUGINS[name]) if LOOP_PLUGINS.get(name) is not None else None
    if fields is not None and fields.pop("cpu_ram_efficient_loading", False):
        # what `accelerate launch` sets for `fsdp_cpu_ram_efficient_loading: true`: from_pretrained then loads the
        # weights on rank 0 only, and the plugin broadcasts them when it shards
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
        fields["cpu_ram_efficient_loading"] = True
    fsdp = plugin(**fields) if fields is not None else None
    accelerator = CPUFSDPAccelerator(
        cpu=True, fsdp_plugin=fsdp, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
    )
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, **LOAD_KEYWORDS.get(name, {})).train()
    if name == "fsdp2_ram_efficient" and dist.get_rank() != 0:
        # only rank 0's weights count: the plugin broadcasts them (router biases included) when it shards
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(1.0)
            for router in routers(model).values():
                router.e_score_correction_bias.zero_()
    for key in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        os.environ.pop(key, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    ids = global_batch()[2 * rank : 2 * rank + 2]
    result = {"rank": rank, "distributed_type": str(accelerator.distributed_type), "biases_at_start": biases(model)}
    result["checkpointed"] = sorted(canonical(n) for n, m in model.named_modules() if compat.checkpoint_wrapped(m))
    result["units"] = sorted(canonical(n) for n, m in model.named_modules() if type(m).__name__.startswith("FSDP") or type(m).__name__ == "FullyShardedDataParallel")
    output = model(ids, labels=ids)
    accelerator.backward(output.loss)
    for part in ("loss", "aux_loss", "mtp_loss"):
        result[part] = float(accelerator.reduce(getattr(output, part).detach(), reduction="mean"))
    result["grads"] = {canonical(n): full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    if name == "fsdp1":
        # FSDP1 keeps each rank's shard of the flat parameter: the gradients come from the full state below
        result["grads"] = {}
    optimizer.step()
    result["loads"] = {canonical(n): l.clone() for n, l in update_expert_bias(model).load.items()}
    for _ in range(STEPS - 1):
        optimizer.zero_grad()
        accelerator.backward(model(ids, labels=ids).loss)
        optimizer.step()
        update_expert_bias(model)
    result["params"] = full_parameters(accelerator, model)
    result["biases"] = biases(model)
    return result


def full_parameters(accelerator, model) -> dict:
    if name_of_fsdp1(accelerator):
        # FSDP1's own full state dict (rank0_only, offloaded to the CPU) crashes on CPU processes; its parameters,
        # summoned whole on every rank, are the same values
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            return {canonical(n): p.detach().clone() for n, p in model.named_parameters()}
    return {canonical(n): full(p) for n, p in model.named_parameters()}


def name_of_fsdp1(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2


def trainer_args(output_dir: str, state_dict_type: str | None, batch_size: int = 2) -> TrainingArguments:
    fsdp = {} if state_dict_type is None else dict(
        fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2, "state_dict_type": state_dict_type}
    )
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=TRAINER_STEPS, save_steps=2,
        learning_rate=LR, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,  # accelerate needs a process group for a backend
        disable_tqdm=True, **fsdp,
    )


def train(checkpoint: str, output_dir: str, state_dict_type: str | None, resume: str | None = None, batch_size: int = 2):
    """transformers.Trainer with the bias callback; its model's parameters and biases once it has trained."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    trainer = Trainer(model=model, args=trainer_args(output_dir, state_dict_type, batch_size),
                      train_dataset=trainer_data(), callbacks=[ExpertBiasUpdateCallback()])
    trainer.train(resume_from_checkpoint=resume)
    if state_dict_type is not None and resume is None:
        # the official layout from an FSDP Trainer: a full state dict (a sharded one is saved by save_model as nothing)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(os.path.join(output_dir, "final"))
    return {"distributed_type": str(trainer.accelerator.distributed_type),
            "params": {canonical(n): full(p) for n, p in trainer.model.named_parameters()},
            "biases": biases(trainer.model)}


TRAINER_STEPS = 4
TRAINER_SCENARIOS = {"trainer_ddp": None, "trainer_full": "FULL_STATE_DICT", "trainer_sharded": "SHARDED_STATE_DICT"}


def run_trainer(checkpoint: str, out: str, name: str) -> dict:
    """Train TRAINER_STEPS steps, saving a checkpoint every 2; then train again from the middle checkpoint."""
    output_dir = os.path.join(out, name)
    state_dict_type = TRAINER_SCENARIOS[name]
    result = {"whole": train(checkpoint, output_dir, state_dict_type)}  # the Trainer starts the process group
    result["checkpoint_files"] = sorted(os.listdir(os.path.join(output_dir, "checkpoint-2")))
    resumed = os.path.join(out, name + "_resumed")
    if dist.get_rank() == 0:
        shutil.copytree(output_dir, resumed)  # the resumed run writes its checkpoints beside the first run's
    dist.barrier()
    result["resumed"] = train(checkpoint, resumed, state_dict_type, resume=os.path.join(resumed, "checkpoint-2"))
    return result


def run(checkpoint: str, out: str, name: str) -> dict:
    if name in TRAINER_SCENARIOS:
        return run_trainer(checkpoint, out, name)
    return run_loop(checkpoint, name)


if __name__ == "__main__":
    transformers.trainer.Accelerator = CPUFSDPAccelerator  # the Trainer builds its accelerator from its fsdp_config
    run_scenarios(run)
