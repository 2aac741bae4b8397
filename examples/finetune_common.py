"""What the fine-tuning examples (sft_lora.py, dpo.py, grpo.py) share: the embedded tiny DeepSeek-V3 saved as a
checkpoint folder (optionally converted to the official FP8 format), a byte-level tokenizer that needs no files, the
small datasets in examples/data/, and the LoRA targets."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, ByT5Tokenizer, set_seed

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3FP8Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

DATA = Path(__file__).resolve().parent / "data"
MLA_PROJECTIONS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
STACKED_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tokenizer() -> ByT5Tokenizer:
    """Bytes as tokens (ids 3..258), pad 0 and eos 1: the 384-id vocabulary of the tiny config."""
    return ByT5Tokenizer()


def dataset(name: str) -> Dataset:
    """``examples/data/<name>.jsonl`` as a datasets.Dataset."""
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as handle:
        return Dataset.from_list([json.loads(line) for line in handle if line.strip()])


def save_tiny_base(folder: Path, fp8: bool = False, seed: int = 0, **overrides) -> Path:
    """Build the embedded tiny DeepSeek-V3 (random weights, fp32), save it to ``folder/base`` and, with ``fp8``,
    convert that folder to the official FP8 layout in ``folder/base-fp8``. Returns the folder to load."""
    set_seed(seed)
    fields = json.loads(resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_config.json").read_text())
    fields.update(overrides)
    base = folder / "base"
    DeepseekV3ForCausalLM(DeepseekV3Config(**fields)).save_pretrained(base)
    tokenizer().save_pretrained(base)
    if not fp8:
        return base
    DeepseekV3FP8Converter.from_pretrained(base).quantize(folder / "base-fp8", progress=False, overwrite=True)
    return folder / "base-fp8"


def load(folder: Path, fp8: bool = False):
    """The model in ``folder``, in fp32; an FP8 folder keeps its FP8 weights (``dequantize=False``)."""
    quantization = DeepseekV3FP8Config(dequantize=False) if fp8 else None
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)


def lora_config(experts: bool, rank: int = 8) -> LoraConfig:
    """LoRA on the MLA projections and, with ``experts``, on each routed expert of the stacked tensors."""
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(MLA_PROJECTIONS),
                      target_parameters=list(STACKED_EXPERTS) if experts else None)


def training_defaults(output_dir: Path, steps: int, seed: int) -> dict:
    return dict(output_dir=str(output_dir / "trainer"), max_steps=steps, logging_steps=max(1, steps // 5),
                save_strategy="no", report_to="none", seed=seed, use_cpu=not torch.cuda.is_available(),
                disable_tqdm=True)


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]
