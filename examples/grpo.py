"""GRPO of the embedded tiny DeepSeek-V3 with TRL and a rule-based reward, on the sums of examples/data/grpo.jsonl.

    python examples/grpo.py

For each prompt ("7+2=") the model samples --generations completions; the reward is 1 for a completion that starts
with the right sum, 0.25 for one that starts with any digit, 0 otherwise. DeepseekV3GRPOTrainer is TRL's GRPOTrainer
(LoRA adapters here) plus the routers' balance loss in the optimised loss and the ±γ bias step per optimizer step;
its generation and scoring forwards run as inference (no token counts). Prints the mean reward and MaxVio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune_common import dataset, load, logged, lora_config, save_tiny_base, tokenizer, training_defaults
from trl import GRPOConfig

from modeling_deepseek_v3.cli import positive, seed
from modeling_deepseek_v3.trl_trainers import DeepseekV3GRPOTrainer


def sum_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1 if the completion starts with the right sum, 0.25 if it starts with a digit, else 0."""
    return [1.0 if text.strip().startswith(right) else 0.25 if text.strip()[:1].isdigit() else 0.0
            for text, right in zip(completions, answer)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive(int), default=10)
    parser.add_argument("--generations", type=positive(int), default=4)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/grpo"))
    parser.add_argument("--seed", type=seed, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    policy = load(save_tiny_base(args.output_dir, seed=args.seed))
    training = GRPOConfig(**training_defaults(args.output_dir, args.steps, args.seed), per_device_train_batch_size=8,
                          num_generations=args.generations, max_completion_length=6, learning_rate=5e-3,
                          temperature=1.0, beta=0.0)
    trainer = DeepseekV3GRPOTrainer(policy, reward_funcs=sum_reward, args=training, train_dataset=dataset("grpo"),
                                    processing_class=tokenizer(), peft_config=lora_config(experts=True))
    trainer.train()
    rewards = logged(trainer, "reward")
    print(f"Mean reward {rewards[0]:.3f} -> {rewards[-1]:.3f} (max 1); balance loss "
          f"{logged(trainer, 'balance_loss')[-1]:.2e}; MaxVio {logged(trainer, 'max_vio_mean')[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
