"""Cross-entropy over a large vocabulary without fp32 copies of the logits.

The plain path, ``F.cross_entropy(logits.float(), ...)``, materialises an fp32 copy of the ``[N, V]`` logits,
saves the fp32 log-softmax ``[N, V]`` for backward and produces an fp32 ``[N, V]`` gradient before casting it to
the logits' dtype: for 4×2048 tokens and a 32k vocabulary that is three 1 GB buffers next to 0.5 GB of bf16
logits. Here the rows are processed in chunks: forward keeps only the per-row log-sum-exp (fp32 ``[N]``) and a
reference to the logits themselves (alive anyway: the model returns them); backward recomputes
``softmax − onehot`` chunk by chunk straight into a gradient of the logits' dtype. The fp32 temporaries are
``chunk_rows × V``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ROWS = 1024


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy over the rows whose target is not ``ignore_index``, computed in fp32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, chunk_rows: int):
        n = logits.shape[0]
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            chunk = logits[rows].float()  # the only fp32 copy: chunk_rows × V
            lse[rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(1, safe_targets[rows, None]).squeeze(1)
            # select, not multiply: an ignored row's logits may hold inf (inf - inf = nan, and nan * 0 stays nan)
            total += torch.where(valid[rows], lse[rows] - picked, 0.0).sum()
        ctx.save_for_backward(logits, safe_targets, valid, lse)
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        logits, safe_targets, valid, lse = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, logits.shape[0]))
            # d(lse − z_t)/dz = softmax(z) − onehot(t), zero for ignored rows, times the upstream scalar
            probs = torch.exp(logits[rows].float() - lse[rows, None])
            probs.scatter_add_(1, safe_targets[rows, None], probs.new_full((probs.shape[0], 1), -1.0))
            probs = torch.where(valid[rows, None], probs, 0.0) * grad_total.to(probs.dtype)
            grad[rows] = probs.to(grad.dtype)
        return grad, None, None, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Summed fp32 cross-entropy of ``logits [N, V]`` (any float dtype) against ``targets [N]``, rows with
    ``ignore_index`` left out; equal to ``cross_entropy_reference`` without its ``[N, V]`` fp32 buffers."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"chunked_cross_entropy: expected logits [N, V] and targets [N], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}.")
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}.")
    return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, chunk_rows)
