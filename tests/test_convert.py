"""Offline converter (optimum OptimumQuantizer): bf16 <-> official FP8, streaming shard by shard, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file

from conftest import build_model, tiny_config
from modeling_deepseek_v3.quantization import formats
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter, main
from optimum.quantization_base import OptimumQuantizer
from test_checkpoint import raw, read_folder


def test_bf16_fp8_bf16_within_fp8_error(tmp_path):
    cfg = tiny_config(hidden_size=200, kv_lora_rank=72, qk_rope_head_dim=16, intermediate_size=260, num_nextn_predict_layers=1)
    build_model(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="200KB")
    converter = DeepseekV3FP8Converter.from_pretrained(tmp_path / "bf16")
    assert isinstance(converter, OptimumQuantizer)
    converter.quantize(tmp_path / "fp8", progress=False)
    DeepseekV3FP8Converter.from_pretrained(tmp_path / "fp8", to="bf16").quantize(tmp_path / "back", progress=False)
    a, b = read_folder(tmp_path / "bf16"), read_folder(tmp_path / "back")
    assert set(a) == set(b)
    quantized = 0
    for key in a:
        assert b[key].dtype == a[key].dtype and b[key].shape == a[key].shape, key
        if torch.equal(a[key], b[key]):
            continue
        quantized += 1
        rel = ((b[key].float() - a[key].float()).norm() / a[key].float().norm()).item()
        assert rel < 0.05, (key, rel)  # E4M3 with 128x128 scales: ~0.03 on random weights
    assert quantized > 20
    assert "quantization_config" not in json.load(open(tmp_path / "back" / "config.json"))


def _representable_fp8_folder(folder):
    """FP8 weights whose every block holds ±448 and whose scales are powers of two: fp8·scale is exact in bf16
    and re-quantizing gives back amax/448 = the same scale, so FP8 -> bf16 -> FP8 must be bit exact."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (n, k) in enumerate([(88, 200), (260, 200), (200, 136), (300, 260)]):
        w = (torch.randn(n, k, generator=g) * 100).clamp(-440, 440).to(formats.FP8_DTYPE)
        nb, kb = formats.ceil_div(n, 128), formats.ceil_div(k, 128)
        for r in range(nb):
            for c in range(kb):
                w[r * 128, c * 128] = torch.tensor(448.0 if (r + c) % 2 else -448.0).to(formats.FP8_DTYPE)
        scale = torch.pow(2.0, torch.randint(-12, -4, (nb, kb), generator=g).float())
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = w
        tensors[f"model.layers.{i}.mlp.down_proj.weight_scale_inv"] = scale
    tensors["model.norm.weight"] = torch.randn(200, generator=g).to(torch.bfloat16)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    json.dump({"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8"}}, open(folder / "config.json", "w"))
    return tensors


def test_fp8_bf16_fp8_bit_exact_where_representable(tmp_path):
    original = _representable_fp8_folder(tmp_path / "fp8")
    DeepseekV3FP8Converter.from_pretrained(tmp_path / "fp8", to="bf16").quantize(tmp_path / "bf16", progress=False)
    DeepseekV3FP8Converter.from_pretrained(tmp_path / "bf16").quantize(tmp_path / "again", progress=False)
    again = read_folder(tmp_path / "again")
    assert set(again) == set(original)
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(raw(again[key]), raw(tensor)), key
    assert json.load(open(tmp_path / "again" / "config.json"))["quantization_config"]["weight_block_size"] == [128, 128]


def test_cli_converts_with_progress_bar(tmp_path, capsys):
    _representable_fp8_folder(tmp_path / "fp8")
    assert main([str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--to", "bf16"]) == 0
    assert "tensor" in capsys.readouterr().err  # tqdm writes its bar to stderr
    assert read_folder(tmp_path / "bf16")["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert main([str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--to", "bf16"]) == 1  # destination not empty


def test_converter_peak_memory_is_bounded_by_shards_not_model(tmp_path):
    """24 shards of ~2 MB (48 MB model): the converter's peak resident memory must stay near a few shards."""
    src = tmp_path / "many"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    weight_map, shard_bytes = {}, 0
    n = 24
    for s in range(n):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        tensors = {f"model.layers.{s}.mlp.experts.{e}.up_proj.weight": torch.randn(256, 1024, generator=g).to(torch.bfloat16)
                   for e in range(4)}
        save_file(tensors, src / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        shard_bytes = max(shard_bytes, os.path.getsize(src / name))
    json.dump({"metadata": {}, "weight_map": weight_map}, open(src / "model.safetensors.index.json", "w"))
    total = sum(os.path.getsize(src / f) for f in os.listdir(src))
    warm = tmp_path / "warm"
    warm.mkdir()
    for s in range(2):
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        os.link(src / name, warm / name) if hasattr(os, "link") else None
    json.dump({"metadata": {}, "weight_map": {k: v for k, v in weight_map.items() if v in os.listdir(warm)}},
              open(warm / "model.safetensors.index.json", "w"))
    script = textwrap.dedent(f"""
        import re, sys, torch
        from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter
        # warm-up conversion of 2 shards: one-time costs (lazy imports, allocator pools) are not the data's
        DeepseekV3FP8Converter.from_pretrained({str(warm)!r}).quantize({str(tmp_path / "warm-out")!r}, progress=False)
        def status(field):
            return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
        base = status("VmRSS")
        DeepseekV3FP8Converter.from_pretrained({str(src)!r}).quantize({str(tmp_path / "out")!r}, progress=False)
        print(status("VmHWM") - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    # Resident-set peaks carry a few MB of allocator and page-cache noise; a converter that held the model
    # (48 MB of bf16 plus its FP8 copy) would be far above both bounds.
    assert peak < 8 * shard_bytes, (peak, shard_bytes, total)
    assert peak < total / 3, (peak, total)
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) == n


def test_cli_names_a_missing_source(tmp_path, capsys):
    assert main([str(tmp_path / "no-such-folder"), str(tmp_path / "out"), "--to", "fp8"]) == 1
    assert "no-such-folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
