"""Train DeepSeek-V3 over several processes with transformers.Trainer on transformers' distributed engine.

The model is loaded with ``from_pretrained(..., distributed_config=DistributedConfig(...))``: the routed experts are
split over ``--ep-size`` ranks (tokens reach them by all-to-all), every other weight is FSDP2-sharded over
``--fsdp-size`` ranks (replicated ``--dp-replicate-size`` times), the attention heads and dense MLPs optionally
split ``--tp-size`` ways (on GPUs: accelerate, under the Trainer, runs tensor parallelism on GPU-type devices only).
The paper's training rides along: ``ExpertBiasUpdateCallback`` sums the per-expert loads over every rank once per
optimizer step, so the routing biases move as one process's would on the whole batch; the sequence-wise balance
loss and the MTP loss are part of the model's loss.

    torchrun --standalone --nproc-per-node 4 examples/train_distributed.py --ep-size 2 --fsdp-size 2 --dp-replicate-size 2
    accelerate launch --config_file examples/accelerate_distributed.yaml examples/train_distributed.py --ep-size 2 --fsdp-size 2

Without a launcher (all sizes 1) it trains in one process on the same global batches, which is what the
multi-process run must reproduce. On CPUs the ranks talk over gloo, on GPUs over NCCL. ``--checkpoint`` defaults to
the embedded tiny model (built once, seeded, under ``--output-dir/init``). At the end the model is saved, in the
official per-expert layout, to ``--output-dir/final`` (every rank takes part in gathering the shards, one writes).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, ByT5Tokenizer, DistributedConfig, Trainer, TrainingArguments

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, ExpertBiasUpdateCallback
from modeling_deepseek_v3.cli import non_negative, positive
from modeling_deepseek_v3.demo import DEFAULTS, TextBlocks


DEFAULT_BIAS_UPDATE_SPEED = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="model folder (default: the embedded tiny model, built under --output-dir/init)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/train_distributed"))
    parser.add_argument("--ep-size", type=positive(int), default=1, help="ranks the routed experts are split over")
    parser.add_argument("--fsdp-size", type=positive(int), default=1, help="ranks the other weights are FSDP2-sharded over")
    parser.add_argument("--dp-replicate-size", type=positive(int), default=1, help="FSDP replicas (HSDP), e.g. the number of nodes")
    parser.add_argument("--tp-size", type=positive(int), default=1, help="ranks MLA heads, dense MLPs and shared experts are split over (they share a batch)")
    parser.add_argument("--steps", type=positive(int), default=20)
    parser.add_argument("--global-batch-size", type=positive(int), default=8, help="sequences per micro-batch over all ranks")
    parser.add_argument("--grad-accum", type=positive(int), default=1)
    parser.add_argument("--block-size", type=positive(int), default=64)
    parser.add_argument("--learning-rate", type=positive(float), default=1e-3)
    parser.add_argument("--bias-update-speed", type=non_negative(float), default=None,
                        help="γ (default: the --checkpoint's router_bias_update_speed; 0.01 for the embedded model, the "
                             "paper uses 0.001 over many more steps)")
    args = parser.parse_args(argv)
    tokens = len(ByT5Tokenizer()((DEFAULTS / "tiny_corpus.txt").read_text(encoding="utf-8"))["input_ids"])
    if not 2 <= args.block_size < tokens:
        parser.error(f"argument --block-size: must be at least 2 (a block predicts each next token) and below the "
                     f"embedded text's {tokens} tokens, got {args.block_size}")
    # named here, before a process group and a sharded load, rather than after them
    dp_size = args.dp_replicate_size * args.fsdp_size
    if args.global_batch_size % dp_size:
        parser.error(
            f"argument --global-batch-size: {args.global_batch_size} must split evenly over the {dp_size} data-parallel "
            f"ranks (--dp-replicate-size {args.dp_replicate_size} × --fsdp-size {args.fsdp_size})"
        )
    if args.tp_size > 1 and not torch.cuda.is_available():
        # Trainer hands a tensor-parallel model to accelerate with a ParallelismConfig (so the ranks of a TP group get
        # the same batch), which accelerate takes on GPU-type devices only: CPU processes fail in Trainer(...)
        parser.error(
            f"argument --tp-size: {args.tp_size} needs GPUs here: transformers.Trainer passes a tensor-parallel model to "
            "accelerate, which runs tensor parallelism on GPU-type devices only, not on CPU processes (gloo). On CPUs "
            "use --ep-size/--fsdp-size/--dp-replicate-size, or a plain training loop for TP (as "
            "tests/_expert_parallel_worker.py)"
        )
    if args.output_dir.exists() and not args.output_dir.is_dir():
        parser.error(f"argument --output-dir: {args.output_dir} is a file, not a folder")
    return args


def start_processes(backend: str | None = None) -> int:
    """Join the launcher's process group (torchrun / accelerate set WORLD_SIZE); the world size, 1 without one."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_world_size() if dist.is_initialized() else 1


def initial_checkpoint(folder: Path, bias_update_speed: float) -> str:
    """The embedded tiny model, seeded, saved once by rank 0 (the others wait for it)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            config = DeepseekV3Config.from_json_file(DEFAULTS / "tiny_config.json")
            config.router_bias_update_speed = bias_update_speed
            DeepseekV3ForCausalLM(config).save_pretrained(folder)
    if dist.is_initialized():
        dist.barrier()
    return str(folder)


def config_overrides(args: argparse.Namespace) -> dict:
    """The config fields the command line sets on the loaded checkpoint. A γ given overrides the checkpoint's (a
    --checkpoint of one's own, or an init folder an earlier run built): the bias callback reads the config's value."""
    return {} if args.bias_update_speed is None else {"router_bias_update_speed": args.bias_update_speed}


def main() -> None:
    args = parse_args()
    world = start_processes()
    sizes = dict(ep_size=args.ep_size, fsdp_size=args.fsdp_size, dp_replicate_size=args.dp_replicate_size, tp_size=args.tp_size)
    distributed_config = DistributedConfig(ep_implementation="all_to_all", **sizes)
    speed = DEFAULT_BIAS_UPDATE_SPEED if args.bias_update_speed is None else args.bias_update_speed
    checkpoint = args.checkpoint or initial_checkpoint(args.output_dir / "init", speed)
    # all sizes 1: one unsharded process; sizes that do not fit the launch fail here, naming them
    model = AutoModelForCausalLM.from_pretrained(checkpoint, distributed_config=distributed_config, dtype=torch.float32,
                                                 **config_overrides(args))
    text = (DEFAULTS / "tiny_corpus.txt").read_text(encoding="utf-8")
    dataset = TextBlocks(ByT5Tokenizer()(text)["input_ids"], args.block_size, args.block_size // 2)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.global_batch_size // distributed_config.dp_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        # the same batches in the same order whatever the number of ranks: rank i of step k gets the i-th slice
        train_sampling_strategy="sequential",
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),  # on CPUs accelerate joins the launch only when told so (gloo)
    )
    callback = ExpertBiasUpdateCallback()
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    trainer.save_model(str(args.output_dir / "final"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        print(f"{world} process(es), {sizes}: loss {logged[0]['loss']:.4f} -> {logged[-1]['loss']:.4f}, "
              f"MaxVio averaged over layers {logged[0]['max_vio_mean']:.3f} -> {logged[-1]['max_vio_mean']:.3f}")
        print(f"saved {args.output_dir / 'final'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
