"""FP8 linear layers on the CPU (the PyTorch reference path): training numerics and the inference format."""

import warnings

import pytest
import torch
from torch import nn

from modeling_deepseek_v3.quantization import formats as F
from modeling_deepseek_v3.quantization import linear as L
from modeling_deepseek_v3.quantization import FP8Linear, FP8TrainingLinear
from modeling_deepseek_v3.quantization.linear import fp8_grouped_linear_frozen


pytestmark = pytest.mark.filterwarnings("ignore:FP8 kernels need a CUDA GPU")


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def twin_layers(in_features=300, out_features=200, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_features, out_features, bias=bias)
    fp8 = FP8TrainingLinear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
        if bias:
            fp8.bias.copy_(ref.bias)
    return ref, fp8


# --------------------------------------------------------------------------------------------------- training layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_linear_forward_and_gradients_against_fp32(dtype):
    ref, fp8 = twin_layers(dtype=dtype)
    x = torch.randn(3, 50, 300)  # 150 tokens: not a multiple of 128
    g = torch.randn(3, 50, 200)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.to(dtype).requires_grad_()
    y_ref, y_fp8 = ref(x_ref), fp8(x_fp8)
    y_ref.backward(g)
    y_fp8.backward(g.to(dtype))
    assert y_fp8.dtype == dtype and x_fp8.grad.dtype == dtype
    assert fp8.weight.grad.dtype == dtype and fp8.bias.grad.dtype == dtype  # master precision, not FP8
    for out, expected in [(y_fp8, y_ref), (x_fp8.grad, x_ref.grad), (fp8.weight.grad, ref.weight.grad), (fp8.bias.grad, ref.bias.grad)]:
        assert torch.isfinite(out).all()
        assert rel_err(out, expected) < 0.06


def test_training_linear_under_autocast_behaves_like_nn_linear():
    ref, fp8 = twin_layers(seed=3)
    x = torch.randn(150, 300)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y_fp8 = ref(x_ref), fp8(x_fp8)
    assert y_fp8.dtype == y_ref.dtype == torch.bfloat16
    y_ref.float().pow(2).sum().backward()
    y_fp8.float().pow(2).sum().backward()
    assert x_fp8.grad.dtype == torch.float32 and fp8.weight.grad.dtype == torch.float32
    for out, expected in [(y_fp8, y_ref), (x_fp8.grad, x_ref.grad), (fp8.weight.grad, ref.weight.grad)]:
        assert rel_err(out, expected) < 0.06


def test_training_linear_under_activation_checkpointing():
    _, layer = twin_layers(seed=6)
    x = torch.randn(150, 300)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        if checkpointed:
            y = torch.utils.checkpoint.checkpoint(layer, xx, use_reentrant=False)
        else:
            y = layer(xx)
        y.pow(2).sum().backward()
        grads.append((xx.grad, layer.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_training_linear_uses_the_papers_tilings():
    """Fprop 1x128 x 128x128; Dgrad dy 1x128 x W^T 128x128; Wgrad dy^T and x^T both 128 tokens x 1 channel."""
    _, layer = twin_layers(bias=False, seed=1)
    x = torch.randn(150, 300, requires_grad=True)
    g = torch.randn(150, 200)
    y = layer(x)
    y.backward(g)
    w_q, w_s = F.quantize_weight_128x128(layer.weight.detach())
    x_q, x_s = F.quantize_act_1x128(x.detach())
    assert torch.equal(y, F.fp8_gemm_reference(x_q, x_s, w_q, w_s, out_dtype=torch.float32))
    g_q, g_s = F.quantize_act_1x128(g)
    dgrad = F.fp8_gemm_reference(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), out_dtype=torch.float32)
    assert torch.equal(x.grad, dgrad)
    g_t, g_ts = F.quantize_act_128x1_transposed(g)
    x_t, x_ts = F.quantize_act_128x1_transposed(x.detach())
    assert torch.equal(layer.weight.grad, F.fp8_gemm_reference(g_t, g_ts, x_t, x_ts, 1, torch.float32))
    # a per-token (1x128) tiling of the Wgrad operands would be a different (and not the paper's) product
    x_q2, x_s2 = F.quantize_act_1x128(x.detach())
    other = F.dequantize_act_1x128(g_q, g_s).t() @ F.dequantize_act_1x128(x_q2, x_s2)
    assert not torch.allclose(layer.weight.grad, other, rtol=0, atol=1e-4)


def test_training_linear_is_an_nn_linear_to_the_optimizer():
    _, layer = twin_layers(bias=True)
    assert isinstance(layer, nn.Linear)
    assert {k: v.dtype for k, v in layer.state_dict().items()} == {"weight": torch.float32, "bias": torch.float32}
    layer(torch.randn(10, 300)).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    plain = nn.Linear(300, 200)
    wrapped = FP8TrainingLinear.from_linear(plain)
    assert wrapped.weight is plain.weight and wrapped.bias is plain.bias
    assert wrapped.to_linear().weight is plain.weight


def test_training_linear_bad_inputs():
    _, layer = twin_layers()
    with pytest.raises(ValueError, match=r"inputs \[..., 300\]"):
        layer(torch.randn(4, 299))
    x = torch.randn(4, 300)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="`input` contains non-finite values"):
        layer(x)
    y = layer(torch.randn(4, 300, requires_grad=True))
    with pytest.raises(ValueError, match="`grad_output` contains non-finite values"):
        y.backward(torch.full_like(y, float("inf")))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        layer(torch.ones(4, 300, dtype=torch.float64))
    layer.zero_grad()
    empty = layer(torch.randn(0, 300))
    empty.sum().backward()
    assert empty.shape == (0, 200) and torch.equal(layer.weight.grad, torch.zeros(200, 300))


def test_tiny_mlp_trains_in_fp8_like_fp32():
    """100 Adam steps of a 3-layer MLP: the FP8 run's losses track the fp32 run's within a few percent."""

    def make(linear_cls):
        torch.manual_seed(0)
        return nn.Sequential(linear_cls(128, 256), nn.GELU(), linear_cls(256, 256), nn.GELU(), linear_cls(256, 64))

    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(128, 64, generator=gen) / 128**0.5
    data = [torch.randn(96, 128, generator=gen) for _ in range(100)]

    def train(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        for x in data:
            loss = nn.functional.mse_loss(model(x), torch.tanh(x @ teacher * 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    ref_losses, fp8_losses = train(make(nn.Linear)), train(make(FP8TrainingLinear))
    assert torch.isfinite(fp8_losses).all()
    assert fp8_losses[-10:].mean() < 0.5 * fp8_losses[:5].mean()  # it learns
    # same trajectory within a few percent (averaged over windows to look past single-batch noise)
    for window in (slice(0, 10), slice(45, 55), slice(90, 100)):
        assert abs(fp8_losses[window].mean() / ref_losses[window].mean() - 1) < 0.03


def test_fallback_warns_once():
    L._warned_fallback = False
    _, layer = twin_layers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            layer(torch.randn(4, 300)).sum().backward()
    messages = [str(w.message) for w in caught if "FP8 kernels need" in str(w.message)]
    assert len(messages) == 1 and "PyTorch reference" in messages[0]


# --------------------------------------------------------------------------------------------------- inference layer


@pytest.mark.parametrize("bias", [False, True])
def test_inference_linear_checkpoint_format(bias):
    torch.manual_seed(2)
    linear = nn.Linear(300, 200, bias=bias)
    fp8 = FP8Linear.from_linear(linear)
    sd = fp8.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv"} | ({"bias"} if bias else set())
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight"].shape == (200, 300)
    assert sd["weight_scale_inv"].dtype == torch.float32 and sd["weight_scale_inv"].shape == (2, 3)
    assert not any(p.requires_grad for p in fp8.parameters())
    # the stored scales are the 128x128 block amax / 448 of the original weight
    assert sd["weight_scale_inv"][1, 2] == linear.weight[128:, 256:].abs().max() / 448
    # dequantize back
    back = fp8.dequantize(torch.float32)
    assert isinstance(back, nn.Linear) and back.weight.shape == (200, 300)
    assert rel_err(back.weight, linear.weight) < 0.04
    assert torch.equal(back.weight, F.dequantize_weight_128x128(sd["weight"], sd["weight_scale_inv"]))
    # forward: activations quantized on the fly, output in the input dtype
    x = torch.randn(2, 70, 300)
    y = fp8(x)
    assert y.shape == (2, 70, 200) and y.dtype == torch.float32
    assert rel_err(y, linear(x)) < 0.06
    assert fp8(x.bfloat16()).dtype == torch.bfloat16
    # loading an official-format state dict into a fresh layer reproduces it
    fresh = FP8Linear(300, 200, bias=bias, bias_dtype=torch.float32)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), y)


def test_inference_linear_rejects_bad_inputs():
    fp8 = FP8Linear.from_linear(nn.Linear(256, 128, bias=False))
    with pytest.raises(ValueError, match=r"inputs \[..., 256\]"):
        fp8(torch.randn(3, 255))
    with pytest.raises(ValueError, match="`input` contains non-finite values"):
        fp8(torch.full((3, 256), float("inf")))


def test_grouped_linear_matches_per_expert_fp8_linears():
    torch.manual_seed(3)
    experts = [FP8Linear.from_linear(nn.Linear(300, 200, bias=False)) for _ in range(4)]
    counts = torch.tensor([40, 0, 90, 20])
    x = torch.randn(150, 300)
    w = torch.stack([e.weight for e in experts])
    s = torch.stack([e.weight_scale_inv for e in experts])
    assert w.shape == (4, 200, 300) and s.shape == (4, 2, 3)
    out = fp8_grouped_linear_frozen(x, counts, w, s)
    start = 0
    for e, n in enumerate(counts.tolist()):
        torch.testing.assert_close(out[start : start + n], experts[e](x[start : start + n]), rtol=1e-5, atol=1e-5)
        start += n
    with pytest.raises(ValueError, match="one entry per expert"):
        fp8_grouped_linear_frozen(x, counts[:3], w, s)


# --------------------------------------------------------------------------------------------------- experts, training


@pytest.mark.parametrize("n", [256, 200])  # one quantization launch for all experts / one per expert
def test_grouped_mm_equals_per_expert_training_linears(n):
    torch.manual_seed(4)
    counts = torch.tensor([40, 0, 150, 20])
    layers = [FP8TrainingLinear(300, n, bias=False) for _ in range(4)]
    x = torch.randn(int(counts.sum()), 300)
    g = torch.randn(int(counts.sum()), n)
    x_grouped = x.clone().requires_grad_()
    weight = torch.stack([layer.weight for layer in layers])  # gradients flow back to each expert's master weight
    out = L.fp8_grouped_linear_trainable(x_grouped, counts, weight)
    grad_x, grad_w = torch.autograd.grad(out, (x_grouped, weight), g)
    start = 0
    for e, m in enumerate(counts.tolist()):
        rows = slice(start, start + m)
        if m:
            x_e = x[rows].clone().requires_grad_()
            y_e = layers[e](x_e)
            y_e.backward(g[rows])
            # same tiles, same scales, same sums: identical numbers (Wgrad's 128x1 tiles restart at each expert)
            assert torch.equal(out[rows], y_e) and torch.equal(grad_x[rows], x_e.grad)
            assert torch.equal(grad_w[e], layers[e].weight.grad)
        else:
            assert torch.equal(grad_w[e], torch.zeros(n, 300))
        start += m
    # and through torch.stack the gradient reaches each expert's own parameter
    for layer in layers:
        layer.weight.grad = None
    L.fp8_grouped_linear_trainable(x, counts, torch.stack([layer.weight for layer in layers])).backward(g)
    assert torch.equal(layers[2].weight.grad, grad_w[2])
    with pytest.raises(ValueError, match="one entry per expert"):
        L.fp8_grouped_linear_trainable(x, counts[:2], weight)
