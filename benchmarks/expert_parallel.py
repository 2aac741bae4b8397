"""Expert parallelism on transformers' distributed engine: what the all-to-all moves, how far tokens fan out, and
the training-step time against the EP size — ours and transformers' own ``DeepseekV3ForCausalLM`` on the same weights.

    python benchmarks/expert_parallel.py --ep-sizes 1,2,4 --out benchmarks/out     # CPU ranks over gloo
    python benchmarks/expert_parallel.py --ep-sizes 1,2,4,8 --device cuda          # NCCL, one GPU per rank

For each EP size the script starts ``torchrun --nproc-per-node EP`` on itself: every rank loads the same checkpoint
(official layout, written once) with ``DistributedConfig(ep_size=EP, fsdp_size=EP)``, takes its slice of one global
batch and trains (forward, backward, AdamW; ours adds the bias update) for ``--warmup`` + ``--steps`` steps.

- Bytes per token per MoE layer: the token exchange is transformers' ``AllToAllEP``, registered again under
  ``all_to_all_recorded`` with its dispatch recording the split sizes it sends. One row goes out per (token, expert)
  pair, also to the sender's own rank, and comes back in the combine, so the formula is
  ``top_k × hidden × bytes × 2``; the table also shows the bytes that leave the rank (pairs to other ranks), and what
  a dispatch sending each token once per destination rank would move (``distinct ranks × hidden × bytes × 2``).
- Fan-out: the histogram of how many EP ranks a token's experts lie on (a hook on every experts module reads the
  router's choices), with the bound group-limited routing sets (``expert_placement.max_destination_ranks``).
- Step time: median over the timed steps, the slowest rank's, per EP size. On a CPU with fewer cores than ranks the
  ranks share cores; the table records the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_deepseek_v3.cli import non_negative, positive, positive_ints

CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
    qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, n_group=4,
    topk_group=2, num_experts_per_tok=4, num_nextn_predict_layers=1, max_position_embeddings=512, rope_scaling=None,
    rope_theta=10000.0, router_bias_update_speed=0.001, aux_loss_alpha=0.0001, pad_token_id=0, bos_token_id=None,
    eos_token_id=None,
)
# row -> (ours?, from_pretrained keywords); "ours, no MTP" does the work transformers' class does (no MTP module)
IMPLEMENTATIONS = {
    "ours": (True, {}),
    "ours, no MTP": (True, {"num_nextn_predict_layers": 0}),
    "transformers": (False, {}),
}


# --- one rank ------------------------------------------------------------------------------------------------------


def register_recording_all_to_all(records: list) -> None:
    """transformers' all-to-all token exchange, registered as ``all_to_all_recorded``: the same class, whose dispatch
    also appends ``(tokens, hidden, element bytes, ep rank, send split sizes)`` to ``records``."""
    from transformers.distributed.expert_parallel import AllToAllEP, EPImplementationInterface

    class RecordingAllToAllEP(AllToAllEP):
        def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):
            dispatched = super()._dispatch_tokens(hidden_states, top_k_index, top_k_weights)
            state = dispatched[3]
            records.append((state.num_tokens, hidden_states.shape[-1], hidden_states.element_size(),
                            self.ep_mesh.get_local_rank(), list(state.send_sizes)))
            return dispatched

    EPImplementationInterface.register("all_to_all_recorded", RecordingAllToAllEP)


def worker(args) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig
    from transformers import DeepseekV3ForCausalLM as TransformersDeepseekV3

    import modeling_deepseek_v3  # noqa: F401
    from modeling_deepseek_v3 import expert_placement

    records: list = []
    register_recording_all_to_all(records)
    ep = args.ep
    distributed_config = DistributedConfig(ep_size=ep, fsdp_size=ep, ep_implementation="all_to_all_recorded")
    rows = {}
    for name, (is_ours, keywords) in IMPLEMENTATIONS.items():
        model_class = AutoModelForCausalLM if is_ours else TransformersDeepseekV3
        placement = {} if ep > 1 else {"device_map": args.device}  # sharded models are placed by the engine
        model = model_class.from_pretrained(
            args.checkpoint, distributed_config=distributed_config, dtype=torch.float32, **placement, **keywords
        )
        model.train()
        rank = dist.get_rank() if dist.is_initialized() else 0
        ids = torch.randint(1, CONFIG["vocab_size"], (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
        ids = ids[rank * (args.batch // ep) : (rank + 1) * (args.batch // ep)].to(args.device)
        fan_out = [0] * (ep + 1)

        def record_fan_out(module, inputs):
            hist = expert_placement.fan_out_histogram(inputs[1], CONFIG["n_routed_experts"], ep)
            fan_out[:] = [a + b for a, b in zip(fan_out, hist)]

        for module_name, module in model.named_modules():
            if module_name.endswith("mlp.experts"):
                module.register_forward_pre_hook(record_fan_out)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                records.clear()
                fan_out[:] = [0] * (ep + 1)
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            if is_ours:
                model.update_expert_bias()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        timed = torch.tensor(times[args.warmup :])
        if dist.is_initialized():  # the step takes as long as its slowest rank
            dist.all_reduce(timed, op=dist.ReduceOp.MAX)
        rows[name] = {"step_s": statistics.median(timed.tolist()), "fan_out": fan_out, "exchange": list(records)}
        records.clear()
        del model, optimizer
    out = Path(args.result_dir) / f"ep{ep}.rank{dist.get_rank() if dist.is_initialized() else 0}.json"
    out.write_text(json.dumps(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the launcher --------------------------------------------------------------------------------------------------


def exchange_summary(records: list, top_k: int) -> dict:
    """Bytes per token per MoE layer call, from the recorded split sizes of every rank."""
    tokens = sum(r[0] for r in records)
    if not tokens:
        return {}
    hidden, element = records[0][1], records[0][2]
    rows_sent = sum(sum(r[4]) for r in records)
    rows_off_rank = sum(sum(s for dest, s in enumerate(r[4]) if dest != r[3]) for r in records)
    return {
        "measured_bytes_per_token": 2 * rows_sent * hidden * element / tokens,
        "measured_off_rank_bytes_per_token": 2 * rows_off_rank * hidden * element / tokens,
        "formula_bytes_per_token": top_k * hidden * element * 2,
    }


def launch(args, ep: int, checkpoint: str, result_dir: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ep), __file__,
               "--worker", "--ep", str(ep), "--checkpoint", checkpoint, "--result-dir", result_dir,
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"EP {ep} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [json.loads((Path(result_dir) / f"ep{ep}.rank{r}.json").read_text()) for r in range(ep)]


def summarise(ep: int, ranks: list[dict]) -> list[dict]:
    from modeling_deepseek_v3 import DeepseekV3Config, expert_placement

    config = DeepseekV3Config(**CONFIG)
    rows = []
    for name in IMPLEMENTATIONS:
        fan_out = [sum(r[name]["fan_out"][d] for r in ranks) for d in range(ep + 1)]
        records = [record for r in ranks for record in r[name]["exchange"]]
        tokens = sum(fan_out)
        distinct = sum(d * n for d, n in enumerate(fan_out)) / tokens if tokens else 0.0
        row = {"implementation": name, "ep_size": ep, "step_s": ranks[0][name]["step_s"], "fan_out_histogram": fan_out,
               "fan_out_bound": expert_placement.max_destination_ranks(config, ep), "mean_destination_ranks": distinct}
        row.update(exchange_summary(records, config.num_experts_per_tok))
        if records:
            row["once_per_rank_bytes_per_token"] = distinct * CONFIG["hidden_size"] * records[0][2] * 2
        rows.append(row)
    return rows


def markdown(rows: list[dict], environment: dict) -> str:
    lines = [
        f"Device: {environment['device']}; {environment['cores']} CPU cores; torch {environment['torch']}, "
        f"transformers {environment['transformers']}; config: hidden {CONFIG['hidden_size']}, "
        f"{CONFIG['n_routed_experts']} experts in {CONFIG['n_group']} groups, topk_group {CONFIG['topk_group']}, "
        f"top-{CONFIG['num_experts_per_tok']}, {CONFIG['num_hidden_layers']} layers + {CONFIG['num_nextn_predict_layers']} MTP; "
        f"global batch {environment['batch']} × {environment['seq_len']}, fp32, DistributedConfig(ep_size=EP, fsdp_size=EP).",
        "",
        "| implementation | EP | step (s, median) | bytes/token/layer measured (all rows) | leaving the rank | formula top_k·H·4·2 "
        "| once per destination rank | mean ranks/token | fan-out histogram (0..EP ranks) | bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        exchange = [f"{r[k]:.0f}" if k in r else "–" for k in (
            "measured_bytes_per_token", "measured_off_rank_bytes_per_token", "formula_bytes_per_token",
            "once_per_rank_bytes_per_token")]
        lines.append(f"| {r['implementation']} | {r['ep_size']} | {r['step_s']:.3f} | " + " | ".join(exchange)
                     + f" | {r['mean_destination_ranks']:.2f} | {r['fan_out_histogram']} | {r['fan_out_bound']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep-sizes", type=positive_ints, default=positive_ints("1,2,4"))
    parser.add_argument("--batch", type=positive(int), default=8, help="global batch (sequences), split over the ranks")
    parser.add_argument("--seq-len", type=positive(int), default=128)
    parser.add_argument("--steps", type=positive(int), default=5)
    parser.add_argument("--warmup", type=non_negative(int), default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path)
    # worker side
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ep", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import transformers

    from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    ep_sizes = args.ep_sizes
    for ep in ep_sizes:
        if args.batch % ep or CONFIG["n_routed_experts"] % ep:
            sys.exit(f"--ep-sizes: {ep} must divide --batch {args.batch} and n_routed_experts {CONFIG['n_routed_experts']}")
    environment = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
                   "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                   "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIG)).save_pretrained(os.path.join(folder, "checkpoint"))
        for ep in ep_sizes:
            rows += summarise(ep, launch(args, ep, os.path.join(folder, "checkpoint"), folder))
    table = markdown(rows, environment)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "expert_parallel.md").write_text(table)
        (args.out / "expert_parallel.json").write_text(json.dumps({"environment": environment, "config": CONFIG, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
