"""Generation strategies and cache reuse as a transformers user drives them, against transformers' own
DeepseekV3ForCausalLM loaded from the same folder (fp32): beam search's scores and cache reorders in every MLA mode,
a cache passed back in (a copied prefix, a cropped cache, a static cache reset), transformers' quantized cache, and
assisted decoding (an assistant model, prompt lookup, MTP drafts) over a cache that already holds part of the prompt.

(Group beam search, contrastive search and constrained beam search moved to hub `custom_generate` repositories in
transformers 5.x and are not run here; `cache_implementation="offloaded"` needs CUDA, in transformers' class too.)"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import save_checkpoint, tiny_config
from test_speculative import SEQUENCE, train_mtp_model
from transformers.cache_utils import Cache, QuantizedLayer

MLA_MODES = ["auto", "expanded", "absorbed"]
GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_checkpoint(tiny_config(num_nextn_predict_layers=1), tmp_path_factory.mktemp("generation9"))
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(ours) is not type(theirs)
    return ours, theirs


@pytest.fixture
def ours_in(pair, request):
    """Our model in the MLA mode the test is parametrized with (transformers' class has one mode)."""
    ours = pair[0]
    ours.config.mla_mode = request.param
    yield ours
    ours.config.mla_mode = "auto"


def generate(model, *args, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(*args, **GREEDY | kwargs)


def assert_steps_close(ours, theirs):
    assert len(ours) == len(theirs)
    for step_ours, step_theirs in zip(ours, theirs, strict=True):
        torch.testing.assert_close(step_ours, step_theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ours_in", MLA_MODES, indirect=True)
def test_beam_search_scores_and_reorders_give_transformers_results(ours_in, pair, padded_batch):
    # num_return_sequences, a length penalty, early stopping and several EOS ids: the beams that finish early and the
    # ones reordered into the latent cache at every step must be transformers' (tokens, scores, beam indices)
    ids, mask = padded_batch
    theirs = pair[1]
    options = dict(attention_mask=mask, max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=0.6,
                   early_stopping=True, eos_token_id=[5, 7, 11, 13], return_dict_in_generate=True, output_scores=True,
                   output_logits=True)
    for extra in (dict(), dict(cache_implementation="static")):
        out, ref = generate(ours_in, ids, **options, **extra), generate(theirs, ids, **options, **extra)
        assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.beam_indices, ref.beam_indices)
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)
        assert_steps_close(out.scores, ref.scores)
        assert_steps_close(out.logits, ref.logits)


@pytest.mark.parametrize("ours_in", MLA_MODES, indirect=True)
def test_a_mask_with_zeros_inside_and_prompt_embeddings_give_transformers_tokens(ours_in, pair, padded_batch):
    ids, mask = padded_batch
    theirs = pair[1]
    holes = mask.clone()
    holes[0, 2:4] = 0  # masked tokens in the middle of the first prompt
    for options in (dict(), dict(num_beams=3, num_return_sequences=2)):
        assert torch.equal(generate(ours_in, ids, attention_mask=holes, max_new_tokens=6, **options),
                           generate(theirs, ids, attention_mask=holes, max_new_tokens=6, **options))
        embeds = theirs.get_input_embeddings()(ids)
        assert torch.equal(generate(ours_in, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, **options),
                           generate(theirs, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, **options))


def test_attentions_and_hidden_states_of_every_step_are_transformers(pair, padded_batch):
    # absorbed attention (the decoding steps under `auto`) scores the latent cache: its weights are the same
    # probabilities over the same positions as the expanded path's and transformers'
    ids, mask = padded_batch
    ours, theirs = pair
    for model in pair:
        model.config._attn_implementation = "eager"
    try:
        options = dict(attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True, output_attentions=True,
                       output_hidden_states=True)
        out, ref = generate(ours, ids, **options), generate(theirs, ids, **options)
    finally:
        for model in pair:
            model.config._attn_implementation = "sdpa"
    assert torch.equal(out.sequences, ref.sequences)
    for field in ("attentions", "hidden_states"):
        for step_ours, step_theirs in zip(getattr(out, field), getattr(ref, field), strict=True):
            assert_steps_close(step_ours, step_theirs)


@pytest.mark.parametrize("ours_in", MLA_MODES, indirect=True)
def test_a_prompt_cache_is_reused_copied_cropped_and_reset(ours_in, pair):
    # the ways transformers' docs reuse a cache: a prefix cache copied for two continuations, a cache cropped back,
    # a static cache passed in and reset for another prompt; each continues as a fresh generation of the whole prompt
    theirs = pair[1]
    prompt = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    prefix = transformers.DynamicCache(config=ours_in.config)
    with torch.no_grad():
        ours_in(prompt[:, :6], past_key_values=prefix)
    for tail in ([[11, 12]], [[40, 41, 42, 43]]):
        full = torch.cat([prompt[:, :6], torch.tensor(tail)], dim=1)
        assert torch.equal(generate(ours_in, full, past_key_values=copy.deepcopy(prefix), max_new_tokens=5),
                           generate(theirs, full, max_new_tokens=5))
    assert prefix.get_seq_length() == 6  # the copies grew, not the prefix
    prefix.crop(-2)
    assert torch.equal(generate(ours_in, prompt, past_key_values=prefix, max_new_tokens=5),
                       generate(theirs, prompt, max_new_tokens=5))
    static = transformers.StaticCache(config=ours_in.config, max_cache_len=16)
    for length in (9, 7):
        static.reset()
        assert torch.equal(generate(ours_in, prompt[:, :length], past_key_values=static, max_new_tokens=5),
                           generate(theirs, prompt[:, :length], max_new_tokens=5))


def test_transformers_fp8_quantized_cache_generates(pair, padded_batch):
    # the fp8 backend keeps the states quantized in a layout of its own and leaves the layer's `keys` a 1-D empty
    # tensor: the cache check read its length 0 as the batch size and refused every step ("holds a batch of 0
    # sequences")
    ids, mask = padded_batch
    ours, theirs = pair
    quantized = dict(cache_implementation="quantized", cache_config={"backend": "fp8"})
    options = dict(attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    out = generate(ours, ids, **options, **quantized)
    assert torch.equal(out.sequences, generate(theirs, ids, **options, **quantized).sequences)
    exact = generate(ours, ids, **options)
    assert_steps_close(out.logits[:1], exact.logits[:1])  # the prefill attends to its own unquantized states
    for step, step_exact in zip(out.logits[1:], exact.logits[1:], strict=True):
        torch.testing.assert_close(step, step_exact, atol=0.05, rtol=0)  # within e4m3 rounding of the cache
    beams = generate(ours, ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, **quantized)
    assert beams.shape == (4, 12)


class _ExactQuantizedLayer(QuantizedLayer):
    """transformers' residual-window quantized layer with a lossless 'quantization' (quanto and HQQ are not
    installed here): once the residual part is flushed into the quantized states, `keys` is a 1-D empty tensor."""

    def _quantize(self, tensor, axis):
        return tensor.clone()

    def _dequantize(self, q_tensor):
        return q_tensor


def test_a_quantized_cache_past_its_residual_window_gives_plain_tokens(pair, padded_batch):
    ids, mask = padded_batch
    ours = pair[0]
    cache = Cache(layers=[_ExactQuantizedLayer(residual_length=3) for _ in range(ours.config.num_hidden_layers)])
    # the prefill quantizes the whole prompt, and every third step flushes the residual part again
    out = generate(ours, ids, attention_mask=mask, max_new_tokens=8, past_key_values=cache)
    assert torch.equal(out, generate(ours, ids, attention_mask=mask, max_new_tokens=8))


@pytest.mark.parametrize("draft", ["prompt lookup", "assistant: transformers' class", "assistant: ours", "use_mtp"])
def test_assisted_decoding_over_a_cache_holding_part_of_the_prompt(pair, draft):
    # transformers' assisted loop fed its first step the whole prompt on top of a cache that already held its first
    # positions (the plain loop's prefill skips them): those went through the model twice, every logit after them
    # changed (by up to 0.8 here) and so did the tokens, silently
    ours, theirs = pair
    options = {"prompt lookup": dict(prompt_lookup_num_tokens=2), "assistant: transformers' class": dict(assistant_model=theirs),
               "assistant: ours": dict(assistant_model=ours), "use_mtp": dict(use_mtp=True)}[draft]
    prompt = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = generate(theirs, prompt, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)
    cache = transformers.DynamicCache(config=ours.config)
    with torch.no_grad():
        ours(prompt[:, :8], past_key_values=cache)
    out = generate(ours, prompt, past_key_values=cache, max_new_tokens=6, return_dict_in_generate=True,
                   output_logits=True, **options)
    assert torch.equal(out.sequences, expected.sequences)
    assert_steps_close(out.logits, expected.logits)
    assert cache.get_seq_length() == 12 + 6 - 1  # every position once


def test_mtp_drafts_over_a_cache_holding_part_of_the_prompt_are_accepted():
    # the MTP module drafts from the main model's hidden states of the positions the first step ran (the cached
    # prefix has none): trained on the sequence, its drafts are still nearly all accepted
    model = train_mtp_model()
    prompt = SEQUENCE[:, 2:20]
    plain = generate(model, prompt, max_new_tokens=20)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :12], past_key_values=cache)
    assert torch.equal(generate(model, prompt, past_key_values=cache, max_new_tokens=20, use_mtp=True), plain)
    stats = model.mtp_draft_stats
    assert stats.drafted >= 8 and stats.acceptance_rate > 0.8
