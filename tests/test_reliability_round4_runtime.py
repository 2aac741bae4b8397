"""Runtime inputs that failed deep inside torch or transformers, or ran and gave a wrong result, get an error naming
the argument, tensor or value: prepared 4-D masks, caches of another depth, type or dtype, tensor `logits_to_keep`,
non-finite embeddings, misspelt keyword arguments, `mla_mode` set at run time, the MTP loss under a 4-D mask, a
`num_items_in_batch` below the micro-batch's own targets, and generation arguments transformers misreads. What
transformers' conventions allow keeps working beside each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import build_model, tiny_config
from host_reads import HostReads

IDS = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


@pytest.fixture(scope="module")
def mtp_model():
    return build_model(tiny_config(num_nextn_predict_layers=1))


def _filled_dynamic_cache(model, ids=IDS):
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


@torch.no_grad()
def test_4d_masks_of_the_wrong_heads_keys_or_dtype_are_named(model):
    # each failed inside SDPA ("The size of tensor a (4) must match the size of tensor b (3)", "Expected attn_mask
    # dtype to be bool or float or to match query dtype")
    shape = r"4-D `attention_mask` must have shape \[batch=2 \(or 1\), 1 or heads, seq_len=6, keys = "
    with pytest.raises(ValueError, match=shape + r"seq_len = 6\] \(heads = 4\) .* got \[2, 3, 6, 6\]"):
        model(IDS, attention_mask=torch.ones(2, 3, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=shape + r"seq_len = 6\] .* got \[2, 1, 6, 8\]"):
        model(IDS, attention_mask=torch.ones(2, 1, 6, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"A float 4-D `attention_mask` must be float32, got torch.float16"):
        model(IDS, attention_mask=torch.zeros(2, 1, 6, 6, dtype=torch.float16))
    cache = _filled_dynamic_cache(model)
    with pytest.raises(ValueError, match=r"seq_len=1, keys = past \+ seq_len = 6 \+ 1\] .* got \[2, 1, 1, 3\]"):
        model(IDS[:, :1], past_key_values=cache, use_cache=True, attention_mask=torch.ones(2, 1, 1, 3, dtype=torch.bool))
    static = transformers.StaticCache(config=model.config, max_cache_len=10)
    with pytest.raises(ValueError, match=r"keys = the static cache's max_cache_len = 10\] .* got \[2, 1, 6, 6\]"):
        model(IDS, past_key_values=static, use_cache=True, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.bool))
    # the shapes and dtypes the attention takes keep working: per-head masks, float32, the static cache's width
    reference = model(IDS).logits
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(model(IDS, attention_mask=causal.expand(2, 4, 6, 6)).logits, reference)
    additive = torch.zeros(6, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    torch.testing.assert_close(model(IDS, attention_mask=additive.expand(1, 1, 6, 6)).logits, reference)
    model(IDS[:, :1], past_key_values=cache, use_cache=True, attention_mask=torch.ones(2, 1, 1, 7, dtype=torch.bool))
    padded = torch.zeros(6, 10, dtype=torch.bool)
    padded[:, :6] = causal
    torch.testing.assert_close(
        model(IDS, past_key_values=static, use_cache=True, attention_mask=padded.expand(2, 1, 6, 10)).logits, reference
    )


@torch.no_grad()
def test_caches_of_another_depth_type_or_dtype_are_named(model):
    shallow = build_model(tiny_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"`past_key_values` has 2 layers, but this model has 3 decoder layers"):
        model(IDS[:, :1], past_key_values=_filled_dynamic_cache(shallow), use_cache=True)  # was an IndexError
    with pytest.raises(ValueError, match=r"`past_key_values` has 2 layers"):
        model.generate(IDS[:1], past_key_values=transformers.DynamicCache(config=shallow.config), max_new_tokens=2)
    deep = build_model(tiny_config(num_hidden_layers=5))
    for cache in (transformers.DynamicCache(config=deep.config), transformers.DynamicCache()):
        deep(IDS, past_key_values=cache, use_cache=True)  # its first 3 layers fit this model: it ran on them
        with pytest.raises(ValueError, match=r"holds entries for layer 3, but this model has 3 decoder layers"):
            model(IDS[:, :1], past_key_values=cache, use_cache=True)
    encoder_decoder = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
    with pytest.raises(TypeError, match=r"`past_key_values` is an EncoderDecoderCache, which is for encoder-decoder"):
        model(IDS, past_key_values=encoder_decoder, use_cache=True)
    mha = build_model(tiny_config(attention_backend="mha"))
    with pytest.raises(ValueError, match=r"widths \[16, 8\], but this model's attention caches \[20, 10\]"):
        mha(IDS[:, :1], past_key_values=_filled_dynamic_cache(model), use_cache=True)  # was a torch.cat error
    with pytest.raises(ValueError, match=r"caches torch.float32 keys, but the model computes in torch.bfloat16"):
        build_model(tiny_config()).bfloat16()(IDS[:, :1], past_key_values=_filled_dynamic_cache(model), use_cache=True)
    # a cache filled under autocast keeps working under it; a lazily grown cache of this model too
    cache = transformers.DynamicCache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(IDS, past_key_values=cache, use_cache=True)
        model(IDS[:, :1], past_key_values=cache, use_cache=True)
    model(IDS[:, :1], past_key_values=_filled_dynamic_cache(model), use_cache=True)


@torch.no_grad()
def test_logits_to_keep_tensors_and_bools_are_named(model):
    message = r"A tensor `logits_to_keep` must be 1-D: the integer positions .* over the 6 positions\), got dtype "
    for bad, got in ((torch.tensor([1.5]), r"torch.float32 of shape \[1\]"),  # was an IndexError
                     (torch.tensor([[1, 2]]), r"torch.int64 of shape \[1, 2\]"),  # gave 4-D logits
                     (torch.tensor(2), r"torch.int64 of shape \[\]"),  # gave [batch, vocab] logits
                     (torch.ones(5, dtype=torch.bool), r"torch.bool of shape \[5\]")):
        with pytest.raises(ValueError, match=message + got):
            model(IDS, logits_to_keep=bad)
    with pytest.raises(ValueError, match=r"`logits_to_keep` must be an int ≥ 0 .* got True"):  # kept one position
        model(IDS, logits_to_keep=True)
    full = model(IDS).logits
    torch.testing.assert_close(model(IDS, logits_to_keep=np.int64(2)).logits, full[:, -2:])
    torch.testing.assert_close(model(IDS, logits_to_keep=torch.tensor([0, 5])).logits, full[:, [0, 5]])
    keep = torch.tensor([True, False, False, True, False, True])
    torch.testing.assert_close(model(IDS, logits_to_keep=keep).logits, full[:, keep])


def test_non_finite_inputs_embeds_are_named_in_the_one_host_read(model):
    embeds = model.model.embed_tokens(IDS).detach().clone()
    embeds[1, 3, 2] = float("nan")
    embeds[0, 0, 0] = float("inf")
    with torch.no_grad(), pytest.raises(ValueError, match=r"`inputs_embeds` holds 2 non-finite value\(s\) \(NaN or inf\)"):
        model(inputs_embeds=embeds)  # every logit was NaN
    with torch.no_grad(), HostReads() as reads:
        model(inputs_embeds=model.model.embed_tokens(IDS))
    ours = [w for w in reads.where if "modeling_deepseek_v3.py" in w]
    assert len(ours) == 1 and ours[0].startswith("tolist"), reads.where


@torch.no_grad()
def test_unknown_forward_keyword_arguments_are_named(model):
    # **kwargs swallowed each of them, and the forward ran without it
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['attention_masks'\] \(`attention_masks`: did you mean `attention_mask`\?\)"):
        model(IDS, attention_masks=torch.ones(2, 6))
    with pytest.raises(TypeError, match=r"\['past_key_value'\] \(`past_key_value`: did you mean `past_key_values`\?\)"):
        model(IDS, past_key_value=transformers.DynamicCache())
    with pytest.raises(TypeError, match=r"\['lables'\] \(`lables`: did you mean `labels`\?\)"):
        model.train()(IDS, lables=IDS)
    model.eval()
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['foo'\]"):
        model(IDS, foo=1)
    # transformers' per-call options and the token types some tokenizers return keep working
    out = model(IDS, token_type_ids=torch.zeros_like(IDS), output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == 2 and len(out.hidden_states) == 4
    # what transformers' naive pipeline-parallel forward hands a stage's base model: the head's arguments, bound by
    # the head's signature, its **kwargs as one mapping (a misspelt name inside it is still named)
    model.model(input_ids=IDS, labels=None, logits_to_keep=0, return_mtp_loss=None, shift_labels=None, kwargs={})
    with pytest.raises(TypeError, match=r"\['attention_masks'\]"):
        model.model(input_ids=IDS, kwargs={"attention_masks": torch.ones(2, 6)})


@torch.no_grad()
def test_a_cache_position_the_cache_is_not_written_at_is_named(model):
    # nothing reads it (the cache is written at its own length): one that says otherwise was ignored without a word
    with pytest.raises(ValueError, match=r"`cache_position` \(3\.\.8\) disagrees with the 0 positions `past_key_values` holds"):
        model(IDS, cache_position=torch.arange(3, 9))
    cache = _filled_dynamic_cache(model, IDS[:, :4])
    with pytest.raises(ValueError, match=r"`cache_position` \(0\.\.1\) disagrees with the 4 positions .* positions 4\.\.5"):
        model(IDS[:, 4:], past_key_values=cache, use_cache=True, cache_position=torch.arange(2))
    static = transformers.StaticCache(config=model.config, max_cache_len=10)
    model(IDS[:, :4], past_key_values=static, use_cache=True)
    with pytest.raises(ValueError, match=r"`cache_position` \(5\.\.6\) disagrees with the 4 positions"):
        model(IDS[:, 4:], past_key_values=static, use_cache=True, cache_position=torch.arange(5, 7))
    with pytest.raises(ValueError, match=r"`cache_position` must be the 6 integer positions .* got dtype torch.int64 of shape \[1, 6\]"):
        model(IDS, cache_position=torch.arange(6)[None])
    # the positions it should hold keep working, as they do in transformers' class
    torch.testing.assert_close(model(IDS, cache_position=torch.arange(6)).logits, model(IDS).logits)
    model(IDS[:, 4:], past_key_values=static, use_cache=True, cache_position=torch.arange(4, 6))


def test_mla_mode_set_on_the_config_takes_effect_or_is_named():
    model = build_model(tiny_config())
    attention = model.model.layers[0].self_attn
    assert not attention._use_absorbed(6, 6)  # auto: a prefill expands
    model.config.mla_mode = "absorbed"  # was read once, at construction: setting it changed nothing
    assert attention._use_absorbed(6, 6)
    model.config.mla_mode = "absorbd"
    with torch.no_grad(), pytest.raises(ValueError, match=r"Config field `mla_mode` must be one of \['expanded', 'absorbed', 'auto'\], got 'absorbd'"):
        model(IDS)
    model.config.mla_mode = "auto"
    attention.mode = "expand"  # one module's own override
    with torch.no_grad(), pytest.raises(ValueError, match=r"`mode` of attention layer 0 must be one of .* got 'expand'"):
        model(IDS)
    attention.mode = "absorbed"
    assert attention._use_absorbed(6, 6) and not model.model.layers[1].self_attn._use_absorbed(6, 6)


def test_experts_implementation_dicts_with_other_keys_are_named(model):
    # the keys name sub-configs; this model has none, so the dict was ignored without a word
    with pytest.raises(ValueError, match=r"its only key is '' \(the model itself\), got \['decoder'\]"):
        model.set_experts_implementation({"decoder": "eager"})
    try:
        model.set_experts_implementation({"": "eager"})
        assert model.config._experts_implementation == "eager"
    finally:
        model.set_experts_implementation("grouped_mm")


def test_the_mtp_loss_under_a_4d_mask_is_refused(mtp_model):
    # a packed-documents mask held for the main model only: the MTP modules attended across the documents
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:3, :3] = mask[3:, 3:] = torch.ones(3, 3, dtype=torch.bool).tril()
    mask = mask.expand(2, 1, 6, 6)
    with torch.no_grad(), pytest.raises(ValueError, match=r"The MTP loss needs a 2-D padding `attention_mask` \(or none\)"):
        mtp_model(IDS, labels=IDS, attention_mask=mask, return_mtp_loss=True)
    with torch.no_grad():
        assert mtp_model(IDS, labels=IDS, attention_mask=mask, return_mtp_loss=False).mtp_loss is None


def test_num_items_in_batch_below_the_micro_batch_targets_is_named(model):
    # 0 made the loss a sum over the targets, a smaller count scaled it up
    for given, shown in ((0, "0"), (torch.tensor(3), "3")):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"`num_items_in_batch` \({shown}\) is fewer than the 10 targets of this micro-batch"):
            model(IDS, labels=IDS, num_items_in_batch=given)
    padding = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        # the count is the Trainer's (the 10 labels other than -100, padding or not); padding is left out of the
        # targets (8 here), so the batch alone gives the model's mean, and a count of a larger accumulated batch less
        alone = model(IDS, labels=IDS, attention_mask=padding, num_items_in_batch=10).loss
        torch.testing.assert_close(alone, model(IDS, labels=IDS, attention_mask=padding).loss)
        torch.testing.assert_close(model(IDS, labels=IDS, attention_mask=padding, num_items_in_batch=torch.tensor(20)).loss, alone / 2)


def test_generate_arguments_transformers_misreads_are_named(model, mtp_model):
    prompt = IDS[:1, :5]
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be an int > 0 .* got 1.5"):  # generated 2 tokens
        model.generate(prompt, max_new_tokens=1.5)
    with pytest.raises(ValueError, match=r"`num_beams` must be an int ≥ 1 \(1 = no beam search\), got 0"):  # ZeroDivisionError
        model.generate(prompt, max_new_tokens=2, num_beams=0)
    with pytest.raises(TypeError, match=r"`past_key_values` must be a transformers Cache .* got list"):  # AttributeError
        model.generate(prompt, max_new_tokens=2, past_key_values=[])
    # beam search dropped the drafts with a log line (and left the last call's draft statistics in place)
    message = r"`use_mtp=True` drafts for greedy decoding and sampling only; with `num_beams=2` the drafts would be dropped"
    with pytest.raises(ValueError, match=message):
        mtp_model.generate(prompt, max_new_tokens=2, num_beams=2, use_mtp=True)
    with pytest.raises(ValueError, match=message):
        mtp_model.generate(prompt, generation_config=transformers.GenerationConfig(max_new_tokens=2, num_beams=2), use_mtp=True)
    assert model.generate(prompt, max_new_tokens=2, num_beams=2, do_sample=False).shape == (1, 7)
    assert mtp_model.generate(prompt, max_new_tokens=2, use_mtp=True, do_sample=False).shape == (1, 7)


def test_a_cast_to_float8_is_refused():
    model = build_model(tiny_config(num_hidden_layers=2))
    for call in (lambda: model.to(torch.float8_e4m3fn), lambda: model.to("cpu", torch.float8_e5m2),
                 lambda: model.to(dtype=torch.float8_e4m3fn)):
        with pytest.raises(ValueError, match=r"Cannot cast the model to torch.float8_e\w+: no layer computes in float8"):
            call()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.to(torch.float64).model.embed_tokens.weight.dtype == torch.float64  # other casts unchanged
