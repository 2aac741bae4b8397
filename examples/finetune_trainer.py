"""Fine-tune the embedded tiny DeepSeek-V3 with transformers.Trainer, the way the paper trains it, and plot it.

- aux-loss-free balancing: `ExpertBiasUpdateCallback` moves every router's `e_score_correction_bias` by ±γ once
  per optimizer step (gradient accumulation included) and logs MaxVio;
- the sequence-wise balance loss (α) and the MTP objective (λ, depth `num_nextn_predict_layers`) are part of the
  model's training loss.

Writes `metrics.csv` (step, loss, mtp_loss, aux_loss, MaxVio per MoE layer) and, when matplotlib is installed
(`pip install -e ".[plot]"` from the repository root), `training.png`, to --output-dir.

    python examples/finetune_trainer.py --steps 60 --output-dir outputs/tiny
"""

from __future__ import annotations

import argparse
import csv
import json
from importlib import resources
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, ExpertBiasUpdateCallback
from modeling_deepseek_v3.cli import non_negative, positive

BYTE_OFFSET = 2  # ids 0 (pad) and 1 (eos) are special; byte b is token b + 2 (the tiny vocabulary has 384 ids)


def tiny_corpus_dataset(seq_len: int):
    """The embedded text as byte tokens, cut into overlapping windows of `seq_len` (labels = inputs, shifted by the model)."""
    text = resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_corpus.txt").read_bytes()
    ids = torch.tensor(list(text)) + BYTE_OFFSET
    stride = seq_len // 2
    return [
        {"input_ids": ids[i : i + seq_len], "labels": ids[i : i + seq_len], "attention_mask": torch.ones(seq_len, dtype=torch.long)}
        for i in range(0, len(ids) - seq_len, stride)
    ]


class MetricsTrainer(Trainer):
    """Adds the model's `mtp_loss` and `aux_loss` (averaged over the steps since the last log) to the Trainer logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts: dict[str, list[float]] = {"mtp_loss": [], "aux_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        for key in self._parts:
            value = getattr(outputs, key, None)
            if value is not None:
                self._parts[key].append(float(value.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = sum(values) / len(values)
                    values.clear()
        super().log(logs, start_time)


def write_metrics(log_history, max_vio_history, folder: Path) -> list[dict]:
    per_step = {entry["step"]: entry for entry in log_history if "loss" in entry}
    rows = []
    for record in max_vio_history:
        step = record["step"]
        logged = per_step.get(step, {})
        row = {"step": step, **{k: logged.get(k) for k in ("loss", "mtp_loss", "aux_loss")}}
        row.update({f"max_vio[layer {name.split('.')[2]}]": v for name, v in record.items() if name != "step"})
        rows.append(row)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[plot]" from the repository root); wrote the CSV only')
        return False
    steps = [r["step"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "mtp_loss"):
        points = [(s, r[key]) for s, r in zip(steps, rows) if r[key] is not None]
        left.plot(*zip(*points), label=key)
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy")
    left.set_title("training loss and MTP loss")
    left.legend()
    for key in (k for k in rows[0] if k.startswith("max_vio")):
        right.plot(steps, [r[key] for r in rows], label=key)
    right.set_xlabel("optimizer step")
    right.set_ylabel("MaxVio = max load / mean load − 1")
    right.set_title("expert load balance per MoE layer")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune_trainer"))
    parser.add_argument("--steps", type=positive(int), default=60)
    parser.add_argument("--seq-len", type=positive(int), default=64)
    parser.add_argument("--batch-size", type=positive(int), default=4)
    parser.add_argument("--grad-accum", type=positive(int), default=2)
    parser.add_argument("--bias-update-speed", type=non_negative(float), default=0.01, help="γ; the paper uses 0.001 over many more steps")
    args = parser.parse_args(argv)
    tokens = len(resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_corpus.txt").read_bytes())
    if not 2 <= args.seq_len < tokens:
        # a window advances by seq_len // 2 and must leave a token after it (else no window at all)
        parser.error(f"argument --seq-len: must be at least 2 and below the embedded text's {tokens} tokens, got {args.seq_len}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    fields = json.loads(resources.files(modeling_deepseek_v3).joinpath("defaults/tiny_config.json").read_text())
    fields["router_bias_update_speed"] = args.bias_update_speed
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields))
    callback = ExpertBiasUpdateCallback()
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=3e-3,
        warmup_steps=5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    trainer = MetricsTrainer(
        model=model, args=training_args, train_dataset=tiny_corpus_dataset(args.seq_len), callbacks=[callback]
    )
    trainer.train()

    rows = write_metrics(trainer.state.log_history, callback.history, args.output_dir)
    first, last = rows[0], rows[-1]
    print(f"step {first['step']}: loss {first['loss']:.3f}  mtp_loss {first['mtp_loss']:.3f}")
    print(f"step {last['step']}: loss {last['loss']:.3f}  mtp_loss {last['mtp_loss']:.3f}")
    print(f"wrote {args.output_dir / 'metrics.csv'}")
    if plot(rows, args.output_dir / "training.png"):
        print(f"wrote {args.output_dir / 'training.png'}")


if __name__ == "__main__":
    main()
