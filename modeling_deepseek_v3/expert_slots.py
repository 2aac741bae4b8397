"""The (token, choice) slots of a routing decision, sorted by expert.

Every experts implementation starts the same way: flatten the ``[N, K]`` choices, sort them by expert, gather the
tokens in that order, and at the end weight each slot's output by its gate value and add it back to its token.
This module does that once (after checking the routing tensors line up with the tokens), with static shapes and without reading anything on the host (the counts stay on the
device), so it works inside a CUDA graph and a ``fullgraph=True`` compile. It imports only torch.
"""

from __future__ import annotations

import torch


def check_routed_inputs(hidden_states, top_k_index, top_k_weights, hidden_dim: int) -> None:
    """``hidden_states`` [N, H], ``top_k_index`` [N, K] integer and ``top_k_weights`` [N, K]: shapes and dtypes only
    (free, inside compiled graphs too). Mismatched rows would otherwise be combined into a result of the wrong
    tokens, or fail deep in an index op. Expert ids outside [0, E) are left alone: expert parallelism uses them."""
    if hidden_states.dim() != 2 or hidden_states.shape[1] != hidden_dim:
        raise ValueError(f"Routed experts take `hidden_states` [tokens, {hidden_dim}], got {tuple(hidden_states.shape)}.")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(f"`top_k_index` must hold integer expert ids, got dtype {top_k_index.dtype}.")
    rows = hidden_states.shape[0]
    if top_k_index.dim() != 2 or top_k_index.shape[0] != rows or tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(
            f"`top_k_index` and `top_k_weights` must both be [tokens={rows}, top_k], got {tuple(top_k_index.shape)} and "
            f"{tuple(top_k_weights.shape)}."
        )


class SortedSlots:
    """``order`` [N·K]: slot indices sorted by expert (stable); ``token_of_slot`` [N·K]: the token each sorted slot
    came from; ``tokens_per_expert`` [E] and ``offsets`` [E] (int32 inclusive cumulative sum, the ``offs`` of
    ``torch._grouped_mm``), all on the device.

    Expert ids outside ``[0, num_experts)`` (expert-parallel sentinels) sort last and are counted for no expert.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int):
        self.top_k = top_k_index.shape[-1]
        flat_expert = top_k_index.reshape(-1)
        self.order = flat_expert.argsort(stable=True)
        self.token_of_slot = self.order // self.top_k
        # scatter_add sizes its output from `num_experts`, not from the data (bincount reads the max on the host)
        valid = (flat_expert >= 0) & (flat_expert < num_experts)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_expert.device)
        self.tokens_per_expert = counts.scatter_add_(0, flat_expert.clamp(0, num_experts - 1), valid.long())
        self.offsets = self.tokens_per_expert.cumsum(0).to(torch.int32)

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N·K, H], one row per slot, grouped by expert."""
        return hidden_states[self.token_of_slot]

    def combine(self, expert_out: torch.Tensor, top_k_weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weight the sorted slot outputs [N·K, H] by their gate values and sum them back per token -> ``like``'s
        shape and dtype. The router's weights are fp32: the product is taken before casting back, as the reference
        implementation does."""
        weighted = expert_out * top_k_weights.reshape(-1)[self.order, None]
        return torch.zeros_like(like).index_add_(0, self.token_of_slot, weighted.to(like.dtype))
