"""Routed-expert executors."""

from .gather import GatherScatterExperts

__all__ = ["GatherScatterExperts"]
