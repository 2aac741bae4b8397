"""MTP self-speculative decoding over a static cache (``generate(..., use_mtp=True, cache_implementation="static")``)
against plain greedy decoding: same tokens, fixed-shape steps, one host read per round."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import build_model
from host_reads import HostReads
from test_speculative import SEQUENCE, mtp_config, reference_drafts, train_mtp_model
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache
from transformers.generation.streamers import BaseStreamer

from modeling_deepseek_v3.speculative import _speculative_sample

MLA_MODES = ["expanded", "absorbed"]
STATIC = dict(cache_implementation="static")


@pytest.fixture(scope="module")
def trained_weights():
    return train_mtp_model().state_dict()


@pytest.fixture(scope="module", params=MLA_MODES)
def trained(request, trained_weights):
    """The trained model in each MLA mode (same weights)."""
    model = build_model(mtp_config(mla_mode=request.param))
    model.load_state_dict(trained_weights)
    return model.eval()


def generate(model, prompt, **kwargs):
    kwargs = dict(max_new_tokens=24, do_sample=False) | kwargs
    with torch.no_grad():
        return model.generate(prompt, **kwargs)


def check_stats(model, prompt, output):
    stats = model.mtp_draft_stats
    # every main-model forward gives one token, every accepted draft one more
    assert stats.verify_steps + stats.accepted == output.shape[1] - prompt.shape[1]
    assert 0 <= stats.accepted <= stats.drafted <= stats.verify_steps
    targets = [target for target, _ in stats.drafts]
    assert len(targets) == stats.drafted and targets == sorted(set(targets))
    return stats


@pytest.mark.parametrize("start,length", [(3, 12), (0, 5), (20, 2)])
def test_trained_greedy_identical_to_plain_static_and_dynamic(trained, start, length):
    prompt = SEQUENCE[:, start : start + length]
    plain_static = generate(trained, prompt, **STATIC)
    assert torch.equal(plain_static, generate(trained, prompt))
    speculative = generate(trained, prompt, use_mtp=True, **STATIC)
    assert torch.equal(plain_static, speculative)
    stats = check_stats(trained, prompt, speculative)
    assert stats.drafted >= 10 and stats.acceptance_rate > 0.8


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mla_mode", MLA_MODES)
def test_untrained_greedy_identical_and_drafts_match_reference(mla_mode, attn):
    """A random MTP module: most drafts are rejected, so most rounds leave a rejected entry in both static caches. The
    output must still be plain greedy's, and every draft what the module computes without a cache on the final
    sequence: a rejected entry that stayed visible (main or MTP cache) would change the drafts."""
    config = mtp_config(mla_mode=mla_mode)
    config._attn_implementation = attn
    model = build_model(config, seed=3)
    prompt = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(3))
    plain = generate(model, prompt, **STATIC)
    speculative = generate(model, prompt, use_mtp=True, **STATIC)
    assert torch.equal(plain, speculative)
    stats = check_stats(model, prompt, speculative)
    assert stats.drafted > 5 and stats.accepted < stats.drafted
    reference = reference_drafts(model, speculative)
    for target, draft in stats.drafts:
        assert int(draft) == int(reference[target - 2]), f"draft for position {target}"


def test_stops_at_eos_like_plain(trained):
    prompt = SEQUENCE[:, :6]
    for eos in (int(SEQUENCE[0, 13]), int(SEQUENCE[0, 14])):  # reached at either token of a round
        plain = generate(trained, prompt, eos_token_id=eos, pad_token_id=0, **STATIC)
        speculative = generate(trained, prompt, eos_token_id=eos, pad_token_id=0, use_mtp=True, **STATIC)
        assert torch.equal(plain, speculative)
        assert speculative[0, -1] == eos and speculative.shape[1] < prompt.shape[1] + 24
        check_stats(trained, prompt, speculative)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 4, 7])
def test_max_new_tokens_respected(trained, max_new_tokens):
    # the cache holds max_length - 1 positions: the last token of an odd budget is one plain decoding step
    prompt = SEQUENCE[:, 2:9]
    plain = generate(trained, prompt, max_new_tokens=max_new_tokens, **STATIC)
    speculative = generate(trained, prompt, max_new_tokens=max_new_tokens, use_mtp=True, **STATIC)
    assert speculative.shape[1] == prompt.shape[1] + max_new_tokens and torch.equal(plain, speculative)
    check_stats(trained, prompt, speculative)


def test_sampling_with_top_k_1_is_greedy(trained):
    prompt = SEQUENCE[:, 2:9]
    plain = generate(trained, prompt, **STATIC)
    sampled = generate(trained, prompt, do_sample=True, top_k=1, use_mtp=True, **STATIC)
    assert torch.equal(plain, sampled)
    assert trained.mtp_draft_stats.acceptance_rate > 0.8


def test_sampling_runs_and_accepts_likely_drafts(trained):
    torch.manual_seed(0)
    prompt = SEQUENCE[:, 2:9]
    sampled = generate(trained, prompt, do_sample=True, temperature=0.7, use_mtp=True, **STATIC)
    assert sampled.shape[1] == prompt.shape[1] + 24
    stats = check_stats(trained, prompt, sampled)
    assert stats.acceptance_rate > 0.5  # the main and MTP distributions are both sharp on SEQUENCE


def test_speculative_sample_has_the_main_model_distribution():
    # one draft from q, kept or resampled: the emitted token follows p exactly (speculative sampling's guarantee)
    torch.manual_seed(0)
    p_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    q_logits = torch.tensor([[0.0, 2.0, 1.0, 0.0, -1.0]])
    n = 40000
    q = q_logits.softmax(-1).expand(n, -1)
    drafts = torch.multinomial(q, 1)[:, 0]
    accepted, tokens = _speculative_sample(p_logits.expand(n, -1), drafts, q)
    frequencies = torch.bincount(tokens, minlength=5).float() / n
    assert (frequencies - p_logits.softmax(-1)[0]).abs().max() < 0.01
    assert torch.equal(tokens[accepted], drafts[accepted])


def test_left_padded_prompt_identical_to_plain(trained):
    prompt = torch.cat([torch.zeros(1, 3, dtype=torch.long), SEQUENCE[:, :6]], dim=-1)
    mask = (prompt != 0).long()
    plain = generate(trained, prompt, attention_mask=mask, **STATIC)
    speculative = generate(trained, prompt, attention_mask=mask, use_mtp=True, **STATIC)
    assert torch.equal(plain, speculative)
    assert trained.mtp_draft_stats.acceptance_rate > 0.8


def test_scores_logits_and_streamer(trained):
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    prompt, streamer = SEQUENCE[:, 1:8], Collect()
    out = generate(trained, prompt, use_mtp=True, return_dict_in_generate=True, output_scores=True,
                   output_logits=True, streamer=streamer, **STATIC)
    plain = generate(trained, prompt, return_dict_in_generate=True, output_scores=True, **STATIC)
    new = out.sequences[0, prompt.shape[1]:]
    assert torch.equal(out.sequences, plain.sequences)
    assert len(out.scores) == len(out.logits) == new.shape[0]
    assert torch.equal(torch.stack(out.scores).argmax(-1)[:, 0], new)
    for ours, theirs in zip(out.scores, plain.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert streamer.tokens == out.sequences[0].tolist() and streamer.ended  # generate puts the prompt first


def test_one_host_read_per_round_and_none_in_the_forward():
    model = build_model(mtp_config(experts_backend="grouped_mm", mla_mode="absorbed"), seed=1)
    prompt = SEQUENCE[:, :7]
    with torch.no_grad(), HostReads() as reads:
        model.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True, **STATIC)
    files = Counter(where.split(" at ")[1].rsplit(":", 1)[0] for where in reads.where)
    # prefill, every verification round and the last plain step: one read each; the forwards (main model and MTP
    # module) read nothing, but for the prompt's input check in the prefill
    assert files["speculative.py"] == model.mtp_draft_stats.verify_steps, reads.where
    assert files["modeling_deepseek_v3.py"] == 1, reads.where
    assert not {"mla.py", "layers.py", "sequential.py", "masking_utils.py"} & set(files), reads.where
    assert reads.counts["nonzero"] == 0


def test_compiled_forward_identical_to_plain():
    # transformers' compile path (`compile_config`); CPU compile needs the flag transformers' own tests use
    torch._dynamo.reset()
    counters.clear()
    model = build_model(mtp_config(experts_backend="grouped_mm", mla_mode="absorbed"), seed=2)
    prompt = SEQUENCE[:, :5]
    compile_config = CompileConfig(backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    compile_config._compile_all_devices = True
    plain = generate(model, prompt, max_new_tokens=8, **STATIC)
    compiled = generate(model, prompt, max_new_tokens=8, use_mtp=True, compile_config=compile_config, **STATIC)
    assert torch.equal(plain, compiled) and hasattr(model, "_compiled_call")
    stats = check_stats(model, prompt, compiled)
    assert stats.drafted > 1  # the rounds after the prefill ran the compiled MTP step
    # two graphs: the verification forward and the MTP step (after the prefill installed the capturing hooks)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    again = generate(model, prompt, max_new_tokens=8, use_mtp=True, compile_config=compile_config, **STATIC)
    assert torch.equal(again, compiled) and counters["stats"]["unique_graphs"] == 2  # nothing recompiled


def test_a_static_cache_passed_in(trained):
    # a cache longer than max_length needs no plain last step: every token comes from a verification round
    prompt = SEQUENCE[:, 4:10]
    plain = generate(trained, prompt, max_new_tokens=9, **STATIC)
    cache = StaticCache(config=trained.config, max_cache_len=32)
    speculative = generate(trained, prompt, max_new_tokens=9, use_mtp=True, past_key_values=cache)
    assert torch.equal(plain, speculative)
    assert trained.mtp_draft_stats.drafted == trained.mtp_draft_stats.verify_steps - 1  # all but the prefill verify
    with pytest.raises(ValueError, match="holds 6 positions"):
        generate(trained, prompt, max_new_tokens=9, use_mtp=True, past_key_values=StaticCache(config=trained.config, max_cache_len=6))


def test_batch_above_one_is_a_clear_error(trained):
    prompts = torch.cat([SEQUENCE[:, :5], SEQUENCE[:, 5:10]])
    with pytest.raises(ValueError, match="batch size 1.*got batch size 2"):
        generate(trained, prompts, use_mtp=True, **STATIC)


def test_without_mtp_modules_is_a_clear_error():
    from conftest import tiny_config

    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=3, use_mtp=True, **STATIC)


def test_synced_gpus_over_a_static_cache_names_the_way_out():
    # generate sets synced_gpus itself for a model sharded over several processes
    from modeling_deepseek_v3.speculative import mtp_static_decoding

    model = build_model(mtp_config()).eval()
    with pytest.raises(ValueError, match=r"`synced_gpus=True`, which generate sets for a model sharded.*needs a dynamic cache"):
        mtp_static_decoding(model, torch.tensor([[1, 2, 3]]), None, None, None, synced_gpus=True)
