"""Routed-expert executors."""

from .gather import GatherScatterExperts
from .grouped_mm import GroupedMMExperts

__all__ = ["GatherScatterExperts", "GroupedMMExperts"]
