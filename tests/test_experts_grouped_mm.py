"""The ``grouped_mm`` experts backend against the ``gather`` backend (the plain path): forward, gradients,
checkpoints in the official per-expert layout both ways, the FP8 grouped path, and the fallbacks."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import transformers
from safetensors import safe_open

import modeling_deepseek_v3
from modeling_deepseek_v3.plugins.experts import GatherScatterExperts, GroupedMMExperts
from modeling_deepseek_v3.plugins.experts import grouped_mm as G

from conftest import build_model, relative_error, tiny_config


def _grads(model):
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


class CountGroupedCalls:
    """Counts grouped GEMMs (forward) so a test fails if the executor silently took the gather loop."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = G._GroupedLinear.forward

        def forward(ctx, *args):
            self.calls += 1
            return original(ctx, *args)

        monkeypatch.setattr(G._GroupedLinear, "forward", staticmethod(forward))


def test_grouped_mm_is_registered():
    assert "grouped_mm" in modeling_deepseek_v3.list_plugins()["experts"]
    assert tiny_config(experts_backend="grouped_mm").plugin("experts_backend") is GroupedMMExperts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [1, 2])
def test_grouped_linear_matches_per_expert_matmuls(dtype, parts):
    # experts 1 and 3 get no rows: their gradient must be zero, their neighbours' rows untouched
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 7, 0, 4]
    x = torch.randn(sum(counts), 16, generator=g).to(dtype).requires_grad_()
    weights = [torch.randn(8, 16, generator=g).to(dtype).requires_grad_() for _ in range(len(counts) * parts)]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = G.grouped_linear(x, offs, weights, parts_per_expert=parts)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad)

    xr = x.detach().float().requires_grad_()
    wr = [w.detach().float().requires_grad_() for w in weights]
    rows, start = [], 0
    for e, c in enumerate(counts):
        rows.append(xr[start : start + c] @ torch.cat(wr[e * parts : (e + 1) * parts]).T)
        start += c
    ref = torch.cat(rows)
    ref.backward(grad.float())
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert relative_error(out, ref) < tol
    assert relative_error(x.grad, xr.grad) < tol
    for w, r in zip(weights, wr):
        assert torch.allclose(w.grad.float(), r.grad, atol=tol * 10, rtol=tol)
    for e in (1, 3):
        assert all(torch.count_nonzero(weights[e * parts + p].grad) == 0 for p in range(parts))


def test_grouped_linear_accepts_broadcast_gradients():
    x = torch.randn(6, 8, requires_grad=True)
    w = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    G.grouped_linear(x, torch.tensor([2, 6], dtype=torch.int32), w).sum().backward()  # grad of sum: stride 0
    assert torch.allclose(w[0].grad, x[:2].detach().sum(0).expand(4, 8))


def _executors(config, seed=0):
    torch.manual_seed(seed)
    gather = GatherScatterExperts(config)
    grouped = GroupedMMExperts(config)
    grouped.load_state_dict(gather.state_dict())
    return gather, grouped


def test_executor_matches_gather_forward_and_backward(monkeypatch):
    config = tiny_config(experts_backend="grouped_mm")
    gather, grouped = _executors(config)
    spy = CountGroupedCalls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(20, config.hidden_size, generator=g)
    # expert 5 never chosen, expert 0 chosen often
    topk_idx = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(20)])
    topk_idx[topk_idx == 4] = 7
    topk_weight = torch.rand(20, 3, generator=g)

    outs, grads = [], []
    for executor in (gather, grouped):
        h = hidden.clone().requires_grad_()
        w = topk_weight.clone().requires_grad_()
        out = executor(h, topk_idx, w)
        out.backward(torch.ones_like(out))
        outs.append(out)
        grads.append((h.grad, w.grad, _grads(executor)))
    assert spy.calls == 2  # gate+up, down: one grouped GEMM each, no loop
    assert relative_error(outs[1], outs[0]) < 1e-6
    assert relative_error(grads[1][0], grads[0][0]) < 1e-6
    assert relative_error(grads[1][1], grads[0][1]) < 1e-6
    for name, ref in grads[0][2].items():
        assert torch.allclose(grads[1][2][name], ref, atol=1e-6), name
    assert torch.count_nonzero(grads[1][2]["5.gate_proj.weight"]) == 0


def test_bf16_executor_is_close_to_gather():
    config = tiny_config()
    gather, grouped = _executors(config)
    gather, grouped = gather.to(torch.bfloat16), grouped.to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(32, config.hidden_size, generator=g).bfloat16()
    topk_idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(32)])
    topk_weight = torch.rand(32, 3, generator=g)
    assert relative_error(grouped(hidden, topk_idx, topk_weight), gather(hidden, topk_idx, topk_weight)) < 1e-2


def test_model_train_step_matches_gather(monkeypatch):
    spy = CountGroupedCalls(monkeypatch)
    ref = build_model(tiny_config()).train()
    ours = build_model(tiny_config(experts_backend="grouped_mm")).train()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    out_ref, out = ref(ids, labels=ids), ours(ids, labels=ids)
    out_ref.loss.backward()
    out.loss.backward()
    assert spy.calls == 2 * (tiny_config().num_hidden_layers - 1)
    assert relative_error(out.logits, out_ref.logits) < 1e-6
    assert abs(out.loss.item() - out_ref.loss.item()) < 1e-6
    ref_grads = _grads(ref)
    for name, grad in _grads(ours).items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6), name


def test_official_checkpoint_loads_and_saves_per_expert_names(tmp_path, tiny_checkpoint):
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                             experts_backend="grouped_mm").eval()
    assert isinstance(ours.model.layers[1].mlp.experts, GroupedMMExperts)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)

    ours.save_pretrained(tmp_path / "saved")
    with open(tmp_path / "saved" / "config.json") as f:
        assert json.load(f)["experts_backend"] == "grouped_mm"
    names = {}
    for file in os.listdir(tmp_path / "saved"):
        if file.endswith(".safetensors"):
            with safe_open(str(tmp_path / "saved" / file), "pt") as f:
                names.update({k: f.get_tensor(k) for k in f.keys()})
    expert_keys = [k for k in names if ".mlp.experts." in k]
    assert len(expert_keys) == 2 * 8 * 3  # 2 MoE layers x 8 experts x 3 projections, one tensor each
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in names
    assert torch.equal(names["model.layers.2.mlp.experts.7.down_proj.weight"],
                       ref.model.layers[2].mlp.experts[7].down_proj.weight)
    # and transformers' own class reads what we wrote
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, ref(ids).logits) < 1e-5


def test_fp8_quantizer_runs_the_grouped_fp8_path(monkeypatch):
    from modeling_deepseek_v3.quantization import linear as L

    calls = []
    original = L.fp8_grouped_expert_mlp

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(L, "fp8_grouped_expert_mlp", spy)
    config = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=128, quantizer="fp8_block")
    ref = build_model(tiny_config(**config)).train()
    ours = build_model(tiny_config(experts_backend="grouped_mm", **config)).train()
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no FP8 GPU: using the reference", once per process
        out = ours(ids, labels=ids)
        out_ref = ref(ids, labels=ids)
    assert len(calls) == 2  # one per MoE layer, all experts at once
    # the same FP8 numbers per expert; only the fp32 summation order of the grouped GEMM differs
    assert relative_error(out.logits, out_ref.logits) < 1e-4
    out.loss.backward()
    out_ref.loss.backward()
    ref_grads = _grads(ref)
    for name, grad in _grads(ours).items():
        assert torch.isfinite(grad).all(), name
        if ".experts." in name and grad.abs().sum() > 0:
            assert relative_error(grad, ref_grads[name]) < 1e-3, name


def test_decode_sized_batches_and_unsupported_dtypes_take_the_gather_loop(monkeypatch):
    config = tiny_config()
    gather, grouped = _executors(config)
    spy = CountGroupedCalls(monkeypatch)
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, config.hidden_size, generator=g)  # 6 slots < 8 experts: decoding
    topk_idx = torch.tensor([[0, 1, 2], [3, 4, 5]])
    topk_weight = torch.rand(2, 3, generator=g)
    assert torch.equal(grouped(hidden, topk_idx, topk_weight), gather(hidden, topk_idx, topk_weight))
    assert spy.calls == 0

    monkeypatch.setattr(G, "_grouped_mm_works", lambda *a: False)  # a torch without a usable _grouped_mm
    hidden = torch.randn(16, config.hidden_size, generator=g)
    topk_idx = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(16)])
    topk_weight = torch.rand(16, 3, generator=g)
    assert torch.equal(grouped(hidden, topk_idx, topk_weight), gather(hidden, topk_idx, topk_weight))
    assert spy.calls == 0


def test_probe_reports_cpu_support_and_alignment():
    x = torch.zeros(4, 64)
    assert G.grouped_mm_available(x, 64, 32) == hasattr(torch, "_grouped_mm")
    assert not G.grouped_mm_available(x.bfloat16(), 64, 12)  # 24-byte rows: not 16-byte aligned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_grouped_mm_matches_gather():
    config = tiny_config(hidden_size=128, moe_intermediate_size=64)
    gather, grouped = _executors(config)
    gather, grouped = gather.cuda().bfloat16(), grouped.cuda().bfloat16()
    hidden = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(8)[:3] for _ in range(256)]).cuda()
    topk_weight = torch.rand(256, 3, device="cuda")
    assert G.grouped_mm_available(hidden, 128, 64, 128)
    assert relative_error(grouped(hidden, topk_idx, topk_weight), gather(hidden, topk_idx, topk_weight)) < 1e-2
