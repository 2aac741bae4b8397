"""Training-step throughput and peak memory: ours (experts backends, FP8, fused kernels) against transformers'
own ``DeepseekV3ForCausalLM`` on the same config and the same weights, in one process.

    python benchmarks/train_step.py --out benchmarks/out          # needs a CUDA GPU (the full-size config)
    python benchmarks/train_step.py --tiny                        # seconds on a CPU: a smoke test of the script

One step is forward + backward + AdamW step (+ our aux-loss-free bias update, which is part of our training
step) on random tokens with ``labels = input_ids``. The weights are written once in the official checkpoint layout
and every row loads that folder, so all rows train the very same model. Rows run one after another; the peak
memory of a row is ``torch.cuda.max_memory_allocated`` from loading to the last step (weights, gradients, AdamW
state, activations). Tokens/s counts the timed steps only (after warm-up, which includes autotuning).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch
import transformers

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.cli import positive, seed

# The full-size benchmark config (813M parameters).
FULL_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
    qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1, n_group=8,
    topk_group=4, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=4096,
    rope_scaling=None, rope_theta=10000.0,
)
TINY_CONFIG = dict(
    FULL_CONFIG, vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
    intermediate_size_dense=None, max_position_embeddings=128,
)
TINY_CONFIG.pop("intermediate_size_dense")

# (row name, loader kwargs for ours); None = transformers' own class
VARIANTS = {
    "transformers": None,
    "ours eager": dict(experts_backend="eager"),
    "ours grouped_mm": dict(experts_backend="grouped_mm"),
    "ours grouped_mm, fused off": dict(experts_backend="grouped_mm", fused_kernels="off"),
    "ours fp8_block (deepseek_fp8 experts)": dict(quantizer="fp8_block"),
}


def versions(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def write_checkpoint(config_fields: dict, folder: str, dtype: torch.dtype, seed: int) -> int:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config_fields)).to(dtype)
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def load(name: str, folder: str, dtype, device):
    kwargs = VARIANTS[name]
    if kwargs is None:  # transformers' own implementation, as shipped
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kwargs)
        assert isinstance(model, DeepseekV3ForCausalLM), type(model)
    return model.to(device).train()


def train_step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model, DeepseekV3ForCausalLM):
        model.update_expert_bias()
    return loss.detach()


def measure(name, folder, dtype, device, batch, seq, vocab, warmup, steps, seed):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = load(name, folder, dtype, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first_loss = float(train_step(model, optimizer, ids))  # same weights, same batch: equal across rows
    for _ in range(warmup - 1):
        loss = train_step(model, optimizer, ids)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, optimizer, ids)
    sync()
    elapsed = time.perf_counter() - start
    row = {
        "name": name,
        "tokens_per_s": batch * seq * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "first_loss": first_loss,
        "final_loss": float(loss),
    }
    del model, optimizer
    return row


def table(rows: list[dict], reference: dict | None) -> str:
    lines = ["| implementation | tokens/s | × transformers | step ms | peak GiB | peak / transformers | first loss | last loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['error']} | | | | | | |")
            continue
        ok = reference is not None and "error" not in reference
        speed = f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}" if ok else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        mem = f"{r['peak_gib'] / reference['peak_gib']:.2f}" if ok and r["peak_gib"] is not None else "-"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {speed} | {r['step_ms']:.1f} | {peak} | {mem} | "
                     f"{r['first_loss']:.4f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def run_rows(args, fields, dtype, device, batch, seq, steps, warmup):
    with tempfile.TemporaryDirectory() as folder:
        num_params = write_checkpoint(fields, folder, dtype, args.seed)
        rows = []
        for name in args.variants:
            try:
                rows.append(measure(name, folder, dtype, device, batch, seq, fields["vocab_size"], warmup, steps, args.seed))
            except torch.cuda.OutOfMemoryError:
                rows.append({"name": name, "error": "out of memory"})
            print(f"  {name}: {rows[-1]}", file=sys.stderr)
    return rows, num_params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU (seconds): smoke test")
    parser.add_argument("--out", help="folder for train_step.md and train_step.json")
    parser.add_argument("--batch", type=positive(int), default=None)
    parser.add_argument("--seq", type=positive(int), default=None)
    parser.add_argument("--steps", type=positive(int), default=None)
    parser.add_argument("--warmup", type=positive(int), default=None, help="untimed steps first (at least 1)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seed", type=seed, default=0)
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    if args.tiny:
        # one thread: tiny CPU ops only lose to thread hand-offs, worst of all on a loaded machine
        torch.set_num_threads(1)
        device, dtype, fields = torch.device("cpu"), torch.float32, TINY_CONFIG
        batch, seq, steps, warmup = args.batch or 2, args.seq or 16, args.steps or 2, max(args.warmup or 1, 1)
    else:
        if not torch.cuda.is_available():
            print("benchmarks/train_step.py measures a training step on a CUDA GPU and none is available here. "
                  "Run it on a GPU machine (see benchmarks/README.md), or pass --tiny for a CPU smoke test.",
                  file=sys.stderr)
            return 2
        device, dtype, fields = torch.device("cuda"), torch.bfloat16, FULL_CONFIG
        batch, seq, steps, warmup = args.batch or 4, args.seq or 2048, args.steps or 10, max(args.warmup or 3, 1)
    if "transformers" not in args.variants:
        args.variants = ["transformers", *args.variants]

    try:
        rows, num_params = run_rows(args, fields, dtype, device, batch, seq, steps, warmup)
    finally:
        torch.set_num_threads(threads)

    reference = rows[0]
    env = versions(device)
    shapes = {"batch": batch, "seq_len": seq, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "warmup": warmup,
              "parameters": num_params, "optimizer": "AdamW(foreach)", "attn_implementation": "sdpa"}
    md = "\n".join([
        f"### train_step ({'tiny CPU smoke config' if args.tiny else 'full-size config'})",
        "",
        "device: " + env["device"] + " · " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"),
        "",
        "shapes: " + ", ".join(f"{k} {v}" for k, v in shapes.items()),
        "",
        "config: " + ", ".join(f"{k}={v}" for k, v in fields.items() if v is not None),
        "",
        table(rows, reference),
        "",
    ])
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train_step.md"), "w", encoding="utf-8") as f:
            f.write(md)
        with open(os.path.join(args.out, "train_step.json"), "w", encoding="utf-8") as f:
            json.dump({"env": env, "shapes": shapes, "config": fields, "rows": rows,
                       "package": modeling_deepseek_v3.__name__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
