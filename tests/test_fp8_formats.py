"""The PyTorch references of the FP8 formats (``quantization/formats.py``): the oracle of every kernel."""

import pytest
import torch

from modeling_deepseek_v3.quantization import formats as F


FP8 = torch.float8_e4m3fn


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def seeded_randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# --------------------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("shape", [(200, 300), (3, 128), (64, 1), (130, 257)])
def test_act_1x128_scale_is_tile_amax_over_448(shape):
    x = seeded_randn(*shape) * torch.logspace(-3, 3, shape[0])[:, None]  # rows of very different magnitudes
    q, s = F.quantize_act_1x128(x)
    m, k = shape
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (m, -(-k // 128)) and s.dtype == torch.float32
    for kb in range(s.shape[1]):
        tile = x[:, kb * 128 : (kb + 1) * 128]  # the overhanging last tile holds only the real columns
        torch.testing.assert_close(s[:, kb], tile.abs().amax(1) / 448, rtol=0, atol=0)
        # the largest element of each tile lands exactly on the largest E4M3 value
        assert torch.equal(q[:, kb * 128 : (kb + 1) * 128].float().abs().amax(1), torch.full((m,), 448.0))


def test_act_1x128_dequantized_error_is_e4m3_rounding():
    x = seeded_randn(96, 384, seed=1)
    q, s = F.quantize_act_1x128(x)
    deq = F.dequantize_act_1x128(q, s)
    err = (deq - x).abs()
    scale = s.repeat_interleave(128, 1)
    # normal E4M3: 3 mantissa bits -> relative half-ulp 2^-4; subnormals: absolute half-step 2^-10 * scale
    assert torch.all(err <= torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6))
    assert 0.015 < rel_err(deq, x) < 0.04
    # round to nearest: the fp8 value is the nearest of its E4M3 neighbours (torch's cast is the ground truth)
    assert torch.equal(q.view(torch.uint8), (x / scale).to(FP8).view(torch.uint8))


def test_act_128x1_is_the_1x128_tiling_of_the_transpose():
    x = seeded_randn(300, 200, seed=2, dtype=torch.bfloat16)
    q_t, s_t = F.quantize_act_128x1_transposed(x)
    assert q_t.shape == (200, 300) and s_t.shape == (200, 3)
    q, s = F.quantize_act_1x128(x.t().contiguous())
    assert torch.equal(q_t.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s_t, s)
    # the scale of channel c, token block b is the amax over those 128 tokens of channel c
    torch.testing.assert_close(s_t[:, 2], x[256:].float().abs().amax(0) / 448, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (129, 1), (1, 130)])
def test_weight_checkpoint_format_round_trip(shape):
    n, k = shape
    w = seeded_randn(n, k, seed=3) * 0.02
    weight, weight_scale_inv = F.quantize_weight_128x128(w)
    assert weight.dtype == FP8 and weight.shape == (n, k)
    assert weight_scale_inv.dtype == torch.float32 and weight_scale_inv.shape == (-(-n // 128), -(-k // 128))
    # edge blocks are zero padded: their scale is the amax of their real elements only
    for i in range(weight_scale_inv.shape[0]):
        for j in range(weight_scale_inv.shape[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert weight_scale_inv[i, j] == block.abs().max() / 448
    # dequantized = fp8 * weight_scale_inv, per block
    deq = F.dequantize_weight_128x128(weight, weight_scale_inv)
    manual = weight.float() * weight_scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    assert torch.equal(deq, manual)
    if w.numel() > 1000:
        assert rel_err(deq, w) < 0.04
    # the format is a fixed point: quantizing the dequantized weight gives back the same bytes and scales
    weight2, scale2 = F.quantize_weight_128x128(deq)
    assert torch.equal(weight2.view(torch.uint8), weight.view(torch.uint8)) and torch.equal(scale2, weight_scale_inv)


def test_weight_dequantize_checks_the_scale_shape():
    weight, scale = F.quantize_weight_128x128(seeded_randn(300, 200))
    with pytest.raises(ValueError, match=r"must have shape \(3, 2\)"):
        F.dequantize_weight_128x128(weight, scale[:2])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        F.dequantize_weight_128x128(weight.float(), scale)


# --------------------------------------------------------------------------------------------------- bad input


def test_zero_tiles_give_zeros_not_nan():
    x = seeded_randn(130, 300, seed=4)
    x[:, 128:256] = 0  # a whole column of zero tiles
    x[129] = 0  # a zero row: zero tiles in every column block
    for q, s in (F.quantize_act_1x128(x), F.quantize_weight_128x128(x)):
        assert torch.isfinite(s).all() and (s > 0).all()
        assert torch.isfinite(q.float()).all()
    q, s = F.quantize_act_1x128(x)
    assert torch.equal(F.dequantize_act_1x128(q, s)[:, 128:256], torch.zeros(130, 128))
    assert torch.equal(F.dequantize_act_1x128(q, s)[129], torch.zeros(300))
    q, s = F.quantize_weight_128x128(torch.zeros(5, 7))
    assert torch.equal(F.dequantize_weight_128x128(q, s), torch.zeros(5, 7))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(
    "fn", [F.quantize_act_1x128, F.quantize_act_128x1_transposed, F.quantize_weight_128x128], ids=["1x128", "128x1", "128x128"]
)
def test_non_finite_input_raises_naming_the_tensor(fn, bad):
    x = seeded_randn(130, 260, seed=5, dtype=torch.bfloat16)
    x[77, 201] = bad
    with pytest.raises(ValueError, match=r"`my_tensor` contains non-finite values \(inf or nan\) in 1 of"):
        fn(x, name="my_tensor")


def test_wrong_dtype_or_shape_raises():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        F.quantize_act_1x128(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        F.quantize_weight_128x128(torch.ones(4, 4).to(FP8))
    with pytest.raises(ValueError, match="must be 2-D"):
        F.quantize_act_1x128(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="empty"):
        F.quantize_weight_128x128(torch.ones(0, 4))


# --------------------------------------------------------------------------------------------------- power-of-two scales


def test_power_of_two_scales_round_up():
    x = seeded_randn(64, 384, seed=6) * torch.logspace(-6, 4, 64)[:, None]
    q, s = F.quantize_act_1x128(x, power_of_two=True)
    exact = x.view(64, 3, 128).abs().amax(-1) / 448
    mantissa, _ = torch.frexp(s)
    assert torch.all(mantissa == 0.5)  # a power of two
    assert torch.all(s >= exact) and torch.all(s < 2 * exact)  # the smallest one not below amax / 448
    assert q.float().abs().max() <= 448
    w, ws = F.quantize_weight_128x128(x, power_of_two=True)
    assert torch.all(torch.frexp(ws)[0] == 0.5)
    assert rel_err(F.dequantize_weight_128x128(w, ws), x) < 0.06


def test_round_scale_to_power_of_two_bits():
    s = torch.tensor([1.0, 1.5, 0.75, 2.0**-30, 3.0 * 2.0**-20, 448.0])
    assert torch.equal(F.round_scale_to_power_of_two(s), torch.tensor([1.0, 2.0, 1.0, 2.0**-30, 2.0**-18, 512.0]))


# --------------------------------------------------------------------------------------------------- GEMM


@pytest.mark.parametrize("m,n,k", [(200, 260, 300), (128, 256, 384), (1, 70, 129)])
def test_gemm_reference_against_fp32(m, n, k):
    a, b = seeded_randn(m, k, seed=7), seeded_randn(n, k, seed=8)
    a_q, a_s = F.quantize_act_1x128(a)
    b_q, b_s = F.quantize_weight_128x128(b)
    out = F.fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
    ref = a @ b.t()
    if m * n > 1000:
        assert 0.02 < rel_err(out, ref) < 0.06  # E4M3 with these tilings: ~0.037
    # and it is exactly the product of the dequantized operands (scales applied per K block), up to fp32 sums
    deq = F.dequantize_act_1x128(a_q, a_s) @ F.dequantize_weight_128x128(b_q, b_s).t()
    assert rel_err(out, deq) < 1e-6


def test_gemm_reference_with_per_row_b_scales_and_bf16_out():
    # the weight-gradient shape: both operands 1×128 tiled along the reduction (token) dimension
    a, b = seeded_randn(150, 300, seed=9), seeded_randn(90, 300, seed=10)
    a_q, a_s = F.quantize_act_1x128(a)
    b_q, b_s = F.quantize_act_1x128(b)
    out = F.fp8_gemm_reference(a_q, a_s, b_q, b_s, b_scale_rows=1)
    assert out.dtype == torch.bfloat16
    assert 0.02 < rel_err(out, a @ b.t()) < 0.06
    deq = F.dequantize_act_1x128(a_q, a_s) @ F.dequantize_act_1x128(b_q, b_s).t()
    torch.testing.assert_close(out.float(), deq, rtol=1e-2, atol=1e-2)


def test_gemm_reference_rejects_mismatched_operands():
    a_q, a_s = F.quantize_act_1x128(seeded_randn(4, 256))
    b_q, b_s = F.quantize_weight_128x128(seeded_randn(8, 128))
    with pytest.raises(ValueError, match=r"\[\*, K\]"):
        F.fp8_gemm_reference(a_q, a_s, b_q, b_s)
    b_q, b_s = F.quantize_weight_128x128(seeded_randn(8, 256))
    with pytest.raises(ValueError, match="scale of `b`"):
        F.fp8_gemm_reference(a_q, a_s, b_q, b_s, b_scale_rows=1)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        F.fp8_gemm_reference(a_q.float(), a_s, b_q, b_s)


def test_grouped_gemm_reference_is_a_gemm_per_expert():
    counts = [40, 0, 90, 20]  # an expert without tokens included
    offsets = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist())
    a = seeded_randn(150, 300, seed=11)
    b = seeded_randn(4, 200, 300, seed=12)
    a_q, a_s = F.quantize_act_1x128(a)
    b_q, b_s = zip(*(F.quantize_weight_128x128(b[e]) for e in range(4)))
    b_q, b_s = torch.stack(b_q), torch.stack(b_s)
    out = F.fp8_grouped_gemm_reference(a_q, a_s, b_q, b_s, offsets, out_dtype=torch.float32)
    for e in range(4):
        rows = slice(offsets[e], offsets[e + 1])
        torch.testing.assert_close(out[rows], F.fp8_gemm_reference(a_q[rows], a_s[rows], b_q[e], b_s[e], out_dtype=torch.float32))
        if counts[e]:
            assert rel_err(out[rows], a[rows] @ b[e].t()) < 0.06
    with pytest.raises(ValueError, match="rise from 0"):
        F.fp8_grouped_gemm_reference(a_q, a_s, b_q, b_s, torch.tensor([0, 40, 30, 130, 150]))
    with pytest.raises(ValueError, match="num_experts \\+ 1"):
        F.fp8_grouped_gemm_reference(a_q, a_s, b_q, b_s, torch.tensor([0, 150]))
