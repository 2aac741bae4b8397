"""The main job on an embedded default: ``python -m modeling_deepseek_v3.demo``.

Builds a tiny DeepSeek-V3 from the config shipped in ``defaults/``, trains it for a few steps with
``transformers.Trainer`` (plus the aux-loss-free bias update) on the small text shipped beside it, generates,
saves, and loads the folder back through ``AutoModelForCausalLM``. Offline: the byte-level tokenizer needs no
files. Exits non-zero if the reloaded model does not generate exactly what the trained one did.
"""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer, Trainer, TrainingArguments, set_seed

from . import DeepseekV3Config, DeepseekV3ForCausalLM, ExpertBiasUpdateCallback
from .cli import existing_file, positive, seed

DEFAULTS = resources.files("modeling_deepseek_v3") / "defaults"


class TextBlocks(torch.utils.data.Dataset):
    """Overlapping fixed-length token blocks of one text, for causal LM training."""

    def __init__(self, ids: list[int], block_size: int, stride: int):
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: a causal LM block needs at least 2 tokens (one to predict the next).")
        if stride < 1:
            raise ValueError(f"stride={stride}: the blocks must advance by at least one token.")
        if len(ids) <= block_size:
            raise ValueError(f"The text has {len(ids)} tokens; need more than block_size={block_size}.")
        self.blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, stride)]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = torch.tensor(self.blocks[index])
        return {"input_ids": block, "labels": block.clone()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=existing_file, default=str(DEFAULTS / "tiny_config.json"),
                        help="config.json to build the model from")
    parser.add_argument("--text", type=existing_file, default=str(DEFAULTS / "tiny_corpus.txt"),
                        help="plain-text training file")
    parser.add_argument("--output-dir", default="outputs/demo", help="where the trained model is saved")
    parser.add_argument("--steps", type=positive(int), default=200)
    parser.add_argument("--block-size", type=positive(int), default=128)
    parser.add_argument("--batch-size", type=positive(int), default=8)
    parser.add_argument("--learning-rate", type=positive(float), default=3e-3)
    parser.add_argument("--prompt", default="The router ")
    parser.add_argument("--max-new-tokens", type=positive(int), default=48)
    parser.add_argument("--seed", type=seed, default=0)
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("argument --prompt: must not be empty (generation starts from it)")
    if args.block_size < 2:
        parser.error(f"argument --block-size: must be at least 2 (a block predicts each next token), got {args.block_size}")
    # The files are read here, so that a bad one is named before a model is built and trained.
    try:
        args.model_config = DeepseekV3Config(**_json_object(args.config))
    except (ValueError, TypeError) as error:
        parser.error(f"argument --config: {args.config}: {error}")
    try:
        args.text_content = Path(args.text).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        parser.error(f"argument --text: {args.text} is not UTF-8 text ({error.reason} at byte {error.start})")
    tokens = len(ByT5Tokenizer()(args.text_content).input_ids)
    if tokens <= args.block_size:
        parser.error(f"argument --block-size: {args.block_size} needs a text of more tokens; --text {args.text} has {tokens}")
    try:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --output-dir: cannot create {args.output_dir}: {error.strerror}")
    return args


def _json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            fields = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not a JSON file: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"must hold a JSON object of config fields, got a {type(fields).__name__}")
    return fields


def main(argv=None) -> int:
    args = parse_args(argv)
    set_seed(args.seed)
    tokenizer = ByT5Tokenizer()
    config = args.model_config
    model = DeepseekV3ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    print(f"Built DeepSeek-V3: {total / 1e6:.2f}M parameters, {config.num_hidden_layers} layers, "
          f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}), attention={config.attention_backend}, "
          f"router={config.topk_method}, MTP depth={config.num_nextn_predict_layers}")

    dataset = TextBlocks(tokenizer(args.text_content).input_ids, args.block_size, stride=max(1, args.block_size // 4))
    output_dir = Path(args.output_dir)
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=[ExpertBiasUpdateCallback()])
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    print(f"Trained {args.steps} steps in {result.metrics['train_runtime']:.1f}s: training loss (next-token CE + "
          f"{config.mtp_loss_weight}·MTP + balance loss) {losses[0]:.3f} -> {losses[-1]:.3f}; a uniform guess scores "
          f"CE = ln(vocab) = {math.log(config.vocab_size):.3f}")

    model.eval()
    prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    generated = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    completion = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"Generated: {completion!r}")

    save_dir = output_dir / "model"
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=model.dtype).to(model.device).eval()
    again = reloaded.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"Saved to {save_dir} and reloaded through AutoModelForCausalLM as {type(reloaded).__name__}")
    if not torch.equal(generated, again):
        print("ERROR: the reloaded model generates different tokens")
        return 1
    print("Reloaded model generates the same tokens.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
