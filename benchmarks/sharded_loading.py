"""Host memory per rank while transformers' distributed engine loads a many-shard checkpoint: ours and transformers'
own ``DeepseekV3ForCausalLM`` on the same folder.

    python benchmarks/sharded_loading.py --ranks 1,2,4 --out benchmarks/out

The script writes one checkpoint in the official per-expert layout, split into many safetensors shards
(``--max-shard-size``), then for each rank count N starts ``torchrun --nproc-per-node N`` on itself (N = 1: one plain
process, no distributed config). Every rank loads the folder with ``DistributedConfig(ep_size=N, fsdp_size=N)``: the
model is built on the meta device, and each rank materialises only what it keeps (its EP block of the routed experts,
its FSDP2 shard of everything else).

Measured on each rank, from just before ``from_pretrained`` to its return (the import of everything the load uses
happens before the baseline):

- peak host memory: the peak of the process's anonymous resident memory (``RssAnon`` of ``/proc/self/status``),
  sampled every half millisecond by a thread, minus its value before the load. A spike shorter than the sampling
  period can be missed; the value after the load is recorded too.
- file pages mapped: the same for ``RssFile`` (safetensors are read through ``mmap``, so this counts the checkpoint
  pages the rank touched, plus a little code paged in while loading).
- kept: the bytes of the rank's local parameters and buffers after the load (of a DTensor, its local shard).

Linux only (``/proc``). A CPU run over gloo; the numbers are host memory, which is what loading costs before any
weight reaches a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from modeling_deepseek_v3.cli import positive, positive_ints

# a model whose bytes are mostly routed experts (as the real one's are): 3 MoE layers + 1 MTP module of 16 experts
CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
    qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, n_group=4,
    topk_group=2, num_experts_per_tok=4, num_nextn_predict_layers=1, max_position_embeddings=512, rope_scaling=None,
    rope_theta=10000.0, pad_token_id=0, bos_token_id=None, eos_token_id=None,
)
# row -> (ours?, from_pretrained keywords); transformers' class drops the MTP module's weights, so "ours, no MTP" is
# the like-for-like row
IMPLEMENTATIONS = {
    "ours": (True, {}),
    "ours, no MTP": (True, {"num_nextn_predict_layers": 0}),
    "transformers": (False, {}),
}


# --- one rank ------------------------------------------------------------------------------------------------------


def resident(field: str) -> int:
    """``RssAnon`` or ``RssFile`` of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class PeakSampler:
    """Samples RssAnon and RssFile on a thread until stopped; the peaks, relative to the values at start."""

    def __init__(self, period_s: float = 0.0005):
        self.base = {f: resident(f) for f in ("RssAnon", "RssFile")}
        self.peak = dict(self.base)
        self.period_s, self.running = period_s, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for field in self.peak:
                self.peak[field] = max(self.peak[field], resident(field))
            time.sleep(self.period_s)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {f: self.peak[f] - self.base[f] for f in self.peak} | {"after": resident("RssAnon") - self.base["RssAnon"]}


def file_stem(implementation: str) -> str:
    return implementation.replace(", ", "_").replace(" ", "_")


def local_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    tensors = list(model.parameters()) + list(model.buffers())
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def worker(args) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig
    from transformers import DeepseekV3ForCausalLM as TransformersDeepseekV3

    import modeling_deepseek_v3  # noqa: F401  (registers our classes with the Auto factories)

    torch.set_num_threads(1)
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    placement = {}
    if ranks > 1:
        dist.init_process_group("gloo")
        placement = {"distributed_config": DistributedConfig(ep_size=ranks, fsdp_size=ranks, ep_implementation="all_to_all")}
    is_ours, keywords = IMPLEMENTATIONS[args.implementation]
    model_class = AutoModelForCausalLM if is_ours else TransformersDeepseekV3
    if ranks > 1:
        dist.barrier()
    sampler = PeakSampler()
    model = model_class.from_pretrained(args.checkpoint, dtype=torch.float32, **placement, **keywords)
    memory = sampler.stop()
    rank = dist.get_rank() if ranks > 1 else 0
    result = {"rank": rank, "peak_anon": memory["RssAnon"], "peak_file": memory["RssFile"], "after_anon": memory["after"],
              "kept": local_bytes(model)}
    Path(args.result_dir, f"{file_stem(args.implementation)}.{ranks}.rank{rank}.json").write_text(json.dumps(result))
    if ranks > 1:
        dist.destroy_process_group()


# --- the launcher --------------------------------------------------------------------------------------------------


def launch(args, implementation: str, ranks: int, checkpoint: str, result_dir: str) -> list[dict]:
    entry = [__file__, "--worker", "--implementation", implementation, "--checkpoint", checkpoint, "--result-dir", result_dir]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", str(ranks)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([*launcher, *entry], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{implementation} on {ranks} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [json.loads(Path(result_dir, f"{file_stem(implementation)}.{ranks}.rank{r}.json").read_text()) for r in range(ranks)]


def markdown(rows: list[dict], environment: dict) -> str:
    mib = 2**20
    lines = [
        f"Device: {environment['device']}; {environment['cores']} CPU cores; torch {environment['torch']}, "
        f"transformers {environment['transformers']}; checkpoint {environment['checkpoint_bytes'] / mib:.1f} MiB fp32 in "
        f"{environment['shards']} shards (hidden {environment['config']['hidden_size']}, "
        f"{environment['config']['n_routed_experts']} experts × {environment['config']['num_hidden_layers'] - 1} MoE "
        f"layers + {environment['config']['num_nextn_predict_layers']} MTP); DistributedConfig(ep_size=N, fsdp_size=N).",
        "",
        "| implementation | ranks | kept per rank (MiB, max) | peak host memory per rank (MiB, max) | peak / checkpoint "
        "| after load (MiB, max) | file pages mapped per rank (MiB, max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['implementation']} | {row['ranks']} | {row['kept'] / mib:.1f} | {row['peak_anon'] / mib:.1f} | "
            f"{row['peak_anon'] / environment['checkpoint_bytes']:.2f} | {row['after_anon'] / mib:.1f} | {row['peak_file'] / mib:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=positive_ints, default=positive_ints("1,2,4"), help="rank counts to load with (each divides the expert count)")
    parser.add_argument("--implementations", default=";".join(IMPLEMENTATIONS), help="';'-separated rows")
    parser.add_argument("--hidden-size", type=positive(int), default=CONFIG["hidden_size"])
    parser.add_argument("--n-routed-experts", type=positive(int), default=CONFIG["n_routed_experts"])
    parser.add_argument("--max-shard-size", default="4MB")
    parser.add_argument("--out", type=Path)
    # worker side
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--implementation", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import transformers

    from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    config = dict(CONFIG, hidden_size=args.hidden_size, moe_intermediate_size=args.hidden_size,
                  n_routed_experts=args.n_routed_experts)
    rank_counts = args.ranks
    implementations = args.implementations.split(";")
    for ranks in rank_counts:
        if config["n_routed_experts"] % ranks:
            sys.exit(f"--ranks: {ranks} does not divide --n-routed-experts {config['n_routed_experts']}")
    for name in implementations:
        if name not in IMPLEMENTATIONS:
            sys.exit(f"--implementations: unknown {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "checkpoint")
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config(**config)).save_pretrained(checkpoint, max_shard_size=args.max_shard_size)
        shards = sorted(Path(checkpoint).glob("*.safetensors"))
        environment = {"device": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "transformers": transformers.__version__, "config": config,
                       "shards": len(shards), "checkpoint_bytes": sum(s.stat().st_size for s in shards)}
        for name in implementations:
            for ranks in rank_counts:
                per_rank = launch(args, name, ranks, checkpoint, folder)
                row = {"implementation": name, "ranks": ranks, "per_rank": per_rank}
                row.update({key: max(r[key] for r in per_rank) for key in ("kept", "peak_anon", "after_anon", "peak_file")})
                rows.append(row)
    table = markdown(rows, environment)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sharded_loading.md").write_text(table)
        (args.out / "sharded_loading.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
