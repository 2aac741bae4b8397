"""FP8 features used as a transformers user would: an FP8 folder kept in FP8 and run with autograd on, the quantized
model API (`model.dequantize`), and the other paths below, against transformers' own class where it compares."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import build_model, tiny_config
from modeling_deepseek_v3 import DeepseekV3FP8Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """bf16 -> FP8 (the released layout, one MTP module) -> fp32 dequantized by the converter."""
    root = tmp_path_factory.mktemp("fp8_usage")
    build_model(tiny_config(num_nextn_predict_layers=1)).to(torch.bfloat16).save_pretrained(root / "bf16")
    DeepseekV3FP8Converter.from_pretrained(root / "bf16").quantize(root / "fp8", progress=False)
    DeepseekV3FP8Converter.from_pretrained(root / "fp8", to="fp32").quantize(root / "deq32", progress=False)
    return root


def load_fp8(folder, dtype=torch.bfloat16, **kwargs):
    return DeepseekV3ForCausalLM.from_pretrained(
        folder, quantization_config=DeepseekV3FP8Config(dequantize=False), dtype=dtype, **kwargs
    )


def reference_logits(folders):
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folders / "deq32", dtype=torch.float32).eval()
    with torch.no_grad():
        return theirs(IDS).logits


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_a_loaded_fp8_model_runs_with_autograd_on_and_its_fp8_bytes_are_frozen(folders):
    # transformers' loader made the FP8 bytes parameters that require grad, so a forward outside no_grad raised
    model = load_fp8(folders / "fp8")
    stored = [n for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn or n.endswith("scale_inv")]
    assert stored and not any(p.requires_grad for n, p in model.named_parameters() if n in stored)
    assert model.num_parameters(only_trainable=True) < model.num_parameters()
    model.eval()
    assert model(IDS).logits.shape == (2, 9, 97)
    model.train()  # the other parameters (embedding, norms, router, head, eh_proj) train over the FP8 ones
    model(IDS, labels=IDS).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


@pytest.mark.parametrize("load_dtype, to", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.bfloat16)])
def test_model_dequantize_gives_one_dtype_and_transformers_logits(folders, load_dtype, to):
    model = load_fp8(folders / "fp8", dtype=load_dtype).eval()
    assert model.is_quantized and model.hf_quantizer is not None
    plain = model.dequantize(dtype=to) if to is not None else model.dequantize()
    dtype = to or load_dtype
    assert not plain.is_quantized and getattr(plain.config, "quantization_config", None) is None
    assert plain.config.dtype == dtype
    assert {p.dtype for p in plain.parameters()} == {dtype}  # another dtype than the load's used to mix the two
    assert {b.dtype for n, b in plain.named_buffers() if n.endswith("e_score_correction_bias")} == {torch.float32}
    with torch.no_grad():
        logits = plain(IDS).logits
    assert logits.dtype == dtype
    # the FP8 weights times their scales, as transformers' class sees the converter's fp32 folder
    assert relative(logits, reference_logits(folders)) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_model_dequantize_refuses_a_dtype_that_is_not_a_float(folders):
    model = load_fp8(folders / "fp8")
    with pytest.raises(ValueError, match="dequantize.*torch.int8"):
        model.dequantize(dtype=torch.int8)
    assert model.is_quantized  # nothing replaced


@pytest.mark.parametrize("cast, dtype", [("half", torch.float16), ("float", torch.float32), ("bfloat16", torch.bfloat16)])
def test_an_fp8_folder_casts_with_half_and_float_like_with_to(folders, cast, dtype):
    # transformers refuses .half() and .float() on any quantized model; `.to(dtype)` worked, so these did not match
    model = load_fp8(folders / "fp8", dtype=torch.float32).eval()
    stored = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.float8_e4m3fn or "scale_inv" in n}
    with torch.no_grad():
        before = model(IDS).logits
    model = model.to(dtype) if cast == "bfloat16" else getattr(model, cast)()
    after = dict(model.named_parameters())
    for name, tensor in stored.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert model.model.embed_tokens.weight.dtype == dtype and model.dtype == dtype
    with torch.no_grad():
        logits = model(IDS).logits
    assert logits.dtype == dtype and relative(logits, before) < 3e-2


def test_a_dequantized_fp8_inference_model_saves_a_folder_that_loads_again(folders, tmp_path):
    # loaded with the plugin's inference mode, dequantized, the config still named the mode, which loads FP8 folders
    # only: the saved folder was refused by this class (transformers' read it)
    model = DeepseekV3ForCausalLM.from_pretrained(folders / "fp8", quantizer="fp8_block", fp8_mode="inference").eval()
    plain = model.dequantize()
    assert plain.config.quantizer is None
    with torch.no_grad():
        logits = plain(IDS).logits
    plain.save_pretrained(tmp_path / "plain")
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert type(reloaded.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, logits)


def test_converting_an_fp8_inference_save_to_bf16_gives_a_folder_that_loads(folders, tmp_path):
    # the folder's config named the plugin's inference mode (FP8 checkpoints only) and the converter kept it
    DeepseekV3ForCausalLM.from_pretrained(folders / "fp8", quantizer="fp8_block", fp8_mode="inference").save_pretrained(tmp_path / "inf")
    DeepseekV3FP8Converter.from_pretrained(tmp_path / "inf", to="bf16").quantize(tmp_path / "bf16", progress=False)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert ours.config.quantizer is None and type(ours.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, theirs(IDS).logits)


@pytest.mark.parametrize("base", ["fp8", "deq32"])
def test_lora_on_kv_b_proj_counts_in_absorbed_attention(folders, base):
    # the absorbed path (what `auto` picks for a decoding step) read kv_b_proj's weight and skipped the adapter's
    # update; over an FP8 base it read the wrapper's FP8 bytes without their scales
    from peft import LoraConfig, get_peft_model

    from modeling_deepseek_v3.lora import prepare_lora_config

    model = (load_fp8(folders / base, dtype=torch.float32) if base == "fp8"
             else DeepseekV3ForCausalLM.from_pretrained(folders / base, dtype=torch.float32)).eval()
    peft_model = get_peft_model(model, prepare_lora_config(model, LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj"])))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    peft_model.eval()
    ids = IDS[:1, :6]
    logits = {}
    for mode in ("expanded", "absorbed"):
        model.config.mla_mode = mode
        with torch.no_grad():
            logits[mode] = peft_model(ids).logits
    assert torch.equal(logits["absorbed"], logits["expanded"])
    model.config.mla_mode = "auto"
    generated = peft_model.generate(ids, max_new_tokens=5, do_sample=False)
    model.config.mla_mode = "expanded"
    expected = ids
    with torch.no_grad():
        for _ in range(5):
            expected = torch.cat([expected, peft_model(expected).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(generated, expected)


def test_fp8_block_trains_under_autocast_with_experts_quantized_one_by_one():
    # an expert side that is not a multiple of 128 quantizes expert by expert, and autocast's stack (transformers'
    # Trainer with bf16=True) refused the FP8 pieces: 'Unexpected floating ScalarType in at::autocast::prioritize'
    config = tiny_config(quantizer="fp8_block")
    assert (2 * config.moe_intermediate_size) % 128 and config.hidden_size % 128
    model = build_model(config).train()
    reference = build_model(tiny_config()).train()
    ids = IDS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
        expected = reference(ids, labels=ids).loss
    loss.backward()
    expected.backward()
    grads = [(p.grad, r.grad) for p, r in zip(model.parameters(), reference.parameters()) if r.grad is not None]
    assert all(g is not None and g.dtype == torch.float32 for g, _ in grads)
    flat, flat_ref = (torch.cat([g.flatten() for g in gs]) for gs in zip(*grads))
    assert abs(loss.item() - expected.item()) < 2e-2 and relative(flat, flat_ref) < 0.1  # FP8 (and bf16) rounding
    # the inference mode quantizes the experts the same way when the model is built under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        frozen = build_model(tiny_config(quantizer="fp8_block", fp8_mode="inference"))
    assert frozen.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_model_dequantize_undoes_the_fp8_block_plugin(mode, tmp_path):
    # such a model has no hf_quantizer, and transformers' dequantize said "first quantize your model"
    model = build_model(tiny_config(quantizer="fp8_block", fp8_mode=mode)).eval()
    with torch.no_grad():
        fp8 = model(IDS).logits
    plain = model.dequantize()
    assert plain.config.quantizer is None and plain.config._experts_implementation != "deepseek_fp8"
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith(("o_proj", "kv_b_proj")))
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    with torch.no_grad():
        logits = plain(IDS).logits
    assert 1e-4 < relative(logits, fp8) < 0.1  # the FP8 GEMMs' rounding is gone
    plain.save_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()(IDS).logits, logits)
    with pytest.raises(ValueError, match="first quantize"):
        build_model(tiny_config()).dequantize()  # an unquantized model keeps transformers' answer
