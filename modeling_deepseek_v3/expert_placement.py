"""Where the routed experts live under expert parallelism, and how many ranks a token's choices reach.

transformers' expert-parallel plan splits the stacked experts along dimension 0, so EP rank r holds the contiguous
block ``[r·E/ep, (r+1)·E/ep)``. The aux-loss-free router's groups are contiguous blocks too (group g holds
``[g·E/G, (g+1)·E/G)``), and group-limited routing keeps each token inside ``topk_group`` of them. When the group
and rank blocks line up — ``ep`` a multiple of ``G`` (each group spread over ``ep/G`` ranks of its own) or ``G`` a
multiple of ``ep`` (whole groups per rank) — a token's experts lie on at most ``topk_group · max(1, ep/G)`` ranks:
with one group per node, the paper's bound on the nodes a token is sent to. When they do not line up, groups
straddle rank boundaries and the bound loosens (``max_destination_ranks`` computes it either way).

This module only describes the placement; it moves nothing. It imports only torch.
"""

from __future__ import annotations

import torch


def experts_per_rank(n_routed_experts: int, ep_size: int) -> int:
    if n_routed_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide n_routed_experts={n_routed_experts}: EP ranks hold equal expert blocks.")
    return n_routed_experts // ep_size


def rank_of_expert(expert_ids: torch.Tensor, n_routed_experts: int, ep_size: int) -> torch.Tensor:
    """The EP rank holding each (global) expert id."""
    return expert_ids // experts_per_rank(n_routed_experts, ep_size)


def ranks_of_group(group: int, n_routed_experts: int, n_group: int, ep_size: int) -> range:
    """The EP ranks that hold experts of routing group ``group``."""
    size, per_rank = n_routed_experts // n_group, experts_per_rank(n_routed_experts, ep_size)
    first, last = group * size, (group + 1) * size - 1
    return range(first // per_rank, last // per_rank + 1)


def groups_align_with_ranks(n_group: int, ep_size: int) -> bool:
    """Whether no routing group straddles an EP rank boundary into a rank shared with another group."""
    return ep_size % n_group == 0 or n_group % ep_size == 0


def max_destination_ranks(config, ep_size: int) -> int:
    """The most EP ranks one token's ``num_experts_per_tok`` experts can lie on, given group-limited routing.

    At most ``topk_group`` groups are open to a token, so its experts lie on the ranks of those groups: the bound is
    the largest number of ranks any ``topk_group`` groups together touch, and never more than the number of experts
    chosen or of ranks.
    """
    grouped = config.plugin("topk_method").group_limited  # the router's class (RouterPlugin.group_limited)
    n_group = config.n_group if grouped else 1
    topk_group = config.topk_group if grouped else 1
    touched = sorted(
        (len(ranks_of_group(g, config.n_routed_experts, n_group, ep_size)) for g in range(n_group)), reverse=True
    )
    return min(sum(touched[:topk_group]), config.num_experts_per_tok, ep_size)


def destination_ranks(top_k_index: torch.Tensor, n_routed_experts: int, ep_size: int) -> torch.Tensor:
    """[N] the number of distinct EP ranks each token's experts ([N, K] global ids) lie on."""
    ranks = rank_of_expert(top_k_index, n_routed_experts, ep_size)
    hit = torch.zeros(top_k_index.shape[0], ep_size, dtype=torch.bool, device=top_k_index.device)
    return hit.scatter_(1, ranks, True).sum(dim=1)


def fan_out_histogram(top_k_index: torch.Tensor, n_routed_experts: int, ep_size: int) -> list[int]:
    """``hist[d]`` = how many tokens reach exactly ``d`` EP ranks (d = 0 … ep_size)."""
    counts = destination_ranks(top_k_index, n_routed_experts, ep_size)
    return torch.bincount(counts, minlength=ep_size + 1).tolist()


__all__ = [
    "experts_per_rank",
    "rank_of_expert",
    "ranks_of_group",
    "groups_align_with_ranks",
    "max_destination_ranks",
    "destination_ranks",
    "fan_out_histogram",
]
