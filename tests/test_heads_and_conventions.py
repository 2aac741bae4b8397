"""transformers' conventions our classes follow: the generic classification heads through the Auto classes, router
logits through output capturing, experts-implementation switching, the parallelism plans."""

from __future__ import annotations

import pytest
import torch
import transformers

import modeling_deepseek_v3
from transformers.testing_utils import CaptureLogger

from conftest import build_model, relative_error, tiny_config


@pytest.mark.parametrize(
    "auto, cls, shape",
    [
        (transformers.AutoModelForSequenceClassification, modeling_deepseek_v3.DeepseekV3ForSequenceClassification, (2, 3)),
        (transformers.AutoModelForTokenClassification, modeling_deepseek_v3.DeepseekV3ForTokenClassification, (2, 7, 3)),
    ],
)
def test_classification_heads_come_from_the_auto_classes(tmp_path, auto, cls, shape):
    config = tiny_config(num_labels=3, pad_token_id=0)
    build_model(config).save_pretrained(tmp_path)
    model = auto.from_pretrained(tmp_path, num_labels=3)
    assert type(model) is cls
    ids = torch.randint(1, 97, (2, 7))
    out = model(ids, labels=torch.zeros(shape[:-1], dtype=torch.long))
    assert out.logits.shape == shape and torch.isfinite(out.loss)
    # the backbone is ours, loaded from the causal-LM folder (experts stacked)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == config.n_routed_experts


def test_router_logits_are_recorded_per_moe_layer():
    config = tiny_config()
    model = build_model(config).eval()
    ids = torch.randint(1, 97, (2, 5))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert len(out.router_logits) == moe_layers
    assert all(r.shape == (10, config.n_routed_experts) and r.dtype == torch.float32 for r in out.router_logits)


def test_experts_implementations_switch_and_agree():
    model = build_model(tiny_config()).eval()
    ids = torch.randint(1, 97, (2, 9))
    outputs = {}
    for name in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(name)
        assert model.config._experts_implementation == name
        with torch.no_grad():
            outputs[name] = model(ids).logits
    assert relative_error(outputs["grouped_mm"], outputs["eager"]) < 1e-6
    assert relative_error(outputs["batched_mm"], outputs["eager"]) < 1e-6


def test_experts_backend_is_the_default_implementation_and_is_validated():
    assert tiny_config(experts_backend="batched_mm")._experts_implementation == "batched_mm"
    assert tiny_config(experts_backend="gather")._experts_implementation == "eager"  # the earlier name
    assert "deepseek_fp8" in modeling_deepseek_v3.list_plugins()["experts"]
    with pytest.raises(ValueError, match="`experts_backend`"):
        tiny_config(experts_backend="warp_speed")
    with pytest.raises(ValueError, match="`experts_backend`.*string"):
        tiny_config(experts_backend=["grouped_mm"])


def test_grouped_mm_is_refused_for_widths_it_cannot_align_and_the_default_falls_back():
    odd = dict(hidden_size=60, moe_intermediate_size=30)  # rows of 120 and 60 bytes in bf16
    with pytest.raises(ValueError, match=r"'grouped_mm' needs hidden_size and moe_intermediate_size to be multiples of 8.*60"):
        build_model(tiny_config(experts_backend="grouped_mm", **odd))
    model = build_model(tiny_config(**odd))  # nothing asked for: transformers' fallback
    assert model.config._experts_implementation == "eager"
    ids = torch.randint(1, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        model.set_experts_implementation("batched_mm")
        assert relative_error(model(ids).logits, eager) < 1e-6
    with pytest.raises(ValueError, match="multiples of 8"):
        model.set_experts_implementation("grouped_mm")
    assert build_model(tiny_config()).config._experts_implementation == "grouped_mm"


def test_parallel_plans_name_existing_parameters():
    model = build_model(tiny_config())
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}
    plan = {**{f"model.{k}": v for k, v in model.config.base_model_tp_plan.items()}, **model._tp_plan}
    for pattern in plan:
        regex = pattern.replace(".", r"\.").replace("*", r"\d+")
        import re

        assert any(re.fullmatch(regex, n) for n in names), pattern
    assert "lm_head" in model._tp_plan and "lm_head" in model._pp_plan


def test_dynamic_rope_rescales_and_runs_past_max_positions():
    config = tiny_config(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert config.rope_parameters["rope_type"] == "dynamic"
    model = build_model(config).eval()
    rotary = model.model.rotary_emb
    long_ids = torch.randint(1, 97, (1, config.max_position_embeddings + 8))
    with torch.no_grad():
        assert torch.isfinite(model(long_ids).logits).all()
        # the table grew with the sequence (lower frequencies), and shrinks back for a short one
        assert rotary.max_seq_len_cached == long_ids.shape[1] and (rotary.inv_freq[1:] < rotary.original_inv_freq[1:]).all()
        model(long_ids[:, :8])
        assert torch.equal(rotary.inv_freq, rotary.original_inv_freq)


def test_positions_past_max_position_embeddings_run_and_warn():
    # rotary embeddings extrapolate (as transformers' class does); the user is told once that it is past training
    model = build_model(tiny_config(rope_scaling=None)).eval()
    long_ids = torch.randint(1, 97, (1, model.config.max_position_embeddings + 3))
    logger = transformers.logging.get_logger("modeling_deepseek_v3.modeling_deepseek_v3")
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.warning_once.cache_clear()  # an earlier test may have shown it already
    try:
        with CaptureLogger(logger) as captured, torch.no_grad():
            logits = model(long_ids).logits
    finally:
        transformers.logging.set_verbosity_error()
    assert torch.isfinite(logits).all()
    assert "beyond `max_position_embeddings`=128" in captured.out


@torch.no_grad()
def test_shift_labels_replace_the_shifted_labels():
    model = build_model(tiny_config(num_nextn_predict_layers=1)).train()
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    other = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    torch.manual_seed(0)
    reference = model(ids, labels=ids)
    # the aligned targets of `labels` give the same loss, main and MTP, whatever `labels` then says
    torch.manual_seed(0)
    aligned = model(ids, labels=other, shift_labels=shifted)
    assert relative_error(aligned.loss, reference.loss) < 1e-6 and relative_error(aligned.mtp_loss, reference.mtp_loss) < 1e-6
    # a context-parallel shard's last position has a target (the next shard's first token), and it counts
    shard_targets = shifted.clone()
    shard_targets[:, -1] = 5
    assert not torch.allclose(model(ids, shift_labels=shard_targets).loss, reference.loss)
    with pytest.raises(ValueError, match="`shift_labels` must have the input's shape"):
        model(ids, shift_labels=shifted[:, :-1])


@pytest.mark.parametrize("mla_mode", ["expanded", "absorbed"])
def test_returned_attention_weights_are_on_the_graph(mla_mode):
    model = build_model(tiny_config(mla_mode=mla_mode)).train()
    model.set_attn_implementation("eager")
    out = model(torch.randint(1, 97, (2, 6)), output_attentions=True)
    for weights in out.attentions:
        weights.retain_grad()
    out.logits.sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in out.attentions)


def test_mismatched_shapes_raise_runtime_error_unless_ignored(tmp_path):
    seq = transformers.AutoModelForSequenceClassification
    seq.from_config(tiny_config(num_labels=3, pad_token_id=0)).save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="'score.weight'.*shape \\[3, 64\\].*\\[5, 64\\]"):
        seq.from_pretrained(tmp_path, num_labels=5)
    model = seq.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.score.weight.shape[0] == 5


def test_float_input_ids_are_named():
    with pytest.raises(ValueError, match="`input_ids` must hold integer token ids"):
        build_model(tiny_config())(torch.ones(1, 4))
