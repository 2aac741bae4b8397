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
