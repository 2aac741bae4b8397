"""Multi-token prediction modules."""

from .sequential import SequentialMTPModule

__all__ = ["SequentialMTPModule"]
