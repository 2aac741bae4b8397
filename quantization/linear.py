"""FP8 linear layers: the paper's training recipe and the checkpoint's inference format.

* ``FP8TrainingLinear`` — a drop-in ``nn.Linear`` (same parameters, same state dict) whose three GEMMs run
  in FP8 E4M3 with fp32 accumulation (paper Sec. 3.3, Fig. 6; docs/equations.md, FP8):

  ====================  ========================  ==========================  ======================
  GEMM                  A operand (1×128 tiles)   B operand                   output
  ====================  ========================  ==========================  ======================
  Fprop  y  = x Wᵀ      x, per token              W, 128×128 blocks           model dtype
  Dgrad  dx = dy W      dy, per token             Wᵀ, 128×128 blocks          model dtype
  Wgrad  dW = dyᵀ x     dyᵀ, 128 tokens × 1 chan   xᵀ, 128 tokens × 1 chan     weight dtype
  ====================  ========================  ==========================  ======================

  The master weight and its gradient stay in the model dtype; FP8 copies live only inside the autograd
  function (the forward keeps the FP8 ``xᵀ`` for Wgrad instead of the high-precision input, as the paper
  caches activations in FP8), so nothing FP8 reaches the optimizer.

* ``FP8Linear`` — inference with weights kept in the checkpoint format: ``weight`` (float8_e4m3fn
  ``[out, in]``) and ``weight_scale_inv`` (fp32 ``[ceil(out/128), ceil(in/128)]``); activations are
  quantized per 1×128 tile on the fly.

Both run the Triton kernels on CUDA GPUs with FP8 tensor cores (compute capability 8.9+) and otherwise
the PyTorch references of ``formats`` (one warning per process): the numbers are the same FP8 numbers,
only slower.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

from . import formats
from .formats import BLOCK, ceil_div


# ---------------------------------------------------------------------------------------------------
# dispatch: Triton where FP8 tensor cores exist, the references elsewhere
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _triton_fp8_supported(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index) < (8, 9):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_warned_fallback = False

# The GPU path finds inf/nan tiles from the scales, which costs one device->host synchronization per quantized
# tensor: a decode step could then never be one CUDA graph. So the check has a policy (env
# DEEPSEEK_V3_FP8_CHECK_FINITE, or set_check_finite):
#   "auto" (default) — check while autograd records (training: a nan/inf there raises ValueError naming the
#                      tensor) and skip in inference (no_grad / inference_mode) and inside compiled graphs;
#   "on"             — check everywhere except inside compiled graphs (where a host read would break the graph);
#   "off"            — never (training throughput).
# The CPU reference always checks (a host read costs nothing there), except inside compiled graphs.
CHECK_FINITE_POLICIES = ("auto", "on", "off")
_LEGACY_POLICY = {"1": "on", "0": "off", "true": "on", "false": "off"}
_check_finite = os.environ.get("DEEPSEEK_V3_FP8_CHECK_FINITE", "auto").lower()
_check_finite = _LEGACY_POLICY.get(_check_finite, _check_finite)
if _check_finite not in CHECK_FINITE_POLICIES:
    raise ValueError(f"DEEPSEEK_V3_FP8_CHECK_FINITE must be one of {list(CHECK_FINITE_POLICIES)} (or 1/0), got {_check_finite!r}.")


def set_check_finite(policy: str | bool) -> None:
    """Set the non-finite check of the GPU quantization kernels: ``"auto"``, ``"on"`` (``True``) or ``"off"``
    (``False``), process-wide (see the policy above)."""
    global _check_finite
    if isinstance(policy, bool):
        policy = "on" if policy else "off"
    if policy not in CHECK_FINITE_POLICIES:
        raise ValueError(f"set_check_finite: the policy must be one of {list(CHECK_FINITE_POLICIES)} or a bool, got {policy!r}.")
    _check_finite = policy


def check_finite_now() -> bool:
    """Whether a GPU quantization launched now reads its scales on the host to find inf/nan tiles."""
    if _check_finite == "off" or torch.compiler.is_compiling():
        return False
    return _check_finite == "on" or torch.is_grad_enabled()


def use_triton(device: torch.device) -> bool:
    """True on a CUDA GPU with FP8 support and triton installed; otherwise warn once and use the reference."""
    global _warned_fallback
    if device.type == "cuda" and _triton_fp8_supported(device.index if device.index is not None else torch.cuda.current_device()):
        return True
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"FP8 kernels need a CUDA GPU with FP8 support (compute capability 8.9+) and triton; running on "
            f"{device} with the PyTorch reference implementation instead (same FP8 numerics, much slower).",
            stacklevel=3,
        )
    return False


def quantize_act(x: torch.Tensor, power_of_two: bool = False, name: str = "input"):
    """1×128 tiles: ``[M, K] -> (fp8 [M, K], scale [M, ceil(K/128)])``."""
    if use_triton(x.device):
        from .kernels import act_quant_1x128

        return act_quant_1x128(x, power_of_two, name, check_finite=check_finite_now())
    return formats.quantize_act_1x128(x, power_of_two, name)


def quantize_act_transposed(x: torch.Tensor, power_of_two: bool = False, name: str = "input"):
    """128×1 tiles, transposed: ``[M, K] -> (fp8 [K, M], scale [K, ceil(M/128)])``."""
    if use_triton(x.device):
        from .kernels import act_quant_128x1_transposed

        return act_quant_128x1_transposed(x, power_of_two, name, check_finite=check_finite_now())
    return formats.quantize_act_128x1_transposed(x, power_of_two, name)


def quantize_weight(w: torch.Tensor, power_of_two: bool = False, name: str = "weight"):
    """128×128 blocks: ``[N, K] -> (fp8 [N, K], weight_scale_inv [ceil(N/128), ceil(K/128)])``."""
    if use_triton(w.device):
        from .kernels import weight_quant_128x128

        return weight_quant_128x128(w, power_of_two, name, check_finite=check_finite_now())
    return formats.quantize_weight_128x128(w, power_of_two, name)


def fp8_matmul(a, a_scale, b, b_scale, b_scale_rows: int = BLOCK, out_dtype: torch.dtype = torch.bfloat16):
    """``A @ Bᵀ`` of two scaled FP8 operands with fp32 accumulation (see ``formats.fp8_gemm_reference``)."""
    if use_triton(a.device):
        from .kernels import fp8_gemm

        return fp8_gemm(a, a_scale, b, b_scale, b_scale_rows, out_dtype)
    return formats.fp8_gemm_reference(a, a_scale, b, b_scale, b_scale_rows, out_dtype)


def fp8_grouped_matmul(a, a_scale, b, b_scale, m_offsets, out_dtype: torch.dtype = torch.bfloat16):
    """Per-expert ``A_e @ B_eᵀ`` for tokens sorted by expert (see ``formats.fp8_grouped_gemm_reference``)."""
    if use_triton(a.device):
        from .kernels import fp8_grouped_gemm

        return fp8_grouped_gemm(a, a_scale, b, b_scale, m_offsets, out_dtype)
    return formats.fp8_grouped_gemm_reference(a, a_scale, b, b_scale, m_offsets, out_dtype)


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------


class FP8LinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with Fprop, Dgrad and Wgrad in FP8 (see the table in the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, power_of_two: bool = False, out_dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        x2d = x.reshape(-1, in_features)
        x_q, x_s = quantize_act(x2d, power_of_two, "input")
        w_q, w_s = quantize_weight(weight, power_of_two, "weight")
        y = fp8_matmul(x_q, x_s, w_q, w_s, BLOCK, out_dtype or x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        x_t = x_ts = None
        if ctx.needs_input_grad[1]:
            # Wgrad reduces over tokens: keep x in FP8 with 128-token tiles (already transposed) rather than x itself
            x_t, x_ts = quantize_act_transposed(x2d, power_of_two, "input")
        ctx.save_for_backward(w_q, w_s, x_t, x_ts)  # through save_for_backward, so saved-tensor hooks see them
        ctx.power_of_two = power_of_two
        ctx.shapes = (x.shape, x.dtype, weight.dtype, bias is not None)
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out):
        w_q, w_s, x_t, x_ts = ctx.saved_tensors
        x_shape, x_dtype, w_dtype, has_bias = ctx.shapes
        out_features = w_q.shape[0]
        g2d = grad_out.reshape(-1, out_features)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # Dgrad: dy tiled 1×128 along out_features; Wᵀ keeps the 128×128 blocks, scales transposed
            g_q, g_s = quantize_act(g2d, ctx.power_of_two, "grad_output")
            grad_x = fp8_matmul(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), BLOCK, x_dtype).view(x_shape)
        if ctx.needs_input_grad[1]:
            # Wgrad: both operands tiled 128 tokens × 1 channel, laid out [channels, tokens]
            g_t, g_ts = quantize_act_transposed(g2d, ctx.power_of_two, "grad_output")
            grad_w = fp8_matmul(g_t, g_ts, x_t, x_ts, 1, w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g2d.float().sum(0).to(w_dtype)
        return grad_x, grad_w, grad_b, None, None


class FP8TrainingLinear(nn.Linear):
    """``nn.Linear`` whose forward and backward GEMMs run in FP8 (see docs/equations.md, FP8).

    Parameters, their names, dtypes and initialization are ``nn.Linear``'s, so checkpoints, optimizers,
    FSDP and ``save_pretrained`` see an ordinary Linear.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, power_of_two_scales: bool = False):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.power_of_two_scales = power_of_two_scales

    @classmethod
    def from_linear(cls, linear: nn.Linear, power_of_two_scales: bool = False) -> "FP8TrainingLinear":
        """Wrap an existing ``nn.Linear``, sharing (not copying) its parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.power_of_two_scales = power_of_two_scales
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` with the same (shared) parameters."""
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = self.in_features, self.out_features
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input(x, self.in_features, "FP8TrainingLinear")
        if x.numel() == 0:  # no tokens (an idle expert): keep the graph, so the weights get zero gradients
            return nn.functional.linear(x, self.weight, self.bias)
        # under autocast, produce what nn.Linear would (the autocast dtype); the GEMM itself is FP8 either way
        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return FP8LinearFunction.apply(x, self.weight, self.bias, self.power_of_two_scales, out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3, power_of_two_scales={self.power_of_two_scales}"


# ---------------------------------------------------------------------------------------------------
# inference: the checkpoint's FP8 weight format
# ---------------------------------------------------------------------------------------------------


class KeepsStorageDtype(nn.Module):
    """A module whose quantized tensors (the parameters named in ``storage_dtype_names``) keep their dtype when the
    model is cast: ``.to(torch.bfloat16)``, ``.float()`` and ``.half()`` move them to the requested device but never
    turn FP8 bytes or their fp32 scales into another dtype (which would silently corrupt them). Other tensors (a
    bias) are cast as usual. Quantized weights in transformers behave the same way."""

    storage_dtype_names: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {id(p) for name, p in self._parameters.items() if p is not None and name in self.storage_dtype_names}

        def keep_dtype(tensor):
            applied = fn(tensor)
            if id(tensor) in kept and applied.dtype != tensor.dtype:
                return tensor.to(device=applied.device)  # a cast: follow the device only
            return applied

        return super()._apply(keep_dtype, recurse)


def check_dequantize_dtype(dtype, what: str = "`dtype`") -> None:
    """The dtype FP8 weights are dequantized or merged into: a high-precision float ``torch.dtype`` (an FP8 one would
    drop the block scales, an integer one fails inside ``nn.Parameter`` with an error that names nothing)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"{what} must be a floating-point torch.dtype such as torch.bfloat16 or torch.float32, got {dtype!r}.")


def check_frozen_storage(module: nn.Module, layer: str) -> None:
    """FP8 storage gets no gradient (the backward reaches the input only): a stored tensor set to require one, by
    ``requires_grad_(True)`` on the model say, would train silently nothing. Checked in the forward while autograd
    records, a flag read per tensor."""
    if not torch.is_grad_enabled():
        return
    for name in module.storage_dtype_names:
        if getattr(module, name).requires_grad:
            raise ValueError(
                f"{layer}.{name} requires grad, but weights stored in FP8 are frozen: no gradient ever reaches them, "
                "so training would leave them unchanged. Call requires_grad_(False) on the FP8 layers (train adapters "
                "over them with modeling_deepseek_v3.lora), or load the model dequantized to fine-tune the weights."
            )


def check_linear_input(x, in_features: int, layer: str) -> None:
    """``x`` [..., in_features], a tensor of at least one dimension (its dtype is checked where it is quantized)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer} expects a torch.Tensor input [..., {in_features}], got {type(x).__name__}.")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{layer} expects inputs [..., {in_features}], got {tuple(x.shape)}.")


def _frozen_fp8_fprop(x2d, weight, weight_scale_inv, power_of_two: bool, out_dtype: torch.dtype) -> torch.Tensor:
    x_q, x_s = quantize_act(x2d, power_of_two, "input")
    return fp8_matmul(x_q, x_s, weight, weight_scale_inv, BLOCK, out_dtype)


class FrozenFP8LinearFunction(torch.autograd.Function):
    """``y = x Wᵀ`` over a weight stored in FP8 with its block scales, differentiable in ``x`` only.

    Fprop is the inference GEMM; Dgrad is ``FP8LinearFunction``'s (``dy`` in 1×128 tiles times the stored blocks
    transposed), so the backward reads the same FP8 bytes as the forward and never builds a high-precision copy of
    the weight (on the CPU the reference dequantizes one 128-wide slab at a time). There is no Wgrad: the weight
    is frozen.
    """

    @staticmethod
    def forward(ctx, x2d, weight, weight_scale_inv, power_of_two: bool, out_dtype: torch.dtype):
        ctx.save_for_backward(weight, weight_scale_inv)
        ctx.power_of_two, ctx.x_dtype = power_of_two, x2d.dtype
        return _frozen_fp8_fprop(x2d, weight, weight_scale_inv, power_of_two, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, weight_scale_inv = ctx.saved_tensors
        g_q, g_s = quantize_act(grad_out.contiguous(), ctx.power_of_two, "grad_output")
        grad_x = fp8_matmul(g_q, g_s, weight.t().contiguous(), weight_scale_inv.t().contiguous(), BLOCK, ctx.x_dtype)
        return grad_x, None, None, None, None


class FP8Linear(KeepsStorageDtype):
    """Linear layer holding ``weight`` (float8_e4m3fn ``[out, in]``) and ``weight_scale_inv`` (fp32
    ``[ceil(out/128), ceil(in/128)]``) as in the released checkpoint; activations quantized per 1×128 tile.

    The output has the input's dtype. The weight is frozen (fine-tune it with ``FP8TrainingLinear``), but gradients
    reach the input through an FP8 Dgrad (``FrozenFP8LinearFunction``), so LoRA adapters train over it
    (``quantization.lora``). Casting the model leaves ``weight`` and ``weight_scale_inv`` in their dtypes
    (``KeepsStorageDtype``).
    """

    storage_dtype_names = ("weight", "weight_scale_inv")

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 power_of_two_scales: bool = False, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.power_of_two_scales = power_of_two_scales
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=formats.FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.ones(ceil_div(out_features, BLOCK), ceil_div(in_features, BLOCK), dtype=torch.float32, device=device),
            requires_grad=False,
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, power_of_two_scales: bool = False) -> "FP8Linear":
        """Quantize a high-precision ``nn.Linear`` (or ``FP8TrainingLinear``) per 128×128 block."""
        if isinstance(linear, FP8Linear):
            raise TypeError("FP8Linear.from_linear: this layer is already an FP8Linear (its weight is quantized).")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FP8Linear.from_linear quantizes an nn.Linear, got {type(linear).__name__}.")
        weight = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device,
                  power_of_two_scales, linear.bias.dtype if linear.bias is not None else torch.bfloat16)
        if weight.is_meta:  # a model being built on the meta device: the loader fills weight and weight_scale_inv
            return new
        q, s = quantize_weight(weight, power_of_two_scales, "weight")
        new.weight.data.copy_(q)
        new.weight_scale_inv.data.copy_(s)
        if linear.bias is not None:
            new.bias.data.copy_(linear.bias.detach())
        return new

    def dequantize_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``weight * weight_scale_inv`` per 128×128 block."""
        return formats.dequantize_weight_128x128(self.weight, self.weight_scale_inv, dtype)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight."""
        check_dequantize_dtype(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _check_storage(self) -> None:
        """The checkpoint format this layer computes with (shapes and dtypes only: free, also inside compiled graphs).
        Writing another dtype through ``.data``, or a scale grid of another shape, would otherwise fail in the GEMM
        under the names of its operands."""
        grid = (ceil_div(self.out_features, BLOCK), ceil_div(self.in_features, BLOCK))
        if self.weight.dtype != formats.FP8_DTYPE or tuple(self.weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"FP8Linear.weight must be {formats.FP8_DTYPE} [{self.out_features}, {self.in_features}], got "
                f"{self.weight.dtype} {list(self.weight.shape)}: rebuild the layer (FP8Linear.from_linear) instead of "
                "changing its tensors."
            )
        if self.weight_scale_inv.dtype != torch.float32 or tuple(self.weight_scale_inv.shape) != grid:
            raise ValueError(
                f"FP8Linear.weight_scale_inv must be float32 {list(grid)} (one scale per 128×128 block), got "
                f"{self.weight_scale_inv.dtype} {list(self.weight_scale_inv.shape)}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_linear_input(x, self.in_features, "FP8Linear")
        self._check_storage()
        check_frozen_storage(self, "FP8Linear")
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=out_dtype)
        x2d = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:  # something before this layer trains: give it a Dgrad
            y = FrozenFP8LinearFunction.apply(x2d, self.weight, self.weight_scale_inv, self.power_of_two_scales, out_dtype)
        else:
            y = _frozen_fp8_fprop(x2d, self.weight, self.weight_scale_inv, self.power_of_two_scales, out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3 128x128"


# ---------------------------------------------------------------------------------------------------
# routed experts: one grouped GEMM for all experts
# ---------------------------------------------------------------------------------------------------


def fp8_grouped_linear_frozen(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, weight: torch.Tensor,
                              weight_scale_inv: torch.Tensor, power_of_two_scales: bool = False) -> torch.Tensor:
    """``out[rows of e] = x_sorted[rows of e] @ weight[e]ᵀ`` for all experts in one grouped FP8 GEMM, over expert
    weights *stored in FP8* (frozen: inference, or adapters trained over them).

    ``x_sorted [T, K]`` holds the tokens sorted by expert, ``tokens_per_expert [E]`` how many each expert got
    (a device tensor; on the GPU path it is never copied to the host). ``weight [E, N, K]`` fp8 and
    ``weight_scale_inv [E, ceil(N/128), ceil(K/128)]`` one grid per expert. The weights are frozen; when
    ``x_sorted`` requires grad, gradients reach it through a grouped FP8 Dgrad (``FrozenFP8GroupedLinearFunction``).
    Returns ``[T, N]`` in ``x_sorted``'s dtype.
    """
    if weight.dim() != 3 or weight.shape[2] != x_sorted.shape[-1] or weight.dtype != formats.FP8_DTYPE:
        raise ValueError(
            f"`weight` must be {formats.FP8_DTYPE} [experts, N, {x_sorted.shape[-1]}], got {weight.dtype} {tuple(weight.shape)}."
        )
    grid = (weight.shape[0], ceil_div(weight.shape[1], BLOCK), ceil_div(weight.shape[2], BLOCK))
    if tuple(weight_scale_inv.shape) != grid or weight_scale_inv.dtype != torch.float32:
        raise ValueError(
            f"`weight_scale_inv` must be float32 {list(grid)} (one 128×128 grid per expert), got "
            f"{weight_scale_inv.dtype} {list(weight_scale_inv.shape)}."
        )
    m_offsets = _m_offsets(tokens_per_expert, weight.shape[0], x_sorted.device)
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros(0, weight.shape[1])
    if torch.is_grad_enabled() and x_sorted.requires_grad:
        return FrozenFP8GroupedLinearFunction.apply(x_sorted, m_offsets, weight, weight_scale_inv, power_of_two_scales)
    x_q, x_s = quantize_act(x_sorted, power_of_two_scales, "x_sorted")
    return fp8_grouped_matmul(x_q, x_s, weight, weight_scale_inv, m_offsets, x_sorted.dtype)


class FrozenFP8GroupedLinearFunction(torch.autograd.Function):
    """``fp8_grouped_linear_frozen`` differentiable in the tokens: Dgrad is one grouped FP8 GEMM of ``dy`` (1×128 tiles)
    with every expert's stored blocks transposed, as in ``FP8GroupedLinearFunction``; no Wgrad (frozen weights)."""

    @staticmethod
    def forward(ctx, x_sorted, m_offsets, weight, weight_scale_inv, power_of_two: bool):
        ctx.save_for_backward(m_offsets, weight, weight_scale_inv)
        ctx.power_of_two = power_of_two
        x_q, x_s = quantize_act(x_sorted, power_of_two, "x_sorted")
        return fp8_grouped_matmul(x_q, x_s, weight, weight_scale_inv, m_offsets, x_sorted.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        m_offsets, weight, weight_scale_inv = ctx.saved_tensors
        g_q, g_s = quantize_act(grad_out.contiguous(), ctx.power_of_two, "grad_output")
        w_t, w_ts = weight.transpose(1, 2).contiguous(), weight_scale_inv.transpose(1, 2).contiguous()
        return fp8_grouped_matmul(g_q, g_s, w_t, w_ts, m_offsets, grad_out.dtype), None, None, None, None


def _m_offsets(tokens_per_expert: torch.Tensor, num_experts: int, device) -> torch.Tensor:
    if tokens_per_expert.dim() != 1 or tokens_per_expert.numel() != num_experts:
        raise ValueError(
            f"`tokens_per_expert` must have one entry per expert ({num_experts}), got {tuple(tokens_per_expert.shape)}."
        )
    m_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=device)
    m_offsets[1:] = torch.cumsum(tokens_per_expert.to(device=device), 0)
    return m_offsets


def quantize_expert_weights(weight: torch.Tensor, power_of_two: bool):
    """``[E, N, K]`` -> FP8 ``[E, N, K]`` and scales ``[E, ceil(N/128), ceil(K/128)]``; one launch when N % 128 == 0
    (no 128×128 block then straddles two experts), one per expert otherwise."""
    e, n, k = weight.shape
    if n % BLOCK == 0:
        q, s = quantize_weight(weight.reshape(e * n, k), power_of_two, "expert weight")
        return q.view(e, n, k), s.view(e, n // BLOCK, -1)
    q, s = zip(*(quantize_weight(weight[i], power_of_two, "expert weight") for i in range(e)))
    with torch.autocast(weight.device.type, enabled=False):  # autocast's stack refuses float8 tensors
        return torch.stack(q), torch.stack(s)


def grouped_wgrad_kernels(grad_out: torch.Tensor, x: torch.Tensor, m_offsets: torch.Tensor, power_of_two: bool,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """MoE Wgrad on the Triton kernels: ``dW_e = dY_eᵀ X_e`` for all experts, ``[E, N, K]`` in ``out_dtype``.

    Three launches whatever the number of experts (quantize+transpose dY, the same for X, one grouped GEMM); the
    segment offsets stay on the device, nothing here reads a tensor on the host (the optional non-finite check of
    the quantization launchers aside, see ``set_check_finite``).
    """
    from .kernels import act_quant_128x1_transposed_grouped, fp8_grouped_wgrad

    g_t, g_ts = act_quant_128x1_transposed_grouped(grad_out, m_offsets, power_of_two, "grad_output", check_finite_now())
    x_t, x_ts = act_quant_128x1_transposed_grouped(x, m_offsets, power_of_two, "x_sorted", check_finite_now())
    return fp8_grouped_wgrad(g_t, g_ts, x_t, x_ts, m_offsets, out_dtype)


def grouped_wgrad_reference(grad_out: torch.Tensor, x: torch.Tensor, m_offsets: torch.Tensor, power_of_two: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """The same numbers from the PyTorch references (loops over experts on the host; the CPU path)."""
    g_t, g_ts = formats.quantize_act_128x1_transposed_grouped(grad_out, m_offsets, power_of_two, "grad_output")
    x_t, x_ts = formats.quantize_act_128x1_transposed_grouped(x, m_offsets, power_of_two, "x_sorted")
    return formats.fp8_grouped_wgrad_reference(g_t, g_ts, x_t, x_ts, m_offsets, out_dtype)


def grouped_wgrad(grad_out, x, m_offsets, power_of_two: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dW_e = dY_eᵀ X_e`` over each expert's token segment, both operands FP8 with per-segment 128×1 tiles."""
    if use_triton(x.device):
        return grouped_wgrad_kernels(grad_out, x, m_offsets, power_of_two, out_dtype)
    return grouped_wgrad_reference(grad_out, x, m_offsets, power_of_two, out_dtype)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """``out[rows of e] = x[rows of e] @ W_eᵀ`` for tokens sorted by expert, all three GEMMs in FP8.

    Fprop and Dgrad are one grouped GEMM each (all experts in one launch). Wgrad reduces over each expert's own
    tokens, with 128×1 tiles that restart at every expert boundary (``formats`` explains the layout); on the GPU
    it is two grouped quantize+transpose launches and one grouped GEMM for all experts, with the token counts
    kept on the device (``grouped_wgrad_kernels``).
    """

    @staticmethod
    def forward(ctx, x, m_offsets, weight, power_of_two: bool = False):
        x_q, x_s = quantize_act(x, power_of_two, "x_sorted")
        w_q, w_s = quantize_expert_weights(weight, power_of_two)
        ctx.save_for_backward(x, m_offsets, w_q, w_s)
        ctx.power_of_two, ctx.w_dtype = power_of_two, weight.dtype
        return fp8_grouped_matmul(x_q, x_s, w_q, w_s, m_offsets, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, m_offsets, w_q, w_s = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = quantize_act(grad_out, ctx.power_of_two, "grad_output")
            w_t, w_ts = w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()  # W_eᵀ, blocks transposed
            grad_x = fp8_grouped_matmul(g_q, g_s, w_t, w_ts, m_offsets, x.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = grouped_wgrad(grad_out, x, m_offsets, ctx.power_of_two, ctx.w_dtype)
        return grad_x, None, grad_w, None


def fp8_grouped_linear_trainable(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, weight: torch.Tensor,
                                 power_of_two_scales: bool = False) -> torch.Tensor:
    """Differentiable grouped FP8 GEMM for training: ``x_sorted [T, K]`` (tokens sorted by expert),
    ``tokens_per_expert [E]``, high-precision ``weight [E, N, K]`` (e.g. ``torch.stack`` of the experts' master
    weights, so gradients reach each of them) -> ``[T, N]`` in ``x_sorted``'s dtype."""
    if weight.dim() != 3 or weight.shape[2] != x_sorted.shape[-1]:
        raise ValueError(f"`weight` must be [experts, N, {x_sorted.shape[-1]}], got {tuple(weight.shape)}.")
    m_offsets = _m_offsets(tokens_per_expert, weight.shape[0], x_sorted.device)
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros(0, weight.shape[1])
    return FP8GroupedLinearFunction.apply(x_sorted, m_offsets, weight, power_of_two_scales)
