"""Attention backends: ``mla`` (the paper's) and ``mha`` (ablation baseline)."""

from .mha import MultiHeadAttention
from .mla import MultiHeadLatentAttention

__all__ = ["MultiHeadLatentAttention", "MultiHeadAttention"]
