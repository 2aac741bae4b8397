"""The Triton FP8 kernels against their PyTorch references, on the CPU under ``TRITON_INTERPRET=1``.

The interpreter flag must be set before any kernel is decorated, and another test module may already have
imported our kernels in this pytest process, so the kernel tests run in a child pytest process started with
``TRITON_INTERPRET=1`` (the single test ``test_triton_kernels_under_the_interpreter`` does that). Run this file
directly with ``TRITON_INTERPRET=1 pytest tests/test_fp8_kernels.py`` to see the individual tests.

What the interpreter shows and what it cannot: it runs the kernels' Python-level logic (tiling, masks, scale
math, bit-exact E4M3 rounding, the persistent tile loop, the grouped expert lookup, the TMA descriptor path)
with numpy; it cannot show GPU-specific code generation (wgmma, pipelining, autotuning), which
``test_fp8_gpu.py`` covers on a GPU.
"""

import os

import pytest
import torch
from conftest import run_file_under_triton_interpreter


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETING:

    @pytest.mark.interpreter

    def test_triton_kernels_under_the_interpreter():
        run_file_under_triton_interpreter(__file__)

else:
    import triton  # noqa: F401  (imported only after TRITON_INTERPRET=1 is set)

    from modeling_deepseek_v3.quantization import formats as F
    from modeling_deepseek_v3.quantization import kernels as K
    from modeling_deepseek_v3.quantization import linear as L

    def seeded_randn(*shape, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g).to(dtype)

    def same_bytes(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    def rel_err(out, ref):
        return ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    SHAPES = [(200, 300), (64, 128), (1, 5), (130, 257)]

    # ----------------------------------------------------------------------------------------------- quantization

    @pytest.mark.parametrize("power_of_two", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_act_quant_1x128_kernel_is_bit_exact(shape, dtype, power_of_two):
        x = seeded_randn(*shape, seed=1, dtype=dtype) * 5
        q, s = K.act_quant_1x128(x, power_of_two)
        q_ref, s_ref = F.quantize_act_1x128(x, power_of_two)
        assert same_bytes(q, q_ref) and torch.equal(s, s_ref)

    @pytest.mark.parametrize("power_of_two", [False, True])
    @pytest.mark.parametrize("shape", SHAPES)
    def test_act_quant_128x1_transpose_kernel_is_bit_exact(shape, power_of_two):
        x = seeded_randn(*shape, seed=2, dtype=torch.bfloat16) * 0.01
        q, s = K.act_quant_128x1_transposed(x, power_of_two)
        q_ref, s_ref = F.quantize_act_128x1_transposed(x, power_of_two)
        assert q.shape == (shape[1], shape[0])
        assert same_bytes(q, q_ref) and torch.equal(s, s_ref)

    @pytest.mark.parametrize("power_of_two", [False, True])
    @pytest.mark.parametrize("shape", SHAPES + [(256, 384)])
    def test_weight_quant_128x128_kernel_is_bit_exact(shape, power_of_two):
        w = seeded_randn(*shape, seed=3) * 0.02
        q, s = K.weight_quant_128x128(w, power_of_two)
        q_ref, s_ref = F.quantize_weight_128x128(w, power_of_two)
        assert same_bytes(q, q_ref) and torch.equal(s, s_ref)

    def test_quant_kernels_round_every_e4m3_boundary_like_torch():
        # values spread over the whole E4M3 range incl. subnormals, mantissa carries (127.9 -> 128) and ties;
        # one tile per row, the row's amax pinned at 448 so that the scale is exactly 1
        vals = torch.cat([torch.linspace(-448, 448, 8191), torch.linspace(-0.03, 0.03, 8191), torch.linspace(120, 130, 8191)])
        x = torch.cat([vals, torch.zeros(-vals.numel() % 127)]).view(-1, 127)
        x = torch.cat([x, torch.full((x.shape[0], 1), 448.0)], 1)
        q, s = K.act_quant_1x128(x)
        assert torch.equal(s, torch.ones_like(s))
        assert same_bytes(q, x.to(torch.float8_e4m3fn))

    def test_quant_kernels_accept_strided_inputs():
        x = seeded_randn(300, 200, seed=4).t()  # non-contiguous [200, 300] view
        for kernel, ref in [(K.act_quant_1x128, F.quantize_act_1x128), (K.act_quant_128x1_transposed, F.quantize_act_128x1_transposed),
                            (K.weight_quant_128x128, F.quantize_weight_128x128)]:
            q, s = kernel(x)
            q_ref, s_ref = ref(x)
            assert same_bytes(q, q_ref) and torch.equal(s, s_ref)

    def test_quant_kernels_zero_tiles_and_non_finite_inputs():
        x = seeded_randn(130, 300, seed=5)
        x[:, 128:256] = 0
        x[3] = 0
        for kernel, ref in [(K.act_quant_1x128, F.quantize_act_1x128), (K.act_quant_128x1_transposed, F.quantize_act_128x1_transposed),
                            (K.weight_quant_128x128, F.quantize_weight_128x128)]:
            q, s = kernel(x)
            q_ref, s_ref = ref(x)
            assert same_bytes(q, q_ref) and torch.equal(s, s_ref) and torch.isfinite(s).all()
            for bad in (float("nan"), float("inf")):
                y = x.clone()
                y[100, 7] = bad
                with pytest.raises(ValueError, match="`act` contains non-finite values"):
                    kernel(y, name="act")
        q, s = K.act_quant_1x128(x)
        assert torch.equal(F.dequantize_act_1x128(q, s)[:, 128:256], torch.zeros(130, 128))

    # ----------------------------------------------------------------------------------------------- GEMM

    @pytest.mark.parametrize("m,n,k", [(150, 270, 300), (64, 128, 128), (1, 200, 129), (257, 64, 384)])
    def test_gemm_kernel_matches_reference(m, n, k):
        a, b = seeded_randn(m, k, seed=6), seeded_randn(n, k, seed=7)
        a_q, a_s = F.quantize_act_1x128(a)
        b_q, b_s = F.quantize_weight_128x128(b)
        out = K.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
        ref = F.fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
        assert rel_err(out, ref) < 1e-6
        if m * n > 1000:
            assert rel_err(out, a @ b.t()) < 0.06
        out_bf16 = K.fp8_gemm(a_q, a_s, b_q, b_s)
        assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16, ref) < 4e-3

    def test_gemm_kernel_per_row_b_scales_and_transposed_operand():
        # Wgrad: both operands 1x128 tiled along tokens; Dgrad: B = W^T, a strided view with transposed block scales
        x, g = seeded_randn(150, 300, seed=8), seeded_randn(150, 200, seed=9)
        g_t, g_ts = F.quantize_act_128x1_transposed(g)
        x_t, x_ts = F.quantize_act_128x1_transposed(x)
        out = K.fp8_gemm(g_t, g_ts, x_t, x_ts, b_scale_rows=1, out_dtype=torch.float32)
        assert rel_err(out, F.fp8_gemm_reference(g_t, g_ts, x_t, x_ts, 1, torch.float32)) < 1e-6
        w_q, w_s = F.quantize_weight_128x128(seeded_randn(200, 300, seed=10))
        g_q, g_s = F.quantize_act_1x128(g)
        out = K.fp8_gemm(g_q, g_s, w_q.t(), w_s.t(), out_dtype=torch.float32)
        ref = F.fp8_gemm_reference(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), out_dtype=torch.float32)
        assert rel_err(out, ref) < 1e-6

    def test_gemm_kernel_tma_descriptor_path():
        # the Hopper path (tensor descriptors, zero-filled edges) also runs in the interpreter; K % 16 == 0 needed
        a, b = seeded_randn(150, 320, seed=11), seeded_randn(200, 320, seed=12)
        a_q, a_s = F.quantize_act_1x128(a)
        b_q, b_s = F.quantize_weight_128x128(b)
        out = K.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32, use_tma=True)
        assert rel_err(out, F.fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=torch.float32)) < 1e-6

    @pytest.mark.parametrize("counts", [[40, 0, 90, 20], [0, 0, 0, 33], [1, 64, 65, 2]])
    def test_grouped_gemm_kernel_matches_reference(counts):
        offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())
        a = seeded_randn(offsets[-1].item(), 300, seed=13)
        b = seeded_randn(4, 200, 300, seed=14) * 0.05
        a_q, a_s = F.quantize_act_1x128(a)
        b_q, b_s = (torch.stack(t) for t in zip(*(F.quantize_weight_128x128(b[e]) for e in range(4))))
        out = K.fp8_grouped_gemm(a_q, a_s, b_q, b_s, offsets, out_dtype=torch.float32)
        ref = F.fp8_grouped_gemm_reference(a_q, a_s, b_q, b_s, offsets, out_dtype=torch.float32)
        assert rel_err(out, ref) < 1e-6

    # ----------------------------------------------------------------------------------------------- layers on kernels

    def test_fp8_training_linear_on_the_kernels(monkeypatch):
        """The autograd function dispatched to the Triton kernels (as on a GPU) gives the reference's numbers."""
        torch.manual_seed(0)
        layer = L.FP8TrainingLinear(300, 200, bias=True)
        x = torch.randn(3, 50, 300)
        grads = []
        for kernels in (False, True):
            monkeypatch.setattr(L, "use_triton", lambda device, k=kernels: k)
            xx = x.clone().requires_grad_()
            layer.zero_grad()
            y = layer(xx)
            (y * torch.linspace(-1, 1, 200)).sum().backward()
            grads.append((y.detach(), xx.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        for kernel_val, ref_val in zip(grads[1], grads[0]):
            assert rel_err(kernel_val, ref_val) < 1e-5

    def test_layers_on_the_kernels_check_finite_switch(monkeypatch):
        monkeypatch.setattr(L, "use_triton", lambda device: True)
        layer = L.FP8Linear.from_linear(torch.nn.Linear(256, 128, bias=False))
        x = torch.randn(4, 256)
        x[2, 100] = float("nan")
        with pytest.raises(ValueError, match="`input` contains non-finite values"):
            layer(x)
        L.set_check_finite(False)
        try:
            layer(x)  # no host synchronization, no error: the caller opted out
        finally:
            L.set_check_finite("auto")
        with torch.no_grad():
            layer(x)  # "auto": an inference launch never reads its scales on the host (a decode step stays one graph)
            L.set_check_finite("on")
            try:
                with pytest.raises(ValueError, match="`input` contains non-finite values"):
                    layer(x)
            finally:
                L.set_check_finite("auto")
        with pytest.raises(ValueError, match="policy must be one of"):
            L.set_check_finite("sometimes")

    class Expert(torch.nn.Module):
        def __init__(self, hidden, inter):
            super().__init__()
            self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def grouped_expert_mlp(experts, x, counts, training):
        """The experts' MLP as grouped FP8 GEMMs: differentiable over the stacked master weights (training), or over
        weights quantized once with their block scales (inference)."""
        def project(h, name):
            weight = torch.stack([getattr(e, name).weight for e in experts])
            if training:
                return L.fp8_grouped_linear_trainable(h, counts, weight)
            return L.fp8_grouped_linear_frozen(h, counts, *L.quantize_expert_weights(weight.detach(), False))

        return project(torch.nn.functional.silu(project(x, "gate_proj")) * project(x, "up_proj"), "down_proj")

    def test_grouped_expert_mlp_on_the_kernels(monkeypatch):
        """Training (grouped Fprop/Dgrad kernels, grouped weight-gradient kernel) and inference (FP8 weights) paths."""
        torch.manual_seed(0)
        experts = torch.nn.ModuleList(Expert(96, 160) for _ in range(3))
        x = torch.randn(70, 96)
        counts = torch.tensor([30, 0, 40])
        results = []
        for kernels in (False, True):
            monkeypatch.setattr(L, "use_triton", lambda device, k=kernels: k)
            experts.zero_grad()
            xx = x.clone().requires_grad_()
            out = grouped_expert_mlp(experts, xx, counts, training=True)
            out.pow(2).sum().backward()
            with torch.no_grad():
                inference = grouped_expert_mlp(experts, x, counts, training=False)
            results.append([out.detach(), inference, xx.grad] + [p.grad.clone() for p in experts.parameters() if p.grad is not None])
        assert len(results[1]) == 3 + 9  # stacked weights: every expert gets a gradient (zero for expert 1)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in results[1][6:9])
        for kernel_val, ref_val in zip(results[1], results[0]):
            assert torch.equal(kernel_val, ref_val) if not ref_val.any() else rel_err(kernel_val, ref_val) < 1e-5
