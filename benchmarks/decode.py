"""Decoding benchmark: ours against transformers' own ``DeepseekV3ForCausalLM`` on the same weights.

    python benchmarks/decode.py --out benchmarks/decode_h100        # writes decode_h100.md and decode_h100.json
    python benchmarks/decode.py --tiny --out /tmp/decode_tiny        # tiny config on the CPU, seconds (functional)

One process, one random-weight checkpoint folder, loaded by both classes. Full-size config: hidden 1024, 8 layers,
16 heads, q_lora 384, kv_lora 256, rope 32, nope 64, v 64, 64 routed experts of width 512 (6 active, 1 shared,
8 groups / 4 kept), first layer dense (2816), vocab 32000; bf16.

Tables:
1. greedy decode tokens/s after a 512-token prompt, batch 1 and 32: transformers' class (dynamic cache), ours
   (dynamic cache) and ours with ``cache_implementation="static"`` (which ``generate`` compiles on a GPU), with
   ratios against transformers'. Decode speed = tokens produced after the first one / time since the first, so the prefill
   is not counted (timestamps from a logits processor). Whether the greedy tokens equal transformers' is printed too (bf16 may diverge late).
2. KV-cache bytes per token per layer of both; ours must be ``(kv_lora_rank + qk_rope_head_dim) × element size``.
3. MTP self-speculative decoding vs plain greedy (batch 1): the MTP module is first trained briefly by
   self-distillation (main model frozen, so its outputs do not change) on the main model's own greedy
   continuations of some random prompts; acceptance rate and tokens/s are measured on other prompts.
4. scaling: decode tokens/s and peak GPU memory at context 1k, 8k, 32k (batch 1), ours (static cache) and theirs.

Without a CUDA GPU it exits with a message unless ``--tiny`` is given (then it runs on the CPU, untimed in spirit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time

import torch

from modeling_deepseek_v3.cli import non_negative, positive

FULL_CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_rope_head_dim=32,
    qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1, n_group=8,
    topk_group=4, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=40960,
    rope_scaling=None, bos_token_id=None, eos_token_id=None, pad_token_id=0,
)
TINY_CONFIG = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=2,
    topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=512,
    rope_scaling=None, bos_token_id=None, eos_token_id=None, pad_token_id=0, initializer_range=0.1,
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """A logits processor that only timestamps: generate calls it once per produced position, after the prefill,
    so decode speed excludes the prompt without subtracting two noisy runs."""

    def __init__(self, device):
        self.device, self.marks = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.marks.append((time.perf_counter(), input_ids.shape[1]))
        return scores

    def tokens_per_second(self, batch: int) -> float:
        (t0, n0), (t1, n1) = min(self.marks), max(self.marks)
        return batch * (n1 - n0) / max(t1 - t0, 1e-9)


def decode_speed(model, prompt, new_tokens, warmup=True, **kwargs):
    """(tokens/s of the decode steps, generated ids). Runs once untimed first (compilation, allocator warm-up)."""
    from transformers import LogitsProcessorList

    runs = 2 if warmup else 1
    for _ in range(runs):
        clock = StepClock(prompt.device)
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]), **kwargs)
    return clock.tokens_per_second(prompt.shape[0]), out


def cache_bytes_per_token_per_layer(model, prompt) -> float:
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
    layer = cache.layers[0]
    tokens = prompt.shape[0] * prompt.shape[1]
    return (layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()) / tokens


def peak_memory(device, fn):
    if device.type != "cuda":
        return fn(), None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    return result, torch.cuda.max_memory_allocated() / 2**30


def train_mtp_by_self_distillation(model, prompts, new_tokens, steps, lr):
    """Train only the MTP module on the main model's own greedy continuations of ``prompts``. The main model is frozen
    (its parameters get no update), so what it generates, and hence plain greedy output, is unchanged."""
    with torch.no_grad():
        texts = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    mtp = model.model.mtp_layers
    trainable = {id(p) for p in mtp.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(mtp.parameters(), lr=lr)
    model.train()
    mtp_loss = None
    for _ in range(steps):
        out = model(texts, labels=texts, return_mtp_loss=True)
        out.mtp_loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mtp_loss = float(out.mtp_loss.detach())
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    return mtp_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on whatever device (CPU: seconds)")
    parser.add_argument("--out", help="path prefix: writes PREFIX.md and PREFIX.json")
    parser.add_argument("--prompt", type=positive(int), default=None, help="prompt length (512; tiny 16)")
    parser.add_argument("--new-tokens", type=positive(int), default=None, help="tokens generated per timing (64; tiny 6)")
    parser.add_argument("--batches", type=positive(int), nargs="+", default=None, help="batch sizes (1 32; tiny 1 3)")
    parser.add_argument("--contexts", type=positive(int), nargs="+", default=None, help="scaling contexts (1024 8192 32768)")
    parser.add_argument("--mtp-steps", type=non_negative(int), default=None, help="MTP self-distillation steps (300; tiny 40)")
    parser.add_argument("--experts-backend", default=None, help="experts_backend for ours (default: the config's)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("benchmarks/decode.py needs a CUDA GPU for the full config (run with --tiny for a CPU smoke run).")

    import transformers

    import modeling_deepseek_v3
    from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    fields = dict(TINY_CONFIG if args.tiny else FULL_CONFIG)
    if args.experts_backend:
        fields["experts_backend"] = args.experts_backend
    prompt_len = args.prompt or (16 if args.tiny else 512)
    new_tokens = args.new_tokens if args.new_tokens is not None else (6 if args.tiny else 64)
    batches = args.batches or ([1, 3] if args.tiny else [1, 32])
    contexts = args.contexts or ([32, 64] if args.tiny else [1024, 8192, 32768])
    mtp_steps = args.mtp_steps if args.mtp_steps is not None else (40 if args.tiny else 300)
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], max(contexts) + 2 * new_tokens + 64)

    config = DeepseekV3Config(**fields)
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="decode_bench_")
    DeepseekV3ForCausalLM(config).to(dtype).save_pretrained(folder)
    load = dict(dtype=dtype, attn_implementation="sdpa")
    ours = DeepseekV3ForCausalLM.from_pretrained(folder, **load).to(device).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, **load).to(device).eval()
    n_params = sum(p.numel() for p in ours.model.decoder_layers.parameters()) + ours.model.embed_tokens.weight.numel() * 2

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "dtype": str(dtype), "config": {k: v for k, v in fields.items() if k not in ("rope_scaling",)},
        "main_parameters": n_params, "experts_backend": config.experts_backend, "mla_mode": config.mla_mode,
        "prompt_len": prompt_len, "new_tokens": new_tokens,
    }
    print(f"device {report['device']} | torch {torch.__version__} | transformers {transformers.__version__} | {dtype}")
    print(f"config: {fields}\nmain-model parameters {n_params / 1e6:.0f}M, experts_backend={config.experts_backend}")
    gen = torch.Generator().manual_seed(1)

    # 1. decode throughput after the prompt
    rows = []
    for batch in batches:
        prompt = torch.randint(1, config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        theirs_tps, theirs_ids = decode_speed(theirs, prompt, new_tokens)
        ours_tps, ours_ids = decode_speed(ours, prompt, new_tokens)
        static_tps, static_ids = decode_speed(ours, prompt, new_tokens, cache_implementation="static")
        row = dict(batch=batch, transformers=theirs_tps, ours_dynamic=ours_tps, ours_static=static_tps,
                   ratio_dynamic=ours_tps / theirs_tps, ratio_static=static_tps / theirs_tps,
                   tokens_equal_transformers=bool(torch.equal(ours_ids, theirs_ids)),
                   static_equals_dynamic=bool(torch.equal(static_ids, ours_ids)))
        rows.append(row)
        print(f"batch {batch}: transformers {theirs_tps:.1f} tok/s | ours dynamic {ours_tps:.1f} ({row['ratio_dynamic']:.2f}x) | "
              f"ours static {static_tps:.1f} ({row['ratio_static']:.2f}x) | tokens = transformers: "
              f"{row['tokens_equal_transformers']} | static = dynamic: {row['static_equals_dynamic']}")
    report["decode"] = rows

    # 2. KV-cache bytes per token per layer
    prompt = torch.randint(1, config.vocab_size, (1, prompt_len), generator=gen).to(device)
    ours_bytes = cache_bytes_per_token_per_layer(ours, prompt)
    theirs_bytes = cache_bytes_per_token_per_layer(theirs, prompt)
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * torch.tensor([], dtype=dtype).element_size()
    assert ours_bytes == expected, (ours_bytes, expected)
    report["kv_cache_bytes_per_token_per_layer"] = {"ours": ours_bytes, "transformers": theirs_bytes, "expected_ours": expected}
    print(f"KV cache bytes/token/layer: ours {ours_bytes:.0f} (= (kv_lora_rank + rope) x {expected // (config.kv_lora_rank + config.qk_rope_head_dim)} B), "
          f"transformers {theirs_bytes:.0f} ({theirs_bytes / ours_bytes:.1f}x)")

    # 3. MTP self-speculative decoding (batch 1)
    train_prompts = torch.randint(1, config.vocab_size, (4, prompt_len), generator=gen).to(device)
    mtp_loss = train_mtp_by_self_distillation(ours, train_prompts, 4 * new_tokens, mtp_steps, lr=1e-3 if not args.tiny else 1e-2)
    spec_rows = []
    for name, prompt in (("held-out prompt", torch.randint(1, config.vocab_size, (1, prompt_len), generator=gen).to(device)),
                         ("training prompt", train_prompts[:1])):
        plain_tps, plain_ids = decode_speed(ours, prompt, 4 * new_tokens)
        spec_tps, spec_ids = decode_speed(ours, prompt, 4 * new_tokens, use_mtp=True)
        stats = ours.mtp_draft_stats
        spec_rows.append(dict(prompt=name, plain=plain_tps, speculative=spec_tps, ratio=spec_tps / plain_tps,
                              acceptance=stats.acceptance_rate, identical=bool(torch.equal(plain_ids, spec_ids))))
        print(f"MTP ({name}): plain {plain_tps:.1f} tok/s | speculative {spec_tps:.1f} ({spec_tps / plain_tps:.2f}x) | "
              f"acceptance {stats.acceptance_rate:.2f} | identical {spec_rows[-1]['identical']}")
    report["mtp"] = {"train_steps": mtp_steps, "final_mtp_loss": mtp_loss, "rows": spec_rows}

    # 4. scaling with the context length (batch 1)
    scaling = []
    scale_tokens = max(4, new_tokens // 4)
    for context in contexts:
        prompt = torch.randint(1, config.vocab_size, (1, context), generator=gen).to(device)
        row = {"context": context}
        for name, model, kwargs in (("transformers", theirs, {}), ("ours_static", ours, {"cache_implementation": "static"})):
            try:
                (tps, _), mem = peak_memory(device, lambda: decode_speed(model, prompt, scale_tokens, **kwargs))
                row[name], row[name + "_peak_gib"] = tps, mem
            except torch.OutOfMemoryError:
                row[name], row[name + "_peak_gib"] = None, "OOM"
                torch.cuda.empty_cache()
        scaling.append(row)
        print(f"context {context}: " + " | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "context"))
    report["scaling"] = scaling

    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=2, default=str)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
        print(f"wrote {args.out}.md and {args.out}.json")
    return report


def fmt(value, digits=1):
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(r) -> str:
    lines = [
        f"# Decode benchmark ({r['date']})", "",
        f"device: {r['device']}; torch {r['versions']['torch']}, transformers {r['versions']['transformers']}; {r['dtype']}; "
        f"{r['main_parameters'] / 1e6:.0f}M main-model parameters; experts_backend `{r['experts_backend']}`, mla_mode `{r['mla_mode']}`; "
        f"prompt {r['prompt_len']} tokens, {r['new_tokens']} new tokens per timing.", "",
        "## Greedy decode tokens/s after the prompt", "",
        "| batch | transformers | ours (dynamic cache) | ratio | ours (static cache) | ratio | tokens = transformers' | static = dynamic |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["decode"]:
        lines.append(f"| {row['batch']} | {fmt(row['transformers'])} | {fmt(row['ours_dynamic'])} | {fmt(row['ratio_dynamic'], 2)}x | "
                     f"{fmt(row['ours_static'])} | {fmt(row['ratio_static'], 2)}x | {row['tokens_equal_transformers']} | {row['static_equals_dynamic']} |")
    kv = r["kv_cache_bytes_per_token_per_layer"]
    lines += ["", "## KV cache", "", "| | bytes per token per layer |", "|---|---|",
              f"| ours (c_kv + k_rope) | {kv['ours']:.0f} (expected {kv['expected_ours']}) |",
              f"| transformers (expanded K, V) | {kv['transformers']:.0f} |", "",
              f"## MTP self-speculative decoding (batch 1; MTP module self-distilled for {r['mtp']['train_steps']} steps, "
              f"final MTP loss {fmt(r['mtp']['final_mtp_loss'], 3)})", "",
              "| prompt | plain tok/s | speculative tok/s | ratio | acceptance | identical output |", "|---|---|---|---|---|---|"]
    for row in r["mtp"]["rows"]:
        lines.append(f"| {row['prompt']} | {fmt(row['plain'])} | {fmt(row['speculative'])} | {fmt(row['ratio'], 2)}x | "
                     f"{fmt(row['acceptance'], 2)} | {row['identical']} |")
    lines += ["", "## Scaling (batch 1)", "", "| context | transformers tok/s | peak GiB | ours (static) tok/s | peak GiB |", "|---|---|---|---|---|"]
    for row in r["scaling"]:
        lines.append(f"| {row['context']} | {fmt(row.get('transformers'))} | {fmt(row.get('transformers_peak_gib'), 2)} | "
                     f"{fmt(row.get('ours_static'))} | {fmt(row.get('ours_static_peak_gib'), 2)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
