"""One rank of the 2-process data-parallel LoRA SFT of test_finetune_trl.py (run under torchrun, gloo on the CPU).

Every rank trains the same tiny policy with DeepseekV3SFTTrainer on its share of the shipped SFT data and writes, to
OUT/rank<r>.pt, the real tokens of its training batches per optimizer step, the routers' loads the bias update used
and the biases before and after every update.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_finetune_trl import BiasSteps, common, dataset, lora, policy, recording  # noqa: E402
from transformers import ByT5Tokenizer  # noqa: E402
from trl import SFTConfig  # noqa: E402

from modeling_deepseek_v3.trl_trainers import DeepseekV3SFTTrainer  # noqa: E402


class LoadSteps(BiasSteps):
    """Also keeps the per-layer loads (summed over the ranks) of every update."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        control = super().on_step_end(args, state, control, model=model, **kwargs)
        self.steps[-1] = (*self.steps[-1], {n: load.clone() for n, load in self._pending[-1].load.items()})
        return control


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    callback = LoadSteps()
    args = SFTConfig(**common(out / "trainer", ddp_backend="gloo", per_device_train_batch_size=2), max_length=48)
    trainer = recording(DeepseekV3SFTTrainer, lambda inputs: inputs["attention_mask"].sum())(
        policy(), args=args, train_dataset=dataset("sft"), processing_class=ByT5Tokenizer(), peft_config=lora(),
        callbacks=[callback])
    trainer.bias_steps = callback
    trainer.train()
    torch.save(callback.steps, out / f"rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    main()
