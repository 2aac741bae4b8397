"""Load a DeepSeek-V3 checkpoint in the released layout (bf16 or FP8, with its MTP module) and run it.

    python examples/load_official_checkpoint.py /path/to/DeepSeek-V3      # a real folder (or Hub id)
    python examples/load_official_checkpoint.py                           # builds a tiny FP8 one first

`--dequantize` loads FP8 weights as bf16/fp32 Linears; the default keeps FP8 on a GPU and dequantizes on a CPU.
"""

import argparse
import tempfile

import torch
import transformers

import modeling_deepseek_v3  # registers our classes with AutoModelForCausalLM before loading
from modeling_deepseek_v3.checkpoint import DeepseekV3FP8Config
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter


def tiny_fp8_checkpoint(folder: str) -> str:
    config = modeling_deepseek_v3.DeepseekV3Config(
        vocab_size=97, hidden_size=200, intermediate_size=260, moe_intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=136, kv_lora_rank=72, qk_rope_head_dim=16,
        qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3,
        first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    modeling_deepseek_v3.DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(f"{folder}/bf16", max_shard_size="300KB")
    DeepseekV3FP8Converter.from_pretrained(f"{folder}/bf16").quantize(f"{folder}/fp8", progress=False)
    return f"{folder}/fp8"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?")
    parser.add_argument("--dequantize", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or tiny_fp8_checkpoint(tmp)
        kwargs = {}
        if args.dequantize:
            kwargs["quantization_config"] = DeepseekV3FP8Config(dequantize=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto", **kwargs)
        fp8_layers = sum(type(m).__name__ == "FP8Linear" for m in model.modules())
        print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers + {model.config.num_nextn_predict_layers} MTP, "
              f"{fp8_layers} FP8 linear layers")
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        print("greedy continuation:", out[0, 8:].tolist())


if __name__ == "__main__":
    main()
