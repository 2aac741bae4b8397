"""MTP self-speculative decoding (``generate(..., use_mtp=True)``) against plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_config
from transformers.masking_utils import create_causal_mask

PERIOD = torch.randint(1, 97, (11,), generator=torch.Generator().manual_seed(0))
SEQUENCE = PERIOD.repeat(6)[None]  # a repetitive sequence the MTP module can learn to predict two tokens ahead


def mtp_config(**overrides):
    return tiny_config(num_nextn_predict_layers=1, initializer_range=0.1, **overrides)


def train_mtp_model(config=None):
    """A tiny model trained for 100 steps (about 1.5 s on 2 cores) with the MTP objective on SEQUENCE."""
    model = build_model(config or mtp_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(100):
        ids = SEQUENCE[:, step % 11 : step % 11 + 40]
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert out.mtp_loss < 0.05  # the module really learnt the two-ahead token
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return train_mtp_model()


def reference_drafts(model, sequence):
    """[len - 1] tokens: what MTP module 1 predicts at each position of ``sequence`` [1, len], computed without a cache
    (position i predicts token i + 2)."""
    with torch.no_grad():
        hidden = model.model(sequence).last_hidden_state  # after model.norm: h^0 (docs/equations.md, MTP)
        length = sequence.shape[1] - 1
        positions = torch.arange(length)[None]
        embeds = model.model.embed_tokens(sequence[:, 1:])
        mask = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None,
                                  position_ids=positions)
        _, normed, _ = model.model.mtp_layers[0](
            hidden[:, :length], embeds, model.model.rotary_emb(hidden, positions), mask, position_ids=positions, return_normed=True
        )
        return model.lm_head(normed).argmax(-1)[0]


def both(model, prompt, **kwargs):
    kwargs = dict(max_new_tokens=24, do_sample=False, **kwargs)
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
        speculative = model.generate(prompt, use_mtp=True, **kwargs)
    return plain, speculative


@pytest.mark.parametrize("start,length", [(3, 12), (0, 5), (20, 2)])
def test_trained_mtp_greedy_identical_and_mostly_accepted(trained, start, length):
    prompt = SEQUENCE[:, start : start + length]
    plain, speculative = both(trained, prompt)
    assert torch.equal(plain, speculative)
    stats = trained.mtp_draft_stats
    assert stats.drafted >= 10 and stats.acceptance_rate > 0.8
    # Every accepted draft saves a main-model forward: new tokens = forwards + accepted drafts.
    assert stats.verify_steps + stats.accepted == speculative.shape[1] - prompt.shape[1]


def test_trained_mtp_stops_at_eos_like_plain(trained):
    prompt = SEQUENCE[:, :6]
    eos = int(SEQUENCE[0, 13])
    plain, speculative = both(trained, prompt, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(plain, speculative)
    assert speculative[0, -1] == eos and speculative.shape[1] < prompt.shape[1] + 24


def test_sampling_with_top_k_1_is_greedy(trained):
    # Speculative sampling (draft logits + main logits) with a one-hot distribution must reproduce greedy exactly.
    prompt = SEQUENCE[:, 2:9]
    plain, _ = both(trained, prompt)
    with torch.no_grad():
        sampled = trained.generate(prompt, max_new_tokens=24, do_sample=True, top_k=1, use_mtp=True)
    assert torch.equal(plain, sampled)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_untrained_mtp_greedy_identical_and_drafts_match_reference(attn, seed):
    """With a random MTP module most drafts are rejected: the verifier must still give plain greedy output, and
    every draft must be what the MTP module computes without a cache on the final sequence (so the cached,
    incremental drafting feeds it the right hidden states, tokens and positions)."""
    config = mtp_config()
    config._attn_implementation = attn
    model = build_model(config, seed=seed)
    prompt = torch.randint(1, 97, (1, 4 + seed), generator=torch.Generator().manual_seed(seed))
    plain, speculative = both(model, prompt)
    assert torch.equal(plain, speculative)
    stats = model.mtp_draft_stats
    assert stats.drafted > 5

    reference = reference_drafts(model, speculative)
    for target, draft in stats.drafts:
        assert int(draft) == int(reference[target - 2]), f"draft for position {target}"


def test_use_mtp_without_mtp_modules_raises():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, use_mtp=True)
