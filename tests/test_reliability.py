"""Bad inputs and careless calls get a clear error naming what is wrong, or do the right thing; never a silent
wrong result."""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, relative_error, tiny_config
from modeling_deepseek_v3.quantization import FP8Linear
from modeling_deepseek_v3.quantization.experts import FP8Experts
from modeling_deepseek_v3.quantization.formats import FP8_DTYPE


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.half()])
def test_casting_a_model_with_fp8_layers_keeps_the_fp8_storage(cast):
    model = build_model(tiny_config(quantizer="fp8_block", fp8_mode="inference"))
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    fp8 = {name: p.detach().clone() for name, p in model.named_parameters() if p.dtype == FP8_DTYPE or "scale_inv" in name}
    assert any(isinstance(m, FP8Linear) for m in model.modules()) and any(isinstance(m, FP8Experts) for m in model.modules())
    cast(model)
    after = dict(model.named_parameters())
    for name, tensor in fp8.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name].view(torch.uint8), tensor.view(torch.uint8)), name
    # the high-precision rest was cast, and the model still computes the same function (to the cast's precision)
    dtype = model.model.embed_tokens.weight.dtype
    assert dtype != torch.float32 or cast(torch.nn.Linear(1, 1)).weight.dtype == torch.float32
    with torch.no_grad():
        assert relative_error(model(ids).logits.float(), before) < 3e-2


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rope_scaling={"type": "warp", "factor": 2.0}), r"`rope_scaling`.*'warp'"),
        (dict(router_bias_update_speed=float("inf")), r"`router_bias_update_speed` must be a finite"),
        (dict(aux_loss_alpha=float("inf")), r"`aux_loss_alpha` must be a finite"),
        (dict(fp8_mode="trian"), r"`fp8_mode` must be one of"),
        (dict(scoring_func="tanh"), r"`scoring_func` must be one of"),
        (dict(attention_backend=["mla"]), r"`attention_backend` must be a string"),
    ],
)
def test_bad_config_values_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_scoring_func_drives_the_router():
    assert tiny_config().scoring_func == "sigmoid" and tiny_config(topk_method="greedy").scoring_func == "softmax"
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    for method in ("noaux_tc", "greedy"):
        weights = {}
        for scoring in ("sigmoid", "softmax"):
            config = tiny_config(topk_method=method, scoring_func=scoring, norm_topk_prob=False, routed_scaling_factor=1.0)
            router = build_model(config).model.layers[1].mlp.gate
            logits, topk_weight, topk_idx, _ = router(hidden)
            expected = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
            torch.testing.assert_close(topk_weight, expected.gather(1, topk_idx))
            weights[scoring] = topk_weight
        assert not torch.allclose(weights["sigmoid"], weights["softmax"]), method


@pytest.mark.parametrize("mask_shape", [(2, 4), (3, 6), (1, 6)])
def test_attention_mask_of_the_wrong_shape_is_named(mask_shape):
    model = build_model(tiny_config())
    ids = torch.randint(1, 97, (2, 6))
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \[batch=2"):
        model(ids, attention_mask=torch.ones(mask_shape, dtype=torch.long))
    model.train()
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape"):
        model(ids, labels=ids, attention_mask=torch.ones(mask_shape, dtype=torch.long))


@pytest.mark.parametrize("labels, message", [
    (lambda ids: ids + 200, r"`labels` \(or `shift_labels`\) must be -100 or token ids in \[0, vocab_size=97\)"),
    (lambda ids: ids - 50, r"must be -100 or token ids"),
    (lambda ids: ids[:, :-1], r"`labels` must have the input's shape \[2, 6\]"),
    (lambda ids: ids.float(), r"`labels` must hold integer token ids"),
])
def test_bad_labels_are_named(labels, message):
    model = build_model(tiny_config()).train()
    ids = torch.randint(1, 97, (2, 6))
    with pytest.raises(ValueError, match=message):
        model(ids, labels=labels(ids))


def test_training_a_model_with_frozen_fp8_weights_says_so():
    from transformers.testing_utils import CaptureLogger
    import transformers

    model = build_model(tiny_config(quantizer="fp8_block", fp8_mode="inference"))
    logger = transformers.logging.get_logger("modeling_deepseek_v3.modeling_deepseek_v3")
    transformers.logging.set_verbosity_warning()
    transformers.utils.logging.warning_once.cache_clear()  # an earlier test may have shown it already
    try:
        with CaptureLogger(logger) as captured:
            model.train()
    finally:
        transformers.logging.set_verbosity_error()
    assert "weights stored in FP8" in captured.out and "frozen" in captured.out


def test_router_logits_stay_fp32_under_autocast():
    model = build_model(tiny_config())
    ids = torch.randint(1, 97, (2, 6))
    with torch.no_grad():
        plain = model(ids, output_router_logits=True).router_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(ids, output_router_logits=True).router_logits
    assert all(r.dtype == torch.float32 for r in autocast)
    assert all(relative_error(a, p) < 1e-2 for a, p in zip(autocast, plain))
