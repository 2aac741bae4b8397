"""A plain accelerate training loop for DeepSeek-V3 (no Trainer): gradient accumulation, the MTP objective and
the aux-loss-free bias update once per optimizer step. Runs as one process, or data-parallel under
`torchrun --nproc_per_node 2` / `accelerate launch` (see launch_2proc.sh): `update_expert_bias` all-reduces the
expert loads, so every rank applies the same bias step.

    python examples/train_accelerate.py --steps 20
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, update_expert_bias
from modeling_deepseek_v3.cli import positive


def _corpus_ids() -> torch.Tensor:
    text = resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_corpus.txt").read_bytes()
    return torch.tensor(list(text)) + 2


def batches(seq_len: int, batch_size: int):
    """Endless batches of byte tokens (+2: ids 0 and 1 are pad and eos) from the embedded text."""
    ids = _corpus_ids()
    windows = torch.stack([ids[i : i + seq_len] for i in range(0, len(ids) - seq_len, seq_len // 2)])
    if len(windows) < batch_size:
        # only whole batches are drawn: with fewer windows than one batch the loop below would wait forever
        raise ValueError(
            f"--batch-size × processes = {batch_size} sequences, but the embedded text gives only {len(windows)} "
            f"windows of --seq-len {seq_len}; lower either."
        )
    generator = torch.Generator().manual_seed(0)
    while True:
        for order in torch.randperm(len(windows), generator=generator).split(batch_size):
            if len(order) == batch_size:
                yield windows[order]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive(int), default=20)
    parser.add_argument("--seq-len", type=positive(int), default=64)
    parser.add_argument("--batch-size", type=positive(int), default=4, help="per process and micro-batch")
    parser.add_argument("--grad-accum", type=positive(int), default=2)
    args = parser.parse_args(argv)
    tokens = len(_corpus_ids())
    if not 2 <= args.seq_len < tokens:
        # a window advances by seq_len // 2 and must leave a token after it
        parser.error(f"argument --seq-len: must be at least 2 and below the embedded text's {tokens} tokens, got {args.seq_len}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)

    # Experts that receive no token in a micro-batch get no gradient: DDP must be told to expect that.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # without a GPU, multi-process runs as MULTI_CPU on gloo
        gradient_accumulation_steps=args.grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(0)  # same initial weights on every rank
    fields = json.loads(resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_config.json").read_text())
    fields["router_bias_update_speed"] = 0.01
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)

    data = batches(args.seq_len, args.batch_size * accelerator.num_processes)
    step = 0
    while step < args.steps:
        batch = next(data)
        # each rank trains on its own slice of the global micro-batch
        ids = batch.chunk(accelerator.num_processes)[accelerator.process_index].to(accelerator.device)
        with accelerator.accumulate(model):
            out = model(input_ids=ids, labels=ids)  # loss = CE + λ·mtp_loss + aux_loss
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:  # an optimizer step happened: one bias update for all its micro-batches
            stats = update_expert_bias(model)
            step += 1
            loss = accelerator.reduce(out.loss.detach(), reduction="mean")
            bias = next(iter(stats.load))
            accelerator.print(
                f"step {step:3d}  loss {loss.item():.3f}  mtp_loss {out.mtp_loss.item():.3f}  "
                f"MaxVio mean {stats.mean_max_vio:.2f} max {stats.max_max_vio:.2f}  ({bias} load {stats.load[bias].tolist()})"
            )
    # the biases are identical on every rank: the update used the all-reduced loads
    unwrapped = accelerator.unwrap_model(model)
    biases = torch.cat([b for n, b in unwrapped.named_buffers() if n.endswith("e_score_correction_bias")])
    gathered = accelerator.gather(biases.unsqueeze(0))
    accelerator.print(f"biases identical on all {accelerator.num_processes} rank(s): {bool((gathered == gathered[0]).all())}")


if __name__ == "__main__":
    main()
