"""The MoE weight-gradient GEMM: per-segment 128×1 tiles, one launch for all experts, no host synchronization.

Three layers of checks:

* on the CPU (reference path): the grouped quantization is, segment by segment, the ungrouped 128×1 one; the
  reference GEMM is near an fp32 dW at the FP8 error level; the grouped expert MLP gives the per-expert
  ``FP8TrainingLinear`` gradients exactly, with segments that are not multiples of 128 and empty experts;
* compiled for sm_90 / sm_89 without a GPU (FP8 tensor-core instructions generated);
* under ``TRITON_INTERPRET=1`` in a child process (the flag must be set before the kernels are decorated, see
  test_fp8_kernels.py): the kernels against the references, and the kernel path run under a guard that raises
  on every host read of a tensor (``.tolist``, ``.item``, ``bool``, ``nonzero``, ...), so reintroducing a sync
  or a per-expert host loop there fails.

Not covered here: speed on a GPU (nothing is timed; test_fp8_gpu.py style checks need a GPU).
"""

import os
import re

import pytest
import torch
from torch import nn
from conftest import run_file_under_triton_interpreter

from modeling_deepseek_v3.quantization import formats as F
from modeling_deepseek_v3.quantization import linear as L


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# expert token counts: empty experts, segments shorter and longer than 128 that start off a 128 boundary
COUNTS = [[130, 0, 5, 257, 0, 1], [0, 0, 33], [128, 128], [1], [0, 300]]


def seeded_randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def offsets_of(counts):
    return torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())


def same_bytes(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def grouped_expert_mlp(experts, x, counts):
    """``down(silu(gate(x)) * up(x))`` of every expert as grouped FP8 GEMMs over their stacked master weights (each
    projection stacked separately, so every expert's blocks are its own FP8Linear's)."""
    def project(h, name):
        return L.fp8_grouped_linear_trainable(h, counts, torch.stack([getattr(e, name).weight for e in experts]))

    return project(nn.functional.silu(project(x, "gate_proj")) * project(x, "up_proj"), "down_proj")


class Expert(nn.Module):
    def __init__(self, hidden, inter, cls=nn.Linear, dtype=None):
        super().__init__()
        self.gate_proj = cls(hidden, inter, bias=False, dtype=dtype)
        self.up_proj = cls(hidden, inter, bias=False, dtype=dtype)
        self.down_proj = cls(inter, hidden, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


if not INTERPRETING:

    # ------------------------------------------------------------------------------------------- references

    @pytest.mark.parametrize("counts", COUNTS, ids=str)
    def test_grouped_quant_reference_is_the_128x1_quantization_of_each_segment(counts):
        offsets = offsets_of(counts)
        t = int(offsets[-1])
        x = seeded_randn(t, 200, seed=1, dtype=torch.bfloat16)
        q, s = F.quantize_act_128x1_transposed_grouped(x, offsets)
        tiles = F.grouped_token_tiles(t, len(counts))
        assert q.shape == (200, t) and s.shape == (200, tiles)
        tile_offsets = F.group_tile_offsets(offsets).tolist()
        assert tile_offsets[-1] <= tiles  # the bound holds
        for e, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            assert tile_offsets[e + 1] - tile_offsets[e] == -(-(end - start) // 128)
            if end > start:  # tiles restart at the segment start: exactly the ungrouped quantization of the segment
                q_e, s_e = F.quantize_act_128x1_transposed(x[start:end])
                assert same_bytes(q[:, start:end].contiguous(), q_e)
                assert torch.equal(s[:, tile_offsets[e]:tile_offsets[e + 1]], s_e)
        assert torch.equal(s[:, tile_offsets[-1]:], torch.ones(200, tiles - tile_offsets[-1]))
        if len(counts) == 1:  # one expert: the ungrouped layout
            q1, s1 = F.quantize_act_128x1_transposed(x)
            assert same_bytes(q, q1) and torch.equal(s, s1)

    def test_grouped_token_tiles_bounds_every_split():
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            e = int(torch.randint(1, 9, (1,), generator=g))
            counts = torch.randint(0, 400, (e,), generator=g) * torch.randint(0, 2, (e,), generator=g)
            offsets = offsets_of(counts.tolist())
            assert int(F.group_tile_offsets(offsets)[-1]) <= F.grouped_token_tiles(int(counts.sum()), e)
        # tight: E segments of 1 token need E tiles
        assert F.grouped_token_tiles(5, 5) == 4 + 1 and F.grouped_token_tiles(128 * 3, 3) == 3 + 2

    @pytest.mark.parametrize("power_of_two", [False, True])
    def test_grouped_wgrad_reference_is_near_fp32(power_of_two):
        counts = [130, 0, 5, 257, 0, 200]
        offsets = offsets_of(counts)
        t = int(offsets[-1])
        dy, x = seeded_randn(t, 200, seed=2), seeded_randn(t, 150, seed=3)
        g_t, g_s = F.quantize_act_128x1_transposed_grouped(dy, offsets, power_of_two)
        x_t, x_s = F.quantize_act_128x1_transposed_grouped(x, offsets, power_of_two)
        dw = F.fp8_grouped_wgrad_reference(g_t, g_s, x_t, x_s, offsets)
        assert dw.shape == (6, 200, 150) and dw.dtype == torch.float32
        for e, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
            exact = dy[start:end].t() @ x[start:end]
            if end == start:
                assert torch.equal(dw[e], torch.zeros(200, 150))
            elif end - start >= 100:  # enough tokens for a statistical error level
                err = rel_err(dw[e], exact)
                assert 0.005 < err < 0.06, err  # FP8 E4M3 level: clearly quantized, clearly right
        exact = torch.cat([(dy[a:b].t() @ x[a:b]).flatten() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
        assert rel_err(torch.cat([dw[e].flatten() for e in range(6)]), exact) < 0.06
        assert F.fp8_grouped_wgrad_reference(g_t, g_s, x_t, x_s, offsets, torch.bfloat16).dtype == torch.bfloat16

    def test_grouped_wgrad_argument_errors():
        offsets = offsets_of([10, 20])
        x = seeded_randn(30, 64)
        q, s = F.quantize_act_128x1_transposed_grouped(x, offsets)
        with pytest.raises(ValueError, match="rise from 0"):
            F.quantize_act_128x1_transposed_grouped(x, torch.tensor([0, 20, 10]))
        with pytest.raises(ValueError, match="rise from 0"):  # offsets that do not end at the token count
            F.fp8_grouped_wgrad_reference(q, s, q, s, torch.tensor([0, 20, 25]))
        with pytest.raises(ValueError, match="num_experts \\+ 1"):
            F.fp8_grouped_wgrad_reference(q, s, q, s, offsets[None])
        with pytest.raises(ValueError, match="must have shape"):
            F.fp8_grouped_wgrad_reference(q, s[:, :1], q, s, offsets)
        with pytest.raises(ValueError, match="tokens along dim 1"):
            F.fp8_grouped_wgrad_reference(q, s, q[:, :20], s, offsets)
        with pytest.raises(TypeError, match="float8"):
            F.fp8_grouped_wgrad_reference(q.float(), s, q, s, offsets)

    # ------------------------------------------------------------------------------------------- layers (CPU)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_grouped_expert_mlp_grads_equal_per_expert_training_linears(dtype):
        torch.manual_seed(7)
        counts = [130, 0, 7, 260]  # segments straddle 128-token boundaries; one expert idle
        experts = nn.ModuleList(Expert(96, 160, L.FP8TrainingLinear, dtype) for _ in counts)
        x = torch.randn(sum(counts), 96).to(dtype)
        out = grouped_expert_mlp(experts, x, torch.tensor(counts))
        weights = torch.linspace(-1, 1, 96).to(dtype)
        (out * weights).sum().backward()
        grouped = [p.grad.clone() for p in experts.parameters()]
        experts.zero_grad(set_to_none=True)
        start, loop = 0, []
        for expert, m in zip(experts, counts):
            if m:
                loop.append(expert(x[start:start + m]))
            start += m
        loop = torch.cat(loop)
        (loop * weights).sum().backward()
        assert torch.equal(out, loop)
        for got, p in zip(grouped, experts.parameters()):
            assert got.dtype == dtype  # the master-weight dtype
            # same per-segment tiles, scales and block sums as the per-expert FP8 layers: identical numbers
            assert torch.equal(got, p.grad if p.grad is not None else torch.zeros_like(p))
        assert all(p.grad is None for p in experts[1].parameters())  # (the loop never ran the idle expert)

    # ------------------------------------------------------------------------------------------- code generation

    @pytest.mark.parametrize("capability", [90, 89])
    def test_grouped_wgrad_kernels_compile(capability):
        triton = pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from modeling_deepseek_v3.quantization.kernels import grouped_wgrad as W

        def ptx_of(kernel, pointers, constexprs, **options):
            signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", capability, 32), options=options)
            assert compiled.asm["cubin"]
            return compiled.asm["ptx"]

        ptrs = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32",
                "offsets_ptr": "*i32", "tile_offsets_ptr": "*i32"}
        ptx = ptx_of(W.fp8_grouped_wgrad_kernel, ptrs, {"BLOCK_N": 128, "BLOCK_K": 128, "BLOCK_T": 128, "GROUP_N": 8},
                     num_warps=8, num_stages=4)
        assert re.search(r"(wgmma\.mma_async|mma\.sync\.aligned)[\w.]*e4m3\.e4m3", ptx), "FP8 tensor-core MMA not generated"
        if capability == 90:
            assert "wgmma.mma_async" in ptx
        ptrs = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "offsets_ptr": "*i32", "tile_offsets_ptr": "*i32"}
        ptx = ptx_of(W.act_quant_128x1_t_grouped_kernel, ptrs,
                     {"SEARCH_STEPS": 8, "BLOCK_M": 128, "BLOCK_C": 32, "POWER_OF_TWO": True})
        # hardware FP8 conversion, from fp32 or (Triton < 3.9 on sm_89) exactly through f16: see test_fp8_compile.py
        assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.(f32|f16x2)", ptx) and "div.rn.f32" in ptx

    # ------------------------------------------------------------------------------------------- interpreter

    @pytest.mark.interpreter

    def test_grouped_wgrad_kernels_under_the_interpreter():
        run_file_under_triton_interpreter(__file__)

else:
    import triton.runtime.interpreter as triton_interpreter
    from torch.overrides import TorchFunctionMode

    from modeling_deepseek_v3.quantization import kernels as K

    @pytest.mark.parametrize("power_of_two", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("counts", COUNTS, ids=str)
    def test_grouped_quant_kernel_is_bit_exact(counts, dtype, power_of_two):
        offsets = offsets_of(counts)
        x = seeded_randn(int(offsets[-1]), 70, seed=4, dtype=dtype) * 3
        if x.shape[0] > 140:
            x[135:140] = 0  # a partly zero tile and channels that are zero over a whole tile
            x[:, 5] = 0
        q, s = K.act_quant_128x1_transposed_grouped(x, offsets, power_of_two)
        q_ref, s_ref = F.quantize_act_128x1_transposed_grouped(x, offsets, power_of_two)
        assert same_bytes(q, q_ref) and torch.equal(s, s_ref)

    def test_grouped_quant_kernel_reports_non_finite_tiles():
        offsets = offsets_of([100, 0, 50])
        for bad in (float("nan"), float("inf")):
            x = seeded_randn(150, 40, seed=5)
            x[120, 3] = bad
            with pytest.raises(ValueError, match="`dy` contains non-finite values .* in 1 of its"):
                K.act_quant_128x1_transposed_grouped(x, offsets, name="dy")

    @pytest.mark.parametrize("counts", COUNTS, ids=str)
    def test_grouped_wgrad_kernel_matches_reference(counts):
        offsets = offsets_of(counts)
        t = int(offsets[-1])
        g_t, g_s = F.quantize_act_128x1_transposed_grouped(seeded_randn(t, 200, seed=6), offsets)
        x_t, x_s = F.quantize_act_128x1_transposed_grouped(seeded_randn(t, 150, seed=7), offsets)
        out = K.fp8_grouped_wgrad(g_t, g_s, x_t, x_s, offsets, torch.float32)
        ref = F.fp8_grouped_wgrad_reference(g_t, g_s, x_t, x_s, offsets, torch.float32)
        assert out.shape == ref.shape == (len(counts), 200, 150)
        assert rel_err(out, ref) < 1e-6  # same products and scales; only the fp32 summation order differs
        for e, m in enumerate(counts):
            if m == 0:  # idle experts: zeros stored by the kernel (the output is not pre-zeroed)
                assert torch.equal(out[e], torch.zeros(200, 150))
        out_bf16 = K.fp8_grouped_wgrad(g_t, g_s, x_t, x_s, offsets, torch.bfloat16)
        assert out_bf16.dtype == torch.bfloat16 and rel_err(out_bf16, ref) < 4e-3

    # ------------------------------------------------------------------------------------------- no host sync

    class HostReadError(AssertionError):
        pass

    class NoHostReads(TorchFunctionMode):
        """Raises on every tensor operation that reads device memory on the host (a device->host sync on a GPU).

        Kernel launches are exempt (``paused``): under the interpreter they copy their arguments to numpy, on a
        GPU they are asynchronous.
        """

        READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "cpu", "numpy",
                 "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount", "equal", "allclose"}

        def __init__(self):
            super().__init__()
            self.paused = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not self.paused:
                name = getattr(func, "__name__", "")
                data_dependent_shape = (name == "repeat_interleave" and "output_size" not in kwargs) or (
                    name == "__getitem__" and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
                )
                if name in self.READS or data_dependent_shape:
                    raise HostReadError(f"host read of a tensor: {name}")
            return func(*args, **kwargs)

    @pytest.fixture
    def no_host_reads(monkeypatch):
        guard = NoHostReads()
        launch = triton_interpreter.GridExecutor.__call__

        def exempt_launch(self, *args, **kwargs):
            guard.paused += 1
            try:
                return launch(self, *args, **kwargs)
            finally:
                guard.paused -= 1

        monkeypatch.setattr(triton_interpreter.GridExecutor, "__call__", exempt_launch)
        L.set_check_finite(False)  # the opt-in non-finite check reads the scales on the host by design
        try:
            yield guard
        finally:
            L.set_check_finite("auto")

    def test_kernel_path_never_reads_the_host(no_host_reads, monkeypatch):
        counts = [130, 0, 5, 257]
        offsets = offsets_of(counts)
        dy, x = seeded_randn(392, 200, seed=8), seeded_randn(392, 150, seed=9)
        with no_host_reads:
            dw = L.grouped_wgrad_kernels(dy, x, offsets, False, torch.float32)
        assert rel_err(dw, L.grouped_wgrad_reference(dy, x, offsets, False, torch.float32)) < 1e-6
        # the guard is live: the reference path (host loop over the experts) and the finite check trip it
        with no_host_reads, pytest.raises(HostReadError, match="tolist"):
            L.grouped_wgrad_reference(dy, x, offsets, False, torch.float32)
        with no_host_reads, pytest.raises(HostReadError, match="__bool__"):
            K.act_quant_128x1_transposed_grouped(x, offsets, check_finite=True)
        # the whole grouped FP8 layer, forward and backward, on the kernels. Autograd does not carry the guard
        # (a torch-function mode) into the backward, so the backward body enters it itself.
        backward = L.FP8GroupedLinearFunction.backward

        def guarded_backward(ctx, grad_out):
            with no_host_reads:
                return backward(ctx, grad_out)

        monkeypatch.setattr(L.FP8GroupedLinearFunction, "backward", staticmethod(guarded_backward))
        monkeypatch.setattr(L, "use_triton", lambda device: True)
        weight = (seeded_randn(4, 200, 150, seed=10) * 0.05).requires_grad_()
        xx = x.clone().requires_grad_()
        with no_host_reads:
            out = L.fp8_grouped_linear_trainable(xx, torch.tensor(counts), weight)
        out.backward(dy)
        assert xx.grad is not None and weight.grad is not None and weight.grad[0].any()
        # the same backward on the reference path trips the guard
        monkeypatch.setattr(L, "use_triton", lambda device: False)
        with pytest.raises(HostReadError, match="tolist"):
            L.fp8_grouped_linear_trainable(x, torch.tensor(counts), weight).backward(dy)

    def test_grouped_expert_mlp_grads_on_the_kernels_match_per_expert_linears(monkeypatch):
        torch.manual_seed(8)
        counts = [130, 0, 7, 60]
        experts = nn.ModuleList(Expert(96, 160, L.FP8TrainingLinear) for _ in counts)
        x = torch.randn(sum(counts), 96)
        monkeypatch.setattr(L, "use_triton", lambda device: True)
        xx = x.clone().requires_grad_()
        grouped_expert_mlp(experts, xx, torch.tensor(counts)).pow(2).sum().backward()
        kernel_grads = [xx.grad] + [p.grad.clone() for p in experts.parameters()]
        monkeypatch.setattr(L, "use_triton", lambda device: False)
        experts.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        start, loop = 0, []
        for expert, m in zip(experts, counts):  # the per-expert FP8 layers on the reference path
            loop.append(expert(xx[start:start + m]))
            start += m
        torch.cat(loop).pow(2).sum().backward()
        for got, expected in zip(kernel_grads, [xx.grad] + [p.grad for p in experts.parameters()]):
            if not expected.any():
                assert torch.equal(got, expected)
            else:
                assert rel_err(got, expected) < 1e-5
