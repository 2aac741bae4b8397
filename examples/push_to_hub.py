"""Push a DeepSeek-V3 model to the Hugging Face Hub in the official layout, with a generated model card.

    hf auth login
    python examples/push_to_hub.py /path/to/checkpoint your-name/your-repo [--private]

Goes through transformers' own `push_to_hub`; the README.md it uploads is our card (parameter counts, plugin
choices, MTP depth, quantization, how to load). This script needs the network; the tests never run it.
"""

import argparse

import transformers

import modeling_deepseek_v3  # noqa: F401  (registers the deepseek_v3 classes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.checkpoint, quantization_config=modeling_deepseek_v3.checkpoint.DeepseekV3FP8Config(dequantize=False)
    ) if _is_fp8(args.checkpoint) else transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype="auto")
    model.push_to_hub(args.repo_id, private=args.private, max_shard_size=args.max_shard_size)
    print(f"pushed to https://huggingface.co/{args.repo_id}")


def _is_fp8(path: str) -> bool:
    config = transformers.AutoConfig.from_pretrained(path)
    return getattr(config, "quantization_config", None) is not None


if __name__ == "__main__":
    main()
