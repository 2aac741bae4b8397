"""A decode step reads nothing on the host and compiles as one graph (``fullgraph=True``) over a static cache,
for every experts implementation that runs on the device and every MLA mode; compiled equals eager."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import build_model, relative_error, tiny_config
from host_reads import HostReads

DEVICE_IMPLEMENTATIONS = ["grouped_mm", "batched_mm"]
MLA_MODES = ["expanded", "absorbed", "auto"]


def prefilled(experts_backend, mla_mode, batch=2, prompt=6, max_cache_len=16, **fields):
    model = build_model(tiny_config(experts_backend=experts_backend, mla_mode=mla_mode, **fields)).eval()
    ids = torch.randint(1, 97, (batch, prompt), generator=torch.Generator().manual_seed(0))
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, position_ids=torch.arange(prompt).expand(batch, -1)).logits
    step = dict(input_ids=logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True,
                position_ids=torch.full((batch, 1), prompt))
    return model, step


def test_support_flags_are_set():
    model = build_model(tiny_config())
    assert model._can_compile_fullgraph and model._supports_sdpa
    assert type(model)._can_set_experts_implementation()


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("mla_mode", MLA_MODES)
@pytest.mark.parametrize("experts_backend", DEVICE_IMPLEMENTATIONS)
def test_decode_step_has_no_host_reads(experts_backend, mla_mode, batch):
    model, step = prefilled(experts_backend, mla_mode, batch=batch)
    with torch.no_grad(), HostReads() as reads:
        model(**step)
    assert reads.total == 0, (reads.counts, reads.where)


def test_eager_experts_read_their_loop_bounds_once_per_moe_layer():
    # the documented exception: `eager` loops over the experts that received tokens
    model, step = prefilled("eager", "absorbed")
    with torch.no_grad(), HostReads() as reads:
        model(**step)
    moe_layers = model.config.num_hidden_layers - model.config.first_k_dense_replace
    assert reads.counts == {"tolist": moe_layers}, reads.where


def test_training_step_reads_the_host_only_for_input_checks():
    # three reads in a training step with MTP: our input check (ids within the vocabulary, positions within range: one
    # `tolist`), our labels check (targets within the vocabulary: one `bool`), and transformers' causal-mask builder
    # asking whether position_ids hold packed sequences (`bool`; transformers' own class makes it too). Each `bool` is
    # the `_local_scalar_dense` op below it.
    model = build_model(tiny_config(experts_backend="grouped_mm", num_nextn_predict_layers=1)).train()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with HostReads() as reads:
        model(ids, labels=ids).loss.backward()
    assert dict(reads.counts) == {"tolist": 1, "__bool__": 2, "_local_scalar_dense": 2}, reads.where
    assert any("modeling_deepseek_v3.py" in w for w in reads.where) and any("masking_utils.py" in w for w in reads.where)


@pytest.mark.parametrize("mla_mode", MLA_MODES)
@pytest.mark.parametrize("experts_backend", DEVICE_IMPLEMENTATIONS)
def test_decode_step_compiles_to_one_graph_and_matches_eager(experts_backend, mla_mode):
    torch._dynamo.reset()
    model, step = prefilled(experts_backend, mla_mode)
    twin, twin_step = prefilled(experts_backend, mla_mode)  # same seed: same weights, prompt and cache
    with torch.no_grad():
        eager = model(**step).logits
        compiled = torch.compile(twin.forward, fullgraph=True, backend="eager")(**twin_step).logits  # raises on a break
    assert relative_error(compiled, eager) < 1e-6


def test_training_step_compiles_to_one_graph_and_matches_eager():
    # forward + backward with load counting, the sequence-wise balance loss and MTP, traced with fullgraph=True
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    config = tiny_config(experts_backend="grouped_mm", num_nextn_predict_layers=1, aux_loss_alpha=0.01)
    eager, compiled = build_model(config).train(), build_model(config).train()
    torch._dynamo.reset()
    step = torch.compile(lambda model, i: model(i, labels=i), fullgraph=True, backend="eager")  # raises on a break
    out_eager, out_compiled = eager(ids, labels=ids), step(compiled, ids)
    out_eager.loss.backward()
    out_compiled.loss.backward()
    assert relative_error(out_compiled.loss, out_eager.loss.detach()) < 1e-6 and out_compiled.aux_loss > 0
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert relative_error(q.grad, p.grad) < 1e-5, name
    routers = [(a, b) for a, b in zip(eager.modules(), compiled.modules()) if hasattr(a, "tokens_per_expert")]
    assert routers and all(torch.equal(a.tokens_per_expert, b.tokens_per_expert) for a, b in routers)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mla_mode", MLA_MODES)
def test_static_cache_prefill_and_decode_match_transformers_full_forward(tmp_path, mla_mode, attn_implementation):
    # A short prompt into a longer static cache: transformers passes no mask for the prefill (SDPA's top-left
    # `is_causal` keeps the empty slots out), so the absorbed path must align its own causal mask the same way.
    build_model(tiny_config()).save_pretrained(tmp_path)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation,
                                                             mla_mode=mla_mode).eval()
    ids = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    cache = transformers.StaticCache(config=ours.config, max_cache_len=32)
    with torch.no_grad():
        expected = theirs(ids).logits
        prefill = ours(ids[:, :8], past_key_values=cache, use_cache=True).logits
        step = ours(ids[:, 8:], past_key_values=cache, use_cache=True).logits
    assert relative_error(prefill, expected[:, :8]) < 1e-5 and relative_error(step, expected[:, 8:]) < 1e-5
