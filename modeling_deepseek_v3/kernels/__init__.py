"""Fused kernels for the training step: RMSNorm and SwiGLU in Triton, a chunked cross-entropy in PyTorch.

Each has a plain PyTorch reference with the model's numerics (``rms_norm_reference``, ``swiglu_reference``,
``cross_entropy_reference``); the fused versions are tested against them on the CPU (Triton through
``TRITON_INTERPRET=1``).

Which path runs is the config field ``fused_kernels`` (default ``"auto"``):

* ``"auto"``: fused on CUDA tensors when Triton is installed, plain PyTorch everywhere else;
* ``"on"``: fused wherever it can run — the chunked cross-entropy everywhere, the Triton kernels on
  CUDA or on the CPU under ``TRITON_INTERPRET=1`` (otherwise a ``ValueError`` says why);
* ``"off"``: plain PyTorch everywhere.

Triton is imported only when a Triton kernel is first used, so importing the package never needs it (and the
interpreter flag can still be set by a test before that happens).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .cross_entropy import chunked_cross_entropy, cross_entropy_reference


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_runs_on(x: torch.Tensor) -> bool:
    if not _triton_installed():
        return False
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def use_fused(mode, x: torch.Tensor, needs_triton: bool = True) -> bool:
    """Whether the fused kernel runs for tensor ``x`` under ``fused_kernels=mode`` (see the module doc)."""
    if mode == "off":
        return False
    if mode == "auto":
        return x.is_cuda and (not needs_triton or _triton_installed())
    if mode != "on":  # the config checks the field when it is made; this is a value set on it afterwards
        raise ValueError(f"Config field `fused_kernels` must be 'auto', 'on' or 'off', got {mode!r}.")
    if needs_triton and not _triton_runs_on(x):
        raise ValueError(
            f"fused_kernels='on' needs Triton on a CUDA device (or TRITON_INTERPRET=1 on the CPU); got a tensor on "
            f"{x.device} (triton installed: {_triton_installed()}). Use fused_kernels='auto' to fall back to PyTorch."
        )
    return True


# ---------------------------------------------------------------------------------------------------
# references (the model's plain PyTorch numerics)
# ---------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``DeepseekV3RMSNorm``: normalise in fp32, cast back to the input dtype, then scale."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in the input dtype (what ``DeepseekV3MLP`` computes between its projections)."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------
# fused entry points
# ---------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm (forward and backward), same numerics as ``rms_norm_reference``."""
    from .rmsnorm_triton import rms_norm as _rms_norm

    return _rms_norm(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) * up`` (forward and backward); ``gate``/``up`` may be column slices of one tensor."""
    from .swiglu_triton import swiglu as _swiglu

    return _swiglu(gate, up)


__all__ = [
    "use_fused",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
    "chunked_cross_entropy",
    "cross_entropy_reference",
]
