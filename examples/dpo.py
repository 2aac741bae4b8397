"""DPO of the embedded tiny DeepSeek-V3 with TRL, on the preference pairs of examples/data/dpo.jsonl.

    python examples/dpo.py                        # LoRA; the reference is the policy with its adapters disabled
    python examples/dpo.py --reference folder     # full fine-tuning; the reference loaded from the saved folder

DeepseekV3DPOTrainer is TRL's DPOTrainer plus the routers' balance loss in the optimised loss and the ±γ bias step
per optimizer step; its reference forwards run as inference (no token counts, no balance loss, no MTP). Prints the
DPO loss, the reward margin and MaxVio; exits non-zero unless the policy moved away from the reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune_common import dataset, load, logged, lora_config, save_tiny_base, tokenizer, training_defaults
from trl import DPOConfig

from modeling_deepseek_v3.cli import positive, seed
from modeling_deepseek_v3.trl_trainers import DeepseekV3DPOTrainer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", choices=["adapter", "folder"], default="adapter",
                        help="adapter: LoRA, reference = adapters disabled; folder: full fine-tuning, reference reloaded")
    parser.add_argument("--steps", type=positive(int), default=20)
    parser.add_argument("--learning-rate", type=positive(float), default=None, help="default 1e-3 (adapter) or 5e-4 (folder)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/dpo"))
    parser.add_argument("--seed", type=seed, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    folder = save_tiny_base(args.output_dir, seed=args.seed)
    policy = load(folder)
    learning_rate = args.learning_rate or (1e-3 if args.reference == "adapter" else 5e-4)
    training = DPOConfig(**training_defaults(args.output_dir, args.steps, args.seed), per_device_train_batch_size=8,
                         learning_rate=learning_rate, max_length=96, beta=0.1)
    if args.reference == "adapter":
        trainer = DeepseekV3DPOTrainer(policy, args=training, train_dataset=dataset("dpo"),
                                       processing_class=tokenizer(), peft_config=lora_config(experts=True))
    else:
        trainer = DeepseekV3DPOTrainer(policy, ref_model=load(folder), args=training, train_dataset=dataset("dpo"),
                                       processing_class=tokenizer())
    trainer.train()
    losses, margins = logged(trainer, "loss"), logged(trainer, "rewards/margins")
    print(f"DPO loss {losses[0]:.4f} -> {losses[-1]:.4f} (ln 2 = 0.6931 at the reference); reward margin "
          f"{margins[0]:.4f} -> {margins[-1]:.4f}; MaxVio {logged(trainer, 'max_vio_mean')[-1]:.3f}")
    if not losses[-1] < losses[0]:
        print("ERROR: the DPO loss did not go down")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
