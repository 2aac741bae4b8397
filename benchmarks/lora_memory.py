"""Memory of a LoRA training step over a frozen FP8 base against the same step over a bf16 base (CPU, or a GPU).

    python benchmarks/lora_memory.py                 # prints a markdown table
    python benchmarks/lora_memory.py --steps 3 --seq-len 256 --batch 2

One random DeepSeek-V3 (the sizes below) is saved in bf16 and converted to the official FP8 format
(``DeepseekV3FP8Converter``). Each variant then runs in its own process, so neither sees the other's allocations:

* ``fp8``: the FP8 folder loaded with ``DeepseekV3FP8Config(dequantize=False)`` (attention projections, dense and
  shared MLPs as ``FP8Linear``, routed experts as ``FP8Experts``, e4m3 + fp32 block scales);
* ``bf16``: the bf16 folder (every weight in bf16).

Both get the same LoRA adapters (r=16 on the five MLA projections, fp32, AdamW) and run ``--steps`` forward + backward
+ optimizer steps on the same token batch. Reported per variant: the bytes of the model's tensors (exact), the
trainable parameters, the resident memory once loaded and adapted, and the peak resident memory during the steps
(``VmHWM`` of /proc/self/status, reset before the steps through /proc/self/clear_refs) — on a CUDA device the peak of
``torch.cuda.max_memory_allocated`` instead. On the CPU the FP8 layers run the PyTorch reference GEMMs, which
dequantize one 128-wide slab at a time: the step time says nothing about the GPU kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from modeling_deepseek_v3.cli import positive

SIZES = dict(
    vocab_size=8192, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1, n_group=4,
    topk_group=2, num_experts_per_tok=4, num_nextn_predict_layers=0, max_position_embeddings=4096,
    router_bias_update_speed=0.001, aux_loss_alpha=0.0001,
)
MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def build(folder: Path) -> None:
    import modeling_deepseek_v3
    from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

    torch.manual_seed(0)
    model = modeling_deepseek_v3.DeepseekV3ForCausalLM(modeling_deepseek_v3.DeepseekV3Config(**SIZES)).to(torch.bfloat16)
    model.save_pretrained(folder / "bf16")
    del model
    DeepseekV3FP8Converter.from_pretrained(folder / "bf16").quantize(folder / "fp8", progress=False)


def measure(variant: str, folder: Path, steps: int, batch: int, seq_len: int) -> dict:
    """Runs in the child process: load, adapt, step; returns the numbers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from modeling_deepseek_v3 import DeepseekV3FP8Config
    from modeling_deepseek_v3.lora import prepare_lora_config

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    quantization = DeepseekV3FP8Config(dequantize=False) if variant == "fp8" else None
    model = AutoModelForCausalLM.from_pretrained(folder / variant, quantization_config=quantization,
                                                 dtype=torch.bfloat16).to(device)
    tensor_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    peft_model = get_peft_model(model, prepare_lora_config(model, LoraConfig(r=16, lora_alpha=32, target_modules=MLA)))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, SIZES["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    peft_model.train()
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kib("VmRSS") * 1024
        reset = _reset_peak()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024 if reset else None
    return dict(variant=variant, tensor_bytes=tensor_bytes, trainable_params=sum(p.numel() for p in trainable),
                before_step_bytes=before, peak_bytes=peak, seconds_per_step=(time.perf_counter() - start) / steps,
                losses=losses, device=torch.cuda.get_device_name() if cuda else _cpu_name())


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive(int), default=3)
    parser.add_argument("--batch", type=positive(int), default=2)
    parser.add_argument("--seq-len", type=positive(int), default=256)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.steps, args.batch, args.seq_len)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        results = []
        for variant in ("fp8", "bf16"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, tmp, "--steps", str(args.steps), "--batch", str(args.batch),
                 "--seq-len", str(args.seq_len)],
                capture_output=True, text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    import peft
    import transformers

    where = "GPU memory allocated" if torch.cuda.is_available() else "resident memory (RSS)"
    print(f"Device: {results[0]['device']}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; {os.cpu_count()} CPU threads visible; batch {args.batch} x {args.seq_len} tokens, "
          f"{args.steps} steps\n")
    print(f"| base | model tensors (MiB) | LoRA params | {where} before the steps (MiB) | peak during the steps (MiB) "
          "| peak − before (MiB) | s/step | loss first → last |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        extra = None if r["peak_bytes"] is None else r["peak_bytes"] - r["before_step_bytes"]
        print(f"| {r['variant']} | {_mib(r['tensor_bytes'])} | {r['trainable_params']:,} | {_mib(r['before_step_bytes'])} "
              f"| {_mib(r['peak_bytes'])} | {_mib(extra)} | {r['seconds_per_step']:.2f} "
              f"| {r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")


if __name__ == "__main__":
    main()
