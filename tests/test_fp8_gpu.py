"""The FP8 kernels and layers on a CUDA GPU with FP8 tensor cores (sm_89+), against the CPU references.

Skipped without such a GPU. The same code is covered on the CPU by test_fp8_kernels.py (interpreter),
test_fp8_compile.py (sm_89 / sm_90 code generation) and test_fp8_linear.py (reference path).
"""

import pytest
import torch
from torch import nn

from modeling_deepseek_v3.quantization import formats as F
from modeling_deepseek_v3.quantization import FP8Linear, FP8TrainingLinear, linear as L


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _fp8_gpu(), reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")]


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def randn(*shape, seed=0, dtype=torch.float32, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def same_bytes(a, b):
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


@pytest.mark.parametrize("shape", [(4096, 7168), (300, 257), (1, 129)])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_quant_kernels_bit_exact_on_gpu(shape, power_of_two):
    from modeling_deepseek_v3.quantization import kernels as K

    x = randn(*shape, seed=1, dtype=torch.bfloat16)
    for kernel, ref in [(K.act_quant_1x128, F.quantize_act_1x128), (K.act_quant_128x1_transposed, F.quantize_act_128x1_transposed),
                        (K.weight_quant_128x128, F.quantize_weight_128x128)]:
        q, s = kernel(x, power_of_two)
        q_ref, s_ref = ref(x.cpu(), power_of_two)
        assert same_bytes(q, q_ref) and torch.equal(s.cpu(), s_ref)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        K.act_quant_1x128(bad)


@pytest.mark.parametrize("m,n,k", [(4096, 2112, 7168), (128, 24576, 1536), (300, 270, 320), (257, 129, 384)])
def test_gemm_kernel_on_gpu(m, n, k):
    from modeling_deepseek_v3.quantization import kernels as K

    a, b = randn(m, k, seed=2), randn(n, k, seed=3)
    a_q, a_s = F.quantize_act_1x128(a)
    b_q, b_s = F.quantize_weight_128x128(b)
    ref = F.fp8_gemm_reference(a_q.cpu(), a_s.cpu(), b_q.cpu(), b_s.cpu(), out_dtype=torch.float32) if m * n * k < 2**31 else None
    for use_tma in ([False, True] if torch.cuda.get_device_capability()[0] >= 9 else [False]):
        out = K.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, use_tma=use_tma)
        if ref is not None:
            assert rel_err(out.cpu(), ref) < 1e-5
        assert rel_err(out, a @ b.t()) < 0.06


def test_grouped_gemm_kernel_on_gpu():
    from modeling_deepseek_v3.quantization import kernels as K

    counts = torch.tensor([300, 0, 17, 129, 1000, 5, 0, 64])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    a = randn(int(offsets[-1]), 512, seed=4)
    b = randn(8, 384, 512, seed=5) * 0.05
    a_q, a_s = F.quantize_act_1x128(a)
    b_q, b_s = (torch.stack(t) for t in zip(*(F.quantize_weight_128x128(b[e]) for e in range(8))))
    out = K.fp8_grouped_gemm(a_q, a_s, b_q, b_s, offsets.cuda(), out_dtype=torch.float32)
    ref = F.fp8_grouped_gemm_reference(a_q.cpu(), a_s.cpu(), b_q.cpu(), b_s.cpu(), offsets, out_dtype=torch.float32)
    assert rel_err(out.cpu(), ref) < 1e-5


def test_training_linear_on_gpu_matches_cpu_reference():
    torch.manual_seed(0)
    layer = FP8TrainingLinear(1536, 2112, bias=False, dtype=torch.bfloat16)
    x = torch.randn(4, 256, 1536, dtype=torch.bfloat16)
    g = torch.randn(4, 256, 2112, dtype=torch.bfloat16)
    results = []
    for device in ("cpu", "cuda"):
        layer.to(device).zero_grad()
        xx = x.to(device).requires_grad_()
        y = layer(xx)
        y.backward(g.to(device))
        results.append([t.detach().float().cpu() for t in (y, xx.grad, layer.weight.grad)])
    for gpu, cpu in zip(results[1], results[0]):
        assert rel_err(gpu, cpu) < 5e-3  # bf16 outputs; same FP8 operands and scales


def test_small_model_fp8_training_tracks_bf16_on_gpu():
    """A few hundred steps: the FP8 loss curve stays within 1% of the bf16 one."""

    def make(cls):
        torch.manual_seed(0)
        return nn.Sequential(cls(512, 1024), nn.GELU(), cls(1024, 1024), nn.GELU(), cls(1024, 256)).cuda().bfloat16()

    gen = torch.Generator().manual_seed(1)
    teacher = (torch.randn(512, 256, generator=gen) / 512**0.5).cuda()

    def train(model):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses = []
        g = torch.Generator(device="cuda").manual_seed(2)
        for _ in range(300):
            x = torch.randn(512, 512, device="cuda", generator=g)
            loss = nn.functional.mse_loss(model(x.bfloat16()).float(), torch.tanh(x @ teacher * 2))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return torch.tensor(losses)

    ref, fp8 = train(make(nn.Linear)), train(make(FP8TrainingLinear))
    assert torch.isfinite(fp8).all() and fp8[-20:].mean() < 0.5 * fp8[:5].mean()
    assert abs(fp8[-50:].mean() / ref[-50:].mean() - 1) < 0.01


def test_inference_linear_on_gpu():
    torch.manual_seed(0)
    linear = nn.Linear(7168, 2112, bias=False).cuda().bfloat16()
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(128, 7168, device="cuda", dtype=torch.bfloat16)
    assert L.use_triton(x.device)
    assert rel_err(fp8(x), x.float() @ linear.weight.float().t()) < 0.06
