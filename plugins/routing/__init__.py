"""Routers: ``noaux_tc`` (aux-loss-free, the paper's) and ``greedy`` (softmax + auxiliary loss)."""

from .greedy import GreedyRouter
from .noaux_tc import NoAuxTCRouter
from .topk_router import TopKRouter

__all__ = ["TopKRouter", "NoAuxTCRouter", "GreedyRouter"]
