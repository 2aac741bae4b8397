"""Convert a DeepSeek-V3 checkpoint between bf16 and the official FP8 format (e4m3, 128x128 block scales).

    python examples/convert_bf16_fp8.py SRC DST            # bf16 -> FP8
    python examples/convert_bf16_fp8.py SRC DST --to bf16  # FP8 -> bf16

The same as `python -m modeling_deepseek_v3.quantization.converter`; streams shard by shard, so memory stays
near the largest shard. Without arguments it converts a tiny generated checkpoint both ways.
"""

import argparse
import os
import tempfile

import torch

import modeling_deepseek_v3
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?")
    parser.add_argument("destination", nargs="?")
    parser.add_argument("--to", default="fp8", choices=["fp8", "bf16", "fp32"])
    args = parser.parse_args(argv)
    if args.source and not args.destination:
        parser.error(f"the following arguments are required with a source ({args.source}): destination")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.source:
        DeepseekV3FP8Converter.from_pretrained(args.source, to=args.to).quantize(args.destination)
        return
    with tempfile.TemporaryDirectory() as tmp:
        config = modeling_deepseek_v3.DeepseekV3Config(
            vocab_size=97, hidden_size=200, intermediate_size=260, moe_intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=136, kv_lora_rank=72, qk_rope_head_dim=16,
            qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
            first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64,
        )
        modeling_deepseek_v3.DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(f"{tmp}/bf16", max_shard_size="200KB")
        DeepseekV3FP8Converter.from_pretrained(f"{tmp}/bf16").quantize(f"{tmp}/fp8")
        DeepseekV3FP8Converter.from_pretrained(f"{tmp}/fp8", to="bf16").quantize(f"{tmp}/bf16-again")
        for name in ("bf16", "fp8", "bf16-again"):
            size = sum(os.path.getsize(f"{tmp}/{name}/{f}") for f in os.listdir(f"{tmp}/{name}") if f.endswith(".safetensors"))
            print(f"{name:>10}: {size:,} bytes of weights")


if __name__ == "__main__":
    main()
