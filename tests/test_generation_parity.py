"""``generate`` against transformers' own DeepseekV3ForCausalLM on the same checkpoint folder, strategy by strategy.

transformers' generation test mixins are not in its PyPI sdist, so this module checks what they check that can
differ between two implementations of one model: each decoding strategy, cache type and output option gives the
same tokens (and scores, logits, hidden states) from both classes. The model differs from transformers' in its
caches (the latent cache, read in the absorbed mode while decoding), its masks and its experts, so beam search
(which reorders the cache), assisted and prompt-lookup decoding (which crop it), a continued cache and a static
cache are where a difference would show.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import save_checkpoint, tiny_config

from modeling_deepseek_v3 import DeepseekV3ForCausalLM


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = save_checkpoint(tiny_config(), tmp_path_factory.mktemp("generation"))
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert isinstance(ours, DeepseekV3ForCausalLM) and not isinstance(theirs, DeepseekV3ForCausalLM)
    return ours, theirs


def both(pair, *args, **kwargs):
    """The same generate call on both classes, each from the same sampling seed."""
    outputs = []
    for model in pair:
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(model.generate(*args, pad_token_id=0, **kwargs))
    return outputs


STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=5, temperature=0.8),
    "sampling, 3 sequences each": dict(do_sample=True, num_return_sequences=3),
    "beam search": dict(do_sample=False, num_beams=3),
    "beam search, 2 sequences each": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam sampling": dict(do_sample=True, num_beams=2),
    "min_new_tokens with an eos": dict(do_sample=False, min_new_tokens=6, eos_token_id=5),
    "repetition penalty, no repeated bigram": dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=2),
    "static cache": dict(do_sample=False, cache_implementation="static"),
    "static cache, beam search": dict(do_sample=False, num_beams=2, cache_implementation="static"),
    "static cache, sampling": dict(do_sample=True, cache_implementation="static"),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_gives_transformers_tokens(pair, padded_batch, strategy):
    ids, mask = padded_batch
    ours, theirs = both(pair, ids, attention_mask=mask, max_new_tokens=8, **STRATEGIES[strategy])
    assert torch.equal(ours, theirs)


def test_scores_logits_and_hidden_states_match(pair, padded_batch):
    ids, mask = padded_batch
    ours, theirs = both(pair, ids, attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                        output_scores=True, output_logits=True, output_hidden_states=True)
    assert torch.equal(ours.sequences, theirs.sequences)
    for field in ("scores", "logits"):
        for step_ours, step_theirs in zip(getattr(ours, field), getattr(theirs, field), strict=True):
            torch.testing.assert_close(step_ours, step_theirs, atol=1e-4, rtol=1e-4)
    for step_ours, step_theirs in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        for layer_ours, layer_theirs in zip(step_ours, step_theirs, strict=True):  # embeddings + every layer
            torch.testing.assert_close(layer_ours, layer_theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("draft", ["assistant: transformers' class", "assistant: ours", "prompt lookup"])
def test_assisted_decoding_gives_transformers_tokens(pair, padded_batch, draft):
    ours, theirs = pair
    prompt = padded_batch[0][:1].repeat(1, 2)  # batch 1 (assisted decoding's limit); repeats for prompt lookup
    options = {"assistant: transformers' class": dict(assistant_model=theirs), "assistant: ours": dict(assistant_model=ours),
               "prompt lookup": dict(prompt_lookup_num_tokens=3)}[draft]
    assert torch.equal(*both(pair, prompt, max_new_tokens=8, do_sample=False, **options))


def test_generation_continues_from_a_returned_cache(pair, padded_batch):
    ids, mask = padded_batch
    for model in pair:
        with torch.no_grad():
            first = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                   return_dict_in_generate=True)
            longer_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
            continued = model.generate(first.sequences, attention_mask=longer_mask, past_key_values=first.past_key_values,
                                       max_new_tokens=4, do_sample=False, pad_token_id=0)
            at_once = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(continued, at_once), type(model).__module__


def test_generation_from_inputs_embeds_matches(pair, padded_batch):
    ids, mask = padded_batch
    ours, theirs = pair
    outputs = []
    for model in pair:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            outputs.append(model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert torch.equal(*outputs)
