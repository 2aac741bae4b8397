"""Generation and PreTrainedModel usage as a transformers user exercises it, against transformers' own
DeepseekV3ForCausalLM loaded from the same folder (fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import save_checkpoint, tiny_config

# layers 1 and 2 (the MoE layers) on disk, the rest in memory
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_checkpoint(tiny_config(), tmp_path_factory.mktemp("usage6"))


def test_a_one_token_input_is_checked_against_the_vocabulary(folder):
    # a one-token input without a cached prefix skipped the id check (taken for a decoding step over the default
    # cache the forward had just made): the embedding failed with "index out of range in self"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with pytest.raises(ValueError, match=r"`input_ids` must lie in \[0, vocab_size=97\), got values in \[97, 97\]"):
        model(torch.tensor([[97]]))
    with pytest.raises(ValueError, match=r"`input_ids` must lie in \[0, vocab_size=97\)"):
        model.generate(torch.tensor([[120]]), max_new_tokens=2, pad_token_id=0)
    with torch.no_grad():  # a valid one-token prompt still generates
        assert model.generate(torch.tensor([[5]]), max_new_tokens=3, pad_token_id=0).shape == (1, 4)


@pytest.mark.parametrize("mla_mode", ["auto", "absorbed"])
def test_generation_with_layers_offloaded_to_disk_gives_transformers_tokens(folder, padded_batch, tmp_path, mla_mode):
    # accelerate keeps an offloaded weight on the meta device except while its own module runs: the absorbed path
    # (decoding steps under `auto`) read kv_b_proj's weight directly and failed with "Tensor on device cpu is not on
    # the expected device meta!"
    ids, mask = padded_batch
    outputs = []
    for n, cls in enumerate((transformers.AutoModelForCausalLM, transformers.DeepseekV3ForCausalLM)):
        model = cls.from_pretrained(folder, device_map=DISK_MAP, offload_folder=tmp_path / str(n)).eval()
        assert model.model.layers[1].self_attn.kv_b_proj.weight.is_meta  # really offloaded
        model.config.mla_mode = mla_mode  # transformers' class ignores the field
        with torch.no_grad():
            outputs.append([model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                           **options) for options in (dict(), dict(num_beams=2))])
    for ours, theirs in zip(*outputs, strict=True):
        assert torch.equal(ours, theirs)


def test_continuous_batching_is_refused_by_name(folder, padded_batch):
    # transformers' paged cache holds per-head keys and values of one width, which MLA does not cache: the generation
    # thread only logged the failure, so generate_batch returned no token and generate(cache_implementation="paged")
    # the bare prompt
    ids, _ = padded_batch
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    config = transformers.GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    for call in (lambda: model.generate_batch(inputs=[ids[0].tolist()], generation_config=config),
                 lambda: model.generate(ids[:1], max_new_tokens=3, pad_token_id=0, cache_implementation="paged"),
                 lambda: model.init_continuous_batching()):
        with pytest.raises(NotImplementedError, match=r"Continuous batching .* attention_backend='mla'"):
            call()


def test_a_static_cache_too_short_for_the_default_length_is_named(folder, padded_batch):
    # with no max_new_tokens / max_length anywhere transformers generates its default 20 new tokens: the room check
    # read no length and let the generation fail in the cache with an IndexError (as transformers' class does)
    ids, mask = padded_batch
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    short = transformers.StaticCache(config=model.config, max_cache_len=12)
    with pytest.raises(ValueError, match=r"holds 12 positions .* up to `max_length=26` tokens \(prompt \+ new\) needs 25"):
        model.generate(ids, attention_mask=mask, pad_token_id=0, past_key_values=short)
    with torch.no_grad():  # a cache with room for them generates the 20 tokens
        roomy = transformers.StaticCache(config=model.config, max_cache_len=25)
        assert model.generate(ids, attention_mask=mask, pad_token_id=0, past_key_values=roomy).shape == (2, 26)


def test_config_return_dict_false_gives_tuples(folder, padded_batch):
    # the base model followed config.return_dict=False and gave a tuple, which the causal LM's forward read by field
    # names: every forward and generate failed with "'tuple' object has no attribute 'last_hidden_state'" (as
    # transformers' class still does)
    ids, mask = padded_batch
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, labels=ids)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.config.return_dict = False
        loss, logits, cache = model(ids, attention_mask=mask, labels=ids)
        assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)
        assert isinstance(cache, transformers.Cache)
        assert isinstance(model(ids, attention_mask=mask, return_dict=True), transformers.utils.ModelOutput)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0), tokens)
