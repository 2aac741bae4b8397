"""LoRA supervised fine-tuning of the embedded tiny DeepSeek-V3 with TRL, optionally over a frozen FP8 base.

    python examples/sft_lora.py                 # LoRA on the MLA projections and every routed expert
    python examples/sft_lora.py --fp8-base      # the base converted to the official FP8 format and kept in FP8

Builds the tiny model, saves it (and with --fp8-base converts it to e4m3 + 128x128 block scales and loads it with
DeepseekV3FP8Config(dequantize=False)), trains LoRA adapters with DeepseekV3SFTTrainer (TRL's SFTTrainer plus the
balance loss and the ±γ bias step) on examples/data/sft.jsonl, checks that the FP8 base bytes did not change, merges
the adapters (--merge requantize: back into FP8; dequantize: a plain fp32 checkpoint), saves the merged model in the
official layout, reloads it and checks that it generates the same tokens. Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from finetune_common import dataset, load, logged, lora_config, save_tiny_base, tokenizer, training_defaults
from trl import SFTConfig

from modeling_deepseek_v3 import DeepseekV3FP8Config
from modeling_deepseek_v3.cli import positive, seed
from modeling_deepseek_v3.lora import merge_and_unload
from modeling_deepseek_v3.quantization.lora import FP8LoraLinear
from modeling_deepseek_v3.trl_trainers import DeepseekV3SFTTrainer
from transformers import AutoModelForCausalLM


def fp8_snapshot(model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, the parameter itself, a copy of its bytes) for every FP8 tensor: PEFT wraps the layers, the tensors stay."""
    return [(n, p, p.detach().view(torch.uint8).clone()) for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp8-base", action="store_true", help="train over the base converted to FP8 and kept in FP8")
    parser.add_argument("--merge", choices=["requantize", "dequantize"], default="requantize",
                        help="FP8 base only: merge back into FP8, or into a plain fp32 checkpoint")
    parser.add_argument("--steps", type=positive(int), default=20)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/sft_lora"))
    parser.add_argument("--seed", type=seed, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    folder = save_tiny_base(args.output_dir, fp8=args.fp8_base, seed=args.seed)
    model = load(folder, fp8=args.fp8_base)
    before = fp8_snapshot(model)
    print(f"Base: {folder} ({'FP8 kept in FP8' if args.fp8_base else 'fp32'}, {len(before)} FP8 tensors)")

    training = SFTConfig(**training_defaults(args.output_dir, args.steps, args.seed), per_device_train_batch_size=8,
                         learning_rate=1e-2, max_length=64)
    # FP8 experts cannot take an adapter: over the FP8 base only the MLA projections get one
    trainer = DeepseekV3SFTTrainer(model, args=training, train_dataset=dataset("sft"), processing_class=tokenizer(),
                                   peft_config=lora_config(experts=not args.fp8_base))
    trainer.model.print_trainable_parameters()
    trainer.train()
    losses, max_vio = logged(trainer, "loss"), logged(trainer, "max_vio_mean")
    print(f"Loss (TRL's completion NLL + balance loss) {losses[0]:.3f} -> {losses[-1]:.3f}; MaxVio {max_vio[-1]:.3f}")

    changed = [name for name, tensor, copy in before if not torch.equal(tensor.detach().view(torch.uint8), copy)]
    if changed:
        print(f"ERROR: {len(changed)} FP8 base tensors changed during training, e.g. {changed[0]}")
        return 1
    if before:
        print(f"All {len(before)} FP8 base tensors are byte-identical after training.")

    fp8_layers = [m for m in trainer.model.modules() if isinstance(m, FP8LoraLinear)]
    merged = merge_and_unload(trainer.model, fp8=args.merge, dtype=torch.float32).eval()
    if fp8_layers:
        worst = max(layer.merge_report["update_relative_error"] for layer in fp8_layers)
        print(f"Merged {len(fp8_layers)} FP8 layers ({args.merge}); largest ||stored − (W + ΔW)|| / ||ΔW|| of a "
              f"layer: {worst:.3g}")
    save_dir = args.output_dir / "merged"
    merged.save_pretrained(save_dir)
    tokenizer().save_pretrained(save_dir)
    keeps_fp8 = args.fp8_base and args.merge == "requantize"
    reloaded = AutoModelForCausalLM.from_pretrained(
        save_dir, quantization_config=DeepseekV3FP8Config(dequantize=False) if keeps_fp8 else None, dtype=torch.float32
    ).eval()
    prompt = tokenizer()("Q: What scores does the router use?\nA: ", return_tensors="pt", add_special_tokens=False)
    expected = merged.generate(**prompt, max_new_tokens=24, do_sample=False)
    again = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False)
    print(f"Merged ({args.merge if args.fp8_base else 'fp32'}) and saved to {save_dir}; it answers "
          f"{tokenizer().decode(expected[0, prompt['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    if not torch.equal(expected, again):
        print("ERROR: the reloaded merged model generates different tokens")
        return 1
    print("The reloaded merged model generates the same tokens.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
