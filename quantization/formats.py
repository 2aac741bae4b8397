"""FP8 E4M3 block formats of DeepSeek-V3 (arXiv 2412.19437, Sec. 3.3; docs/equations.md, FP8), as plain PyTorch.

These functions are the numerical definition of every Triton kernel in ``kernels/``: each kernel is
tested against the function here that carries its name, and the FP8 layers fall back to them where
no FP8-capable GPU exists.

Conventions (the released checkpoint's):

* A *scale* is the dequantization multiplier: ``x ≈ fp8 * scale`` with ``scale = amax / 448`` over
  the tile, optionally rounded *up* to a power of two. The checkpoint calls the weight one
  ``weight_scale_inv`` (its "scale" would be ``448 / amax``); the numbers are the same.
* Activations (and output gradients) are scaled per 1×128 tile: one scale per row per 128 columns,
  ``scale`` of shape ``[M, ceil(K / 128)]``.
* The weight-gradient GEMM reduces over tokens, so there the activations and gradients are scaled per
  128×1 tile (128 tokens of one channel). We store that tiling transposed, ``[K, M]`` with scales
  ``[K, ceil(M / 128)]``, which is exactly the 1×128 tiling of ``x.T``: the GEMM then reads both of its
  operands along their contiguous dimension.
* Weights are scaled per 128×128 block, ``weight_scale_inv`` of shape ``[ceil(N/128), ceil(K/128)]``.
* Tiles and blocks that overhang the tensor are padded with zeros to compute their scale (the padding
  never raises the amax, so the scale comes from the real elements alone).
* A tile of zeros gets a finite positive scale (``amax`` is floored at ``AMAX_FLOOR``) and quantizes
  to zeros; a tile holding inf or nan raises ``ValueError`` naming the tensor.
* Rounding to E4M3 is round-to-nearest-even after clamping to ±448, as ``Tensor.to`` does.
"""

from __future__ import annotations

import torch


FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
BLOCK = 128  # tile / block side of the paper's recipe
AMAX_FLOOR = 1e-12  # keeps the scale of an all-zero tile positive, so 0 / scale = 0 and never nan

_HIGH_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# argument checks shared with the kernels' wrappers
# ---------------------------------------------------------------------------------------------------


def check_high_precision(x: torch.Tensor, name: str, ndim: int = 2) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}.")
    if x.dtype not in _HIGH_PRECISION:
        raise TypeError(f"`{name}` must be float32, bfloat16 or float16 to be quantized, got {x.dtype}.")
    if x.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(x.shape)}.")
    if x.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); there is nothing to quantize.")


def check_fp8(q: torch.Tensor, scale: torch.Tensor, name: str, scale_shape: tuple[int, ...]) -> None:
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"`{name}` must be {FP8_DTYPE}, got {q.dtype}.")
    if scale.dtype != torch.float32:
        raise TypeError(f"the scale of `{name}` must be float32, got {scale.dtype}.")
    if tuple(scale.shape) != tuple(scale_shape):
        raise ValueError(
            f"the scale of `{name}` (shape {tuple(q.shape)}) must have shape {tuple(scale_shape)}, "
            f"got {tuple(scale.shape)}."
        )


def check_scales_finite(scale: torch.Tensor, name: str) -> None:
    """A tile with inf/nan has an infinite amax (nan is counted as inf), hence a non-finite scale."""
    if torch.compiler.is_compiling():
        # the check reads the device on the host: inside a compiled graph it would break the graph (a compiled
        # FP8 step with `fullgraph=True` fails), so compiled graphs skip it, as the GPU kernels' policy does
        return
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        raise ValueError(
            f"`{name}` contains non-finite values (inf or nan) in {int(bad.sum())} of its {scale.numel()} FP8 "
            f"tiles; no FP8 scale exists for them. Check the values upstream (loss scale, learning rate, data)."
        )


# ---------------------------------------------------------------------------------------------------
# scales
# ---------------------------------------------------------------------------------------------------


def round_scale_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """Round positive normal fp32 scales *up* to a power of two by carrying the mantissa into the exponent.

    Done on the bits (not with log2/exp2) so that the kernels reproduce it exactly.
    """
    bits = scale.contiguous().view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


def scale_from_amax(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """``amax / 448`` (fp32), ``amax`` floored at ``AMAX_FLOOR``; inf stays inf so bad tiles are caught."""
    scale = torch.clamp(amax.float(), min=AMAX_FLOOR) / FP8_MAX
    return round_scale_to_power_of_two(scale) if power_of_two else scale


def _tile_amax(tiles: torch.Tensor, dims) -> torch.Tensor:
    # nan counts as inf so that a single nan makes the scale non-finite (amax alone may skip nan on GPU).
    mag = tiles.float().abs().masked_fill(torch.isnan(tiles), float("inf"))
    return mag.amax(dim=dims)


def _to_fp8(x_over_scale: torch.Tensor) -> torch.Tensor:
    return x_over_scale.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# ---------------------------------------------------------------------------------------------------
# activations: 1×128 tiles (and 128×1, stored transposed)
# ---------------------------------------------------------------------------------------------------


def quantize_act_1x128(
    x: torch.Tensor, power_of_two: bool = False, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(fp8 [M, K], scale fp32 [M, ceil(K/128)])``: one scale per row per 128 columns."""
    check_high_precision(x, name)
    m, k = x.shape
    kb = ceil_div(k, BLOCK)
    padded = torch.nn.functional.pad(x.float(), (0, kb * BLOCK - k)).view(m, kb, BLOCK)
    scale = scale_from_amax(_tile_amax(padded, -1), power_of_two)
    check_scales_finite(scale, name)
    q = _to_fp8(padded / scale[..., None]).view(m, kb * BLOCK)[:, :k].contiguous()
    return q, scale


def quantize_act_128x1_transposed(
    x: torch.Tensor, power_of_two: bool = False, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(fp8 [K, M], scale [K, ceil(M/128)])``: 128 tokens × 1 channel tiles, transposed.

    The operand layout of the weight-gradient GEMM (``dW = dY^T X`` reduces over the M tokens).
    """
    check_high_precision(x, name)
    return quantize_act_1x128(x.t().contiguous(), power_of_two, name)


def dequantize_act_1x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    m, k = q.shape
    check_fp8(q, scale, "q", (m, ceil_div(k, BLOCK)))
    return (q.float() * scale.repeat_interleave(BLOCK, dim=1)[:, :k]).to(dtype)


# ---------------------------------------------------------------------------------------------------
# weights: 128×128 blocks, the checkpoint format
# ---------------------------------------------------------------------------------------------------


def quantize_weight_128x128(
    w: torch.Tensor, power_of_two: bool = False, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(weight fp8 [N, K], weight_scale_inv fp32 [ceil(N/128), ceil(K/128)])``."""
    check_high_precision(w, name)
    n, k = w.shape
    nb, kb = ceil_div(n, BLOCK), ceil_div(k, BLOCK)
    padded = torch.nn.functional.pad(w.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n))
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    scale = scale_from_amax(_tile_amax(blocks, (1, 3)), power_of_two)
    check_scales_finite(scale, name)
    q = _to_fp8(blocks / scale[:, None, :, None]).view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous()
    return q, scale


def expand_weight_scale(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-element view of a 128×128 block scale, cropped to ``shape``."""
    n, k = shape
    return scale.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:n, :k]


def dequantize_weight_128x128(
    weight: torch.Tensor, weight_scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``fp8_block * weight_scale_inv``, the checkpoint's definition."""
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D, got shape {tuple(weight.shape)}.")
    n, k = weight.shape
    check_fp8(weight, weight_scale_inv, "weight", (ceil_div(n, BLOCK), ceil_div(k, BLOCK)))
    return (weight.float() * expand_weight_scale(weight_scale_inv, (n, k))).to(dtype)


# ---------------------------------------------------------------------------------------------------
# block-scaled GEMM
# ---------------------------------------------------------------------------------------------------


def check_gemm_operands(a, a_scale, b, b_scale, b_scale_rows: int) -> None:
    """``a [M, K]`` with 1×128 scales; ``b [N, K]`` with scales per ``b_scale_rows`` rows × 128 columns."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"FP8 GEMM operands must be 2-D, got a {tuple(a.shape)} and b {tuple(b.shape)}.")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"FP8 GEMM: a is {tuple(a.shape)} and b is {tuple(b.shape)}; both must be [*, K].")
    if b_scale_rows not in (1, BLOCK):
        raise ValueError(f"b_scale_rows must be 1 (1×128 tiles) or {BLOCK} (128×128 blocks), got {b_scale_rows}.")
    (m, k), n = a.shape, b.shape[0]
    check_fp8(a, a_scale, "a", (m, ceil_div(k, BLOCK)))
    check_fp8(b, b_scale, "b", (ceil_div(n, b_scale_rows), ceil_div(k, BLOCK)))


def fp8_gemm_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_scale_rows: int = BLOCK,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``C = A @ B^T`` with ``A ≈ a * a_scale`` (1×128) and ``B ≈ b * b_scale``, fp32 accumulation.

    As in the kernel (and the paper's "promotion to CUDA cores" every 128 elements of K): each 128-wide
    K block is multiplied exactly in fp32, scaled by ``a_scale[m, kb] * b_scale[n, kb]`` and added to
    the fp32 accumulator; the output is rounded to ``out_dtype`` once at the end.
    """
    check_gemm_operands(a, a_scale, b, b_scale, b_scale_rows)
    (m, k), n = a.shape, b.shape[0]
    b_scale_rows_full = b_scale.repeat_interleave(b_scale_rows, dim=0)[:n]  # [N, KB]
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):  # the fp32 products must stay fp32 under autocast
        for kb in range(ceil_div(k, BLOCK)):
            cols = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
            partial = a[:, cols].float() @ b[:, cols].float().t()
            acc += partial * a_scale[:, kb, None] * b_scale_rows_full[None, :, kb]
    return acc.to(out_dtype)


def check_group_offsets(m_offsets: torch.Tensor, num_groups: int, m: int) -> None:
    if m_offsets.dim() != 1 or m_offsets.numel() != num_groups + 1:
        raise ValueError(f"`m_offsets` must have num_experts + 1 = {num_groups + 1} entries, got {tuple(m_offsets.shape)}.")
    if m_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"`m_offsets` must be int32 or int64, got {m_offsets.dtype}.")


def fp8_grouped_gemm_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    m_offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """MoE GEMM: rows ``m_offsets[e]:m_offsets[e+1]`` of ``a`` (tokens sorted by expert) times expert ``e``'s
    weight ``b[e] [N, K]`` (128×128 block scales ``b_scale[e]``), fp32 accumulation per K block."""
    if b.dim() != 3:
        raise ValueError(f"grouped FP8 GEMM: `b` must be [experts, N, K], got {tuple(b.shape)}.")
    num_experts, n, k = b.shape
    check_group_offsets(m_offsets, num_experts, a.shape[0])
    out = torch.zeros(a.shape[0], n, dtype=out_dtype, device=a.device)
    offsets = m_offsets.tolist()
    if offsets[0] != 0 or offsets[-1] != a.shape[0] or any(x > y for x, y in zip(offsets, offsets[1:])):
        raise ValueError(
            f"`m_offsets` must rise from 0 to the number of rows {a.shape[0]}, got {offsets}: it is the running sum of the "
            "tokens per expert, so every count must be ≥ 0 and all of them must add up to the rows given."
        )
    for e in range(num_experts):
        rows = slice(offsets[e], offsets[e + 1])
        if offsets[e + 1] > offsets[e]:
            out[rows] = fp8_gemm_reference(a[rows], a_scale[rows], b[e], b_scale[e], BLOCK, out_dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# MoE weight gradient: 128×1 tiles per expert segment, one GEMM per expert
# ---------------------------------------------------------------------------------------------------
#
# Tokens are sorted by expert; expert e owns rows ``m_offsets[e]:m_offsets[e+1]``. Its weight gradient
# ``dW_e = dY_eᵀ X_e`` reduces over its own tokens only, so the 128-token tiles restart at every segment
# start (as if each segment were zero-padded to a multiple of 128): a tile never mixes two experts, and
# expert e's numbers are exactly those of an ``FP8TrainingLinear`` fed expert e's tokens alone.
#
# Layout (shared by the references and the Triton kernels): the operands are stored transposed, ``[C, T]``
# with every token in its own column (segments stay where they are); the scales are ``[C, tiles]`` where
# expert e's j-th tile is column ``tile_offsets[e] + j``, ``tile_offsets`` the exclusive cumulative sum of
# ``ceil(m_e / 128)``. ``tiles = (T + 127·E) // 128`` bounds that sum for every split of T tokens among E
# experts (a sum of floors is at most the floor of the sum), so the shape is known without reading the
# counts on the host; columns past the last real tile hold 1.0. With one expert this is exactly
# ``quantize_act_128x1_transposed``.


def grouped_token_tiles(num_tokens: int, num_groups: int) -> int:
    """Columns of the per-segment 128×1 scale tensor: an upper bound of ``sum_e ceil(m_e / 128)``."""
    return (num_tokens + (BLOCK - 1) * num_groups) // BLOCK


def group_tile_offsets(m_offsets: torch.Tensor) -> torch.Tensor:
    """``[E+1]`` int32: first scale column of each expert's segment (device ops only, no host read)."""
    counts = (m_offsets[1:] - m_offsets[:-1]).to(torch.int32)
    tile_offsets = torch.zeros(m_offsets.numel(), dtype=torch.int32, device=m_offsets.device)
    tile_offsets[1:] = torch.cumsum(torch.div(counts + (BLOCK - 1), BLOCK, rounding_mode="floor"), 0)
    return tile_offsets


def _host_offsets(m_offsets: torch.Tensor, num_rows: int) -> list[int]:
    offsets = m_offsets.tolist()  # the references loop on the host; the kernels never read the offsets there
    if offsets[0] != 0 or offsets[-1] != num_rows or any(x > y for x, y in zip(offsets, offsets[1:])):
        raise ValueError(
            f"`m_offsets` must rise from 0 to the number of rows {num_rows}, got {offsets}: it is the running sum of the "
            "tokens per expert, so every count must be ≥ 0 and all of them must add up to the rows given."
        )
    return offsets


def quantize_act_128x1_transposed_grouped(
    x: torch.Tensor, m_offsets: torch.Tensor, power_of_two: bool = False, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, C]`` (tokens sorted by expert) -> ``(fp8 [C, T], scale [C, grouped_token_tiles(T, E)])``.

    Each expert segment is quantized on its own with 128×1 tiles starting at the segment's first token
    (see the layout note above); unused scale columns are 1.0.
    """
    check_high_precision(x, name)
    num_experts = m_offsets.numel() - 1
    check_group_offsets(m_offsets, num_experts, x.shape[0])
    t, c = x.shape
    offsets = _host_offsets(m_offsets, t)
    q = torch.zeros(c, t, dtype=FP8_DTYPE, device=x.device)
    scale = torch.ones(c, grouped_token_tiles(t, num_experts), dtype=torch.float32, device=x.device)
    tile = 0
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            q_e, s_e = quantize_act_128x1_transposed(x[start:end], power_of_two, name)
            q[:, start:end] = q_e
            scale[:, tile:tile + s_e.shape[1]] = s_e
            tile += s_e.shape[1]
    return q, scale


def check_grouped_wgrad_operands(a_t, a_scale, b_t, b_scale, m_offsets) -> None:
    """``a_t [N, T]`` and ``b_t [K, T]`` with per-segment 128×1 scales ``[N | K, grouped_token_tiles(T, E)]``."""
    if a_t.dim() != 2 or b_t.dim() != 2 or a_t.shape[1] != b_t.shape[1]:
        raise ValueError(
            f"grouped Wgrad operands must be [N, T] and [K, T] (tokens along dim 1), got {tuple(a_t.shape)} and {tuple(b_t.shape)}."
        )
    num_experts = m_offsets.numel() - 1
    check_group_offsets(m_offsets, num_experts, a_t.shape[1])
    tiles = grouped_token_tiles(a_t.shape[1], num_experts)
    check_fp8(a_t, a_scale, "a_t", (a_t.shape[0], tiles))
    check_fp8(b_t, b_scale, "b_t", (b_t.shape[0], tiles))


def fp8_grouped_wgrad_reference(
    a_t: torch.Tensor,
    a_scale: torch.Tensor,
    b_t: torch.Tensor,
    b_scale: torch.Tensor,
    m_offsets: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out[e] = A_e B_eᵀ`` over expert e's token columns, ``[E, N, K]`` in ``out_dtype``.

    ``a_t``/``b_t`` as built by ``quantize_act_128x1_transposed_grouped`` (the MoE Wgrad: ``a_t = dYᵀ``,
    ``b_t = Xᵀ``). Per expert it is ``fp8_gemm_reference`` with 1×128 scales on both sides: each 128-token
    block multiplied exactly in fp32, scaled by both per-channel scales, accumulated in fp32; experts without
    tokens get zeros.
    """
    check_grouped_wgrad_operands(a_t, a_scale, b_t, b_scale, m_offsets)
    num_experts = m_offsets.numel() - 1
    offsets = _host_offsets(m_offsets, a_t.shape[1])
    out = torch.zeros(num_experts, a_t.shape[0], b_t.shape[0], dtype=out_dtype, device=a_t.device)
    tile = 0
    for e in range(num_experts):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            tiles = slice(tile, tile + ceil_div(end - start, BLOCK))
            out[e] = fp8_gemm_reference(a_t[:, start:end], a_scale[:, tiles], b_t[:, start:end], b_scale[:, tiles], 1, out_dtype)
            tile = tiles.stop
    return out
