"""Ground truth: transformers' own DeepseekV3ForCausalLM on the same official-layout checkpoint folder."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import relative_error, save_checkpoint, tiny_config

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.plugins.attention.mla import MultiHeadLatentAttention

CONFIGS = {
    "qlora-2groups-yarn": dict(),
    "no-qlora-1group-plain-rope": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None),
    "qlora-4groups-yarn-halfsplit-rope": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, rope_interleave=False),
    "all-moe-2shared": dict(first_k_dense_replace=0, n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.5),
    # Kimi K2's released rope block: theta 50000, equal YaRN betas (a step where DeepSeek-V3's 32 and 1 ramp)
    "kimi-k2-rope": dict(rope_theta=50000.0, rope_scaling={"type": "yarn", "factor": 32.0, "beta_fast": 1.0, "beta_slow": 1.0,
                                                           "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}),
}


def set_mla_mode(model, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.mode = mode


def load_pair(folder, attn_implementation="eager", **kwargs):
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation, **kwargs)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attn_implementation)
    assert isinstance(ours, DeepseekV3ForCausalLM)
    return ours.eval(), theirs.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    overrides = dict(CONFIGS[request.param])
    if overrides.get("rope_scaling", "unset") is None:
        overrides.pop("rope_scaling")
        config = tiny_config(**overrides)
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        config = tiny_config(**overrides)
    folder = save_checkpoint(config, tmp_path_factory.mktemp(request.param))
    return load_pair(folder)


def random_ids(batch, length, seed=1, vocab=97):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator)


@torch.no_grad()
def test_logits_match_transformers(pair):
    ours, theirs = pair
    ids = random_ids(3, 17)
    assert relative_error(ours(ids).logits, theirs(ids).logits) < 1e-5


@torch.no_grad()
def test_absorbed_equals_expanded(pair):
    ours, _ = pair
    ids = random_ids(2, 13)
    try:
        set_mla_mode(ours, "expanded")
        expanded = ours(ids).logits
        set_mla_mode(ours, "absorbed")
        absorbed = ours(ids).logits
    finally:
        set_mla_mode(ours, "auto")
    assert relative_error(absorbed, expanded) < 1e-5


@torch.no_grad()
def test_left_padded_batch_matches_on_real_tokens(pair):
    ours, theirs = pair
    ids = random_ids(3, 12, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ours_logits = ours(ids, attention_mask=mask).logits
    theirs_logits = theirs(ids, attention_mask=mask).logits
    real = mask.bool()
    assert relative_error(ours_logits[real], theirs_logits[real]) < 1e-5
    # And padding does not leak into the real tokens: row 0 alone, unpadded, gives the same logits.
    alone = ours(ids[:1, 5:]).logits[0]
    assert relative_error(ours_logits[0, 5:], alone) < 1e-5


@pytest.mark.parametrize("mode", ["expanded", "absorbed", "auto"])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(pair, mode):
    ours, _ = pair
    set_mla_mode(ours, mode)
    try:
        ids = random_ids(2, 14, seed=3)
        full = ours(ids).logits
        out = ours(ids[:, :9], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(9, 14):
            out = ours(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
        assert relative_error(torch.cat(steps, dim=1), full) < 1e-5
    finally:
        set_mla_mode(ours, "auto")


@torch.no_grad()
def test_greedy_generate_matches_transformers(pair):
    ours, theirs = pair
    ids = random_ids(2, 6, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), theirs.generate(ids, **kwargs))


@torch.no_grad()
def test_sdpa_matches_eager(tmp_path):
    folder = save_checkpoint(tiny_config(), tmp_path / "ckpt")
    eager, _ = load_pair(folder, "eager")
    sdpa = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = random_ids(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    real = mask.bool()
    assert relative_error(sdpa(ids, attention_mask=mask).logits[real], eager(ids, attention_mask=mask).logits[real]) < 1e-5


@torch.no_grad()
def test_checkpoint_written_by_transformers_loads_in_ours(tmp_path):
    folder = save_checkpoint(tiny_config(), tmp_path / "ours")
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "theirs", dtype=torch.float32).eval()
    ids = random_ids(2, 9)
    assert relative_error(ours(ids).logits, theirs(ids).logits) < 1e-5


def test_bf16_load_keeps_router_bias_fp32(tiny_checkpoint):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all(b.dtype == torch.float32 for b in biases)
    assert all(bool(b.abs().sum() > 0) for b in biases)  # loaded, not re-initialised to zero
    model.to(torch.bfloat16)
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
