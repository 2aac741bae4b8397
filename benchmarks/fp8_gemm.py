"""FP8 block-scaled GEMM benchmark: ours against bf16 ``torch.matmul`` and torch's blockwise ``scaled_mm``.

    python benchmarks/fp8_gemm.py --out benchmarks/fp8_gemm_h100.md

One table, measured in one run on the GPU found: for M in {128, 4096} and the DeepSeek-V3 projection shapes
(N, K) in {(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)}, plus 8192^3:

* TFLOP/s of bf16 ``torch.matmul`` (the baseline every ratio refers to);
* TFLOP/s of ``torch.nn.functional.scaled_mm`` with 1x128 (A) / 128x128 (B) blockwise scales, where this torch
  and GPU have it ("n/a" with the reason otherwise);
* TFLOP/s of our Triton GEMM alone (operands already quantized) and of our FP8 linear, i.e. the 1x128
  activation quantization + GEMM with a weight stored in FP8 (``FP8Linear.forward``), without and with its
  inf/nan check (one device->host synchronization);
* relative error ``||out - ref|| / ||ref||`` against the fp32 product of the unquantized operands.

Timings use ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs). Needs a CUDA GPU with FP8
(compute capability 8.9+); exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from modeling_deepseek_v3.cli import positive


SHAPES_NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
M_VALUES = [128, 4096]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


def blockwise_scaled_mm(a_q, a_s, b_q, b_s):
    """torch's blockwise FP8 GEMM on our operands (decode scales, as ours): A 1x128, B 128x128."""
    from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

    return scaled_mm(
        a_q, b_q.t(),  # B column-major [K, N]
        a_s.t().contiguous().t(), ScalingType.BlockWise1x128,  # A scales M-major, as cuBLAS wants them
        b_s, ScalingType.BlockWise128x128,
        swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE,
        output_dtype=torch.bfloat16,
    )


def bench_shape(m: int, n: int, k: int, warmup: int, rep: int) -> dict:
    from triton.testing import do_bench

    from modeling_deepseek_v3.quantization import FP8Linear, formats, set_check_finite
    from modeling_deepseek_v3.quantization.kernels import act_quant_1x128, fp8_gemm

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    ref = a.float() @ w.float().t()  # TF32 is off (see main)
    row = {"M": m, "N": n, "K": k}

    ms = do_bench(lambda: torch.matmul(a, w.t()), warmup=warmup, rep=rep)
    row["bf16"] = tflops(m, n, k, ms)
    row["err_bf16"] = rel_err(torch.matmul(a, w.t()), ref)

    a_q, a_s = act_quant_1x128(a)
    layer = FP8Linear(k, n, bias=False, device="cuda")
    layer.weight.data, layer.weight_scale_inv.data = formats.quantize_weight_128x128(w)
    b_q, b_s = layer.weight.data, layer.weight_scale_inv.data

    try:
        out = blockwise_scaled_mm(a_q, a_s, b_q, b_s)
        row["err_scaled_mm"] = rel_err(out, ref)
        ms = do_bench(lambda: blockwise_scaled_mm(a_q, a_s, b_q, b_s), warmup=warmup, rep=rep)
        row["scaled_mm"] = tflops(m, n, k, ms)
    except Exception as error:  # not in this torch / not on this GPU / shape unsupported
        row["scaled_mm"] = None
        row["scaled_mm_note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"

    out = fp8_gemm(a_q, a_s, b_q, b_s)  # also runs the autotuner once, outside the timed region
    row["err_ours"] = rel_err(out, ref)
    ms = do_bench(lambda: fp8_gemm(a_q, a_s, b_q, b_s), warmup=warmup, rep=rep)
    row["ours_gemm"] = tflops(m, n, k, ms)

    with torch.no_grad():
        row["err_linear"] = rel_err(layer(a), ref)
        set_check_finite(False)
        try:
            ms = do_bench(lambda: layer(a), warmup=warmup, rep=rep)
        finally:
            set_check_finite("auto")
        row["ours_linear"] = tflops(m, n, k, ms)
        set_check_finite("on")  # what training launches do by default: the inf/nan check, one host sync
        try:
            ms = do_bench(lambda: layer(a), warmup=warmup, rep=rep)
        finally:
            set_check_finite("auto")
        row["ours_linear_checked"] = tflops(m, n, k, ms)
    return row


def fmt(value, digits=0):
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| M | N | K | bf16 matmul | scaled_mm 1x128/128x128 | ours GEMM | ours quant+GEMM | ours quant+GEMM, inf/nan check | GEMM / bf16 | GEMM / scaled_mm | "
        "linear / bf16 | rel err bf16 | rel err scaled_mm | rel err ours GEMM | rel err ours linear |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        vs_scaled = r["ours_gemm"] / r["scaled_mm"] if r.get("scaled_mm") else None
        lines.append(
            f"| {r['M']} | {r['N']} | {r['K']} | {fmt(r['bf16'])} | {fmt(r.get('scaled_mm'))} | {fmt(r['ours_gemm'])} | "
            f"{fmt(r['ours_linear'])} | {fmt(r.get('ours_linear_checked'))} | {fmt(r['ours_gemm'] / r['bf16'], 2)}x | {fmt(vs_scaled, 2)}{'x' if vs_scaled else ''} | "
            f"{fmt(r['ours_linear'] / r['bf16'], 2)}x | {fmt(r['err_bf16'], 4)} | {fmt(r.get('err_scaled_mm'), 4)} | "
            f"{fmt(r['err_ours'], 4)} | {fmt(r['err_linear'], 4)} |"
        )
        if r.get("scaled_mm_note"):
            notes.append(f"- scaled_mm at M={r['M']}, N={r['N']}, K={r['K']}: {r['scaled_mm_note']}")
    lines += ["", "Throughput in TFLOP/s (2·M·N·K per product). \"quant+GEMM\" is `FP8Linear.forward` (1x128 activation "
              "quantization + GEMM, weight stored in FP8) without the inf/nan check (inference's default); the next column "
              "has it on (`set_check_finite(\"on\")`, training's default), which costs one device->host synchronization. Relative error against the fp32 product "
              "of the bf16 operands."]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the markdown table to this file")
    parser.add_argument("--warmup", type=positive(int), default=25, help="do_bench warm-up time (ms)")
    parser.add_argument("--rep", type=positive(int), default=100, help="do_bench measuring time (ms)")
    parser.add_argument("--quick", action="store_true", help="only M=128 and 4096 with (N, K) = (2112, 7168)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/fp8_gemm.py needs a CUDA GPU with FP8 tensor cores (sm_89+, Hopper for the targets); "
              "none is visible here, so nothing was measured.", file=sys.stderr)
        return 2
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        print(f"{torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]}) has no FP8 tensor cores; nothing measured.",
              file=sys.stderr)
        return 2
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    header = (
        f"### FP8 GEMM — {torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]})\n\n"
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} · torch {torch.__version__} · CUDA {torch.version.cuda} · "
        f"triton {triton.__version__} · python {platform.python_version()} · "
        f"`python benchmarks/fp8_gemm.py{' ' + ' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    shapes = [(m, n, k) for m in M_VALUES for n, k in SHAPES_NK] + [(8192, 8192, 8192)]
    if args.quick:
        shapes = [(m, 2112, 7168) for m in M_VALUES]
    rows = []
    for m, n, k in shapes:
        rows.append(bench_shape(m, n, k, args.warmup, args.rep))
        r = rows[-1]
        print(f"M={m:5d} N={n:5d} K={k:5d}  bf16 {r['bf16']:7.1f}  scaled_mm {fmt(r.get('scaled_mm')):>7}  "
              f"ours {r['ours_gemm']:7.1f}  ours+quant {r['ours_linear']:7.1f} TFLOP/s  err {r['err_ours']:.4f}", flush=True)
    table = render(rows, header)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
