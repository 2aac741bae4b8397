"""Decoding fast paths against the plain ones: MLA modes (auto/absorbed/expanded), the cached absorbed weights of an
FP8 ``kv_b_proj``, the static cache in ``generate`` and a compiled decode step."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, relative_error, tiny_config
from transformers import StaticCache

from modeling_deepseek_v3.plugins.attention.mla import MultiHeadLatentAttention, absorbed_is_cheaper


def varied_model(attn="eager", **overrides):
    # initializer_range 0.1: a random tiny model whose greedy continuations do not collapse to one repeated token,
    # so that token-equality tests compare many distinct decisions.
    config = tiny_config(initializer_range=0.1, **overrides)
    config._attn_implementation = attn
    return build_model(config)


def set_mode(model, mode):
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.mode = mode


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, MultiHeadLatentAttention)]


def ids_and_mask(batch=3, length=9, seed=0, pad=(4, 1, 0)):
    ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pad[:batch]):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_mode_config_field():
    assert tiny_config().mla_mode == "auto"
    with pytest.raises(ValueError, match="mla_mode"):
        tiny_config(mla_mode="fast")
    assert MultiHeadLatentAttention(tiny_config(mla_mode="absorbed"), 0).mode == "absorbed"


def test_auto_rule_picks_absorbed_for_short_queries_only():
    r, nope, v = 512, 128, 128  # the released model's MLA
    assert absorbed_is_cheaper(1, 4096, r, nope, v)  # decoding
    assert absorbed_is_cheaper(2, 100, r, nope, v)  # MTP verification
    assert not absorbed_is_cheaper(512, 512, r, nope, v)  # prefill: queries are the keys
    assert not absorbed_is_cheaper(4096, 4096, r, nope, v)
    assert not absorbed_is_cheaper(1, 1, r, nope, v)  # a one-token prompt: nothing cached to save on


@torch.no_grad()
def test_auto_mode_runs_expanded_prefill_then_absorbed_decode():
    model = varied_model()
    ids, _ = ids_and_mask(batch=1, pad=(0,))
    ran = []  # (module, path) of every attention call
    for module in attention_modules(model):
        for path in ("_attend_expanded", "_attend_absorbed"):
            method = getattr(module, path)
            setattr(module, path, lambda *a, _m=module, _p=path, _f=method, **k: ran.append((_m, _p)) or _f(*a, **k))
    out = model(ids, use_cache=True)
    assert ran and all(path == "_attend_expanded" for _, path in ran)
    ran.clear()
    model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert len(ran) == len(attention_modules(model)) and all(path == "_attend_absorbed" for _, path in ran)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_modes_agree_on_padded_prefill_and_decode(attn):
    """Left-padded batch, prefill of 9 then 4 decode steps, logits of all modes equal (eager and SDPA kernels)."""
    model = varied_model(attn)
    ids, mask = ids_and_mask()
    nxt = torch.randint(1, 97, (3, 4), generator=torch.Generator().manual_seed(5))
    results = {}
    for mode in ("expanded", "absorbed", "auto"):
        set_mode(model, mode)
        out = model(ids, attention_mask=mask, use_cache=True)
        logits, cache, full_mask = [out.logits], out.past_key_values, mask
        for t in range(nxt.shape[1]):
            full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(nxt[:, t : t + 1], attention_mask=full_mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        results[mode] = torch.cat(logits, dim=1)[full_mask.bool()]  # logits at the real tokens only
    assert relative_error(results["absorbed"], results["expanded"]) < 1e-5
    assert relative_error(results["auto"], results["expanded"]) < 1e-5


@torch.no_grad()
def test_absorbed_multi_token_step_over_cache_is_causal():
    """A 3-token step over a cache (the speculative verification shape) equals three 1-token steps."""
    model = varied_model("sdpa")
    set_mode(model, "absorbed")
    ids, _ = ids_and_mask(batch=2, length=12, pad=(0, 0))
    cache = model(ids[:, :9], use_cache=True).past_key_values
    chunk = model(ids[:, 9:], past_key_values=cache, use_cache=True).logits
    cache = model(ids[:, :9], use_cache=True).past_key_values
    steps = torch.cat([model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(9, 12)], 1)
    assert relative_error(chunk, steps) < 1e-5


@torch.no_grad()
def test_absorbed_output_attentions_match_expanded():
    model = varied_model()
    ids, _ = ids_and_mask(batch=2, pad=(0, 0))
    set_mode(model, "expanded")
    expanded = model(ids, output_attentions=True).attentions
    set_mode(model, "absorbed")
    absorbed = model(ids, output_attentions=True).attentions
    assert len(expanded) == len(absorbed) == model.config.num_hidden_layers
    for a, e in zip(absorbed, expanded):
        assert a.shape == e.shape and relative_error(a, e) < 1e-5


@torch.no_grad()
def test_fp8_kv_b_proj_absorbed_weights_cached_and_correct():
    from modeling_deepseek_v3.quantization.linear import FP8Linear

    # Only kv_b_proj in FP8 (the checkpoint's inference format), so that absorbed and FP8-expanded differ by the
    # quantization of kv_b_proj's activations alone.
    model = varied_model()
    for module in attention_modules(model):
        module.kv_b_proj = FP8Linear.from_linear(module.kv_b_proj)
    attn = attention_modules(model)[0]
    assert callable(getattr(attn.kv_b_proj, "dequantize_weight", None))
    ids, _ = ids_and_mask(batch=2, pad=(0, 0))

    set_mode(model, "absorbed")
    absorbed = model(ids).logits
    cached = attn._absorbed_cache
    assert cached is not None and cached[1].dtype == torch.float32
    model(ids)
    assert attn._absorbed_cache is cached  # reused, not dequantized again

    # Absorbed uses the dequantized weight with unquantized activations; expanded runs FP8Linear (activations
    # quantized per 1x128 tile). The reference for the former: expanded with kv_b_proj replaced by its dequantized Linear.
    fp8_layers = {m: m.kv_b_proj for m in attention_modules(model)}
    set_mode(model, "expanded")
    fp8_expanded = model(ids).logits
    for m, layer in fp8_layers.items():
        m.kv_b_proj = layer.dequantize(torch.float32)
    dense_expanded = model(ids).logits
    for m, layer in fp8_layers.items():
        m.kv_b_proj = layer
    assert relative_error(absorbed, dense_expanded) < 1e-5
    assert relative_error(absorbed, fp8_expanded) < 0.1  # E4M3 activations (~0.04 per GEMM) through 3 layers

    # An in-place weight update (load_state_dict copies in place) invalidates the cache.
    attn.kv_b_proj.weight_scale_inv.mul_(2)
    set_mode(model, "absorbed")
    model(ids)
    assert attn._absorbed_cache is not cached
    assert torch.allclose(attn._absorbed_cache[1], 2 * cached[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@torch.no_grad()
def test_static_cache_generate_matches_dynamic(attn):
    model = varied_model(attn)
    ids, mask = ids_and_mask(batch=3, length=7, seed=3, pad=(3, 0, 1))
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)
    assert len(set(dynamic[:, 7:].flatten().tolist())) > 6  # many distinct decisions compared


@torch.no_grad()
def test_static_cache_holds_latent_widths():
    """The StaticCache keeps MLA's different key/value widths: c_kv [B,1,S,r] and k_rope [B,1,S,rope]."""
    model = varied_model()
    config = model.config
    cache = StaticCache(config=config, max_cache_len=32)
    ids, _ = ids_and_mask(batch=2, pad=(0, 0))
    model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert tuple(layer.keys.shape) == (2, 1, 32, config.kv_lora_rank)
    assert tuple(layer.values.shape) == (2, 1, 32, config.qk_rope_head_dim)


def test_compiled_decode_step_matches_eager_decode():
    """torch.compile (backend "eager": Dynamo's capture without code generation, fast on CPU) of one static-cache
    decode step gives the eager step's logits, and no graph break comes from the model's own code: the only one
    allowed is the gather expert executor's host read of the expert counts (plugins/experts, not decoding code)."""
    model = varied_model("sdpa")
    ids, _ = ids_and_mask(batch=2, length=8, pad=(0, 0))
    step = dict(input_ids=torch.tensor([[5], [7]]), position_ids=torch.full((2, 1), ids.shape[1]), use_cache=True)

    def prefilled_cache():
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(ids, past_key_values=cache, use_cache=True)
        return cache

    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(past_key_values=prefilled_cache(), **step).logits
        explanation = torch._dynamo.explain(model.forward)(past_key_values=prefilled_cache(), **step)
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, backend="eager")(past_key_values=prefilled_cache(), **step).logits
    torch._dynamo.reset()
    assert relative_error(compiled, expected) < 1e-5
    assert explanation.graph_count >= 1
    for reason in explanation.break_reasons:
        frames = [frame.filename for frame in reason.user_stack]
        assert frames and "experts" in frames[-1], f"graph break outside the expert executor: {reason.reason} at {frames}"


def _load_benchmark():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_tiny_runs_and_reports_both_models(tmp_path):
    """Functional run of benchmarks/decode.py (numbers not checked: CPU timings mean nothing)."""
    bench = _load_benchmark()
    out = tmp_path / "decode"
    report = bench.main(["--tiny", "--out", str(out), "--new-tokens", "4", "--batches", "1", "2", "--contexts", "24",
                         "--mtp-steps", "10"])
    table = (tmp_path / "decode.md").read_text()
    assert [row["batch"] for row in report["decode"]] == [1, 2]
    for row in report["decode"]:
        assert row["transformers"] > 0 and row["ours_dynamic"] > 0 and row["ours_static"] > 0
        assert row["static_equals_dynamic"] and row["tokens_equal_transformers"]  # fp32: same weights, same tokens
        assert f"| {row['batch']} | " in table
    kv = report["kv_cache_bytes_per_token_per_layer"]
    assert kv["ours"] == (16 + 8) * 4
    assert all(row["identical"] for row in report["mtp"]["rows"])
    assert "| 24 |" in table and (tmp_path / "decode.json").exists()


def test_decode_benchmark_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the full benchmark would run")
    with pytest.raises(SystemExit, match="CUDA GPU"):
        _load_benchmark().main([])
