"""Compile every FP8 Triton kernel for Hopper (sm_90) and Ada (sm_89) on the CPU, down to a cubin.

Triton compiles without a GPU when given the target, so this catches what the interpreter cannot: type
errors in loop-carried values, layouts, the FP8 tensor-core instructions and the TMA path actually being
generated, and the E4M3 rounding surviving the optimizer. Nothing is executed here (see test_fp8_kernels.py
for numerics under the interpreter and test_fp8_gpu.py for runs on a GPU).
"""

import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted functions when TRITON_INTERPRET=1; nothing to compile", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modeling_deepseek_v3.quantization.kernels import gemm as G  # noqa: E402
from modeling_deepseek_v3.quantization.kernels import quant as Q  # noqa: E402


def compile_ptx(kernel, pointers: dict, constexprs: dict, capability: int, **options) -> str:
    """Compile ``kernel`` with the given pointer types (other non-constexpr args are i32) to a cubin; return its PTX."""
    fn = kernel.fn if hasattr(kernel, "fn") and not hasattr(kernel, "arg_names") else kernel
    signature = {name: pointers.get(name, "constexpr" if name in constexprs else "i32") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm["cubin"], "no cubin produced"
    return compiled.asm["ptx"]


QUANT_KERNELS = [
    (Q.act_quant_1x128_kernel, {"BLOCK_M": 32, "BLOCK_K": 128}),
    (Q.act_quant_128x1_t_kernel, {"BLOCK_M": 128, "BLOCK_K": 32}),
    (Q.weight_quant_128x128_kernel, {"BLOCK": 128}),
]


@pytest.mark.parametrize("capability", [90, 89])
@pytest.mark.parametrize("kernel,blocks", QUANT_KERNELS, ids=lambda v: getattr(v, "__name__", ""))
def test_quant_kernels_compile(kernel, blocks, capability):
    pointers = {name: t for name, t in zip(kernel.arg_names[:3], ("*bf16", "*fp8e4nv", "*fp32"))}
    ptx = compile_ptx(kernel, pointers, {**blocks, "POWER_OF_TWO": True}, capability)
    # hardware FP8 conversion: from fp32, or (Triton < 3.9 on sm_89) through f16, which is exact here because
    # _round_to_e4m3 has already put every value on the E4M3 grid, and E4M3 values are all f16 values
    assert re.search(r"cvt\.rn\.satfinite\.e4m3x2\.(f32|f16x2)", ptx)
    assert "div.rn.f32" in ptx  # IEEE division, as torch does (not the approximate default)
    assert "0f4B400000" in ptx  # the 1.5 * 2^23 rounding constant of _round_to_e4m3 was not folded away


GEMM_POINTERS = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "as_ptr": "*fp32", "bs_ptr": "*fp32", "offsets_ptr": "*i32"}


@pytest.mark.parametrize("use_tma", [False, True])
def test_gemm_kernel_compiles_to_wgmma_on_hopper(use_tma):
    constexprs = {"B_SCALE_ROWS": 128, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "USE_TMA": use_tma}
    ptx = compile_ptx(G.fp8_gemm_kernel, GEMM_POINTERS, constexprs, 90, num_warps=8, num_stages=4)
    assert re.search(r"wgmma\.mma_async\.[\w.]*e4m3\.e4m3", ptx), "FP8 warpgroup MMA not generated"
    assert ("cp.async.bulk.tensor" in ptx) == use_tma  # TMA loads exactly when asked for


def test_gemm_kernel_compiles_for_ada_and_per_row_scales():
    constexprs = {"B_SCALE_ROWS": 1, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "USE_TMA": False}
    ptx = compile_ptx(G.fp8_gemm_kernel, GEMM_POINTERS, constexprs, 89, num_warps=4, num_stages=3)
    assert "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32" in ptx


@pytest.mark.parametrize("capability", [90, 89])
def test_grouped_gemm_kernel_compiles(capability):
    ptx = compile_ptx(G.fp8_grouped_gemm_kernel, GEMM_POINTERS, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, capability,
                      num_warps=4, num_stages=4)
    assert re.search(r"(wgmma\.mma_async|mma\.sync\.aligned)[\w.]*e4m3\.e4m3", ptx)


def test_autotuned_kernels_key_on_kernel_arguments():
    gemm, grouped = G._tuned_kernels()
    for tuned, kernel in ((gemm, G.fp8_gemm_kernel), (grouped, G.fp8_grouped_gemm_kernel)):
        assert set(tuned.keys) <= set(kernel.arg_names) and "M_BUCKET" in tuned.keys
        for config in tuned.configs:  # every tuned parameter is a constexpr of the kernel
            assert set(config.kwargs) <= set(kernel.arg_names)
    assert [G._m_bucket(m) for m in (1, 100, 4096, 5000, 10**6)] == [16, 128, 4096, 8192, 16384]
