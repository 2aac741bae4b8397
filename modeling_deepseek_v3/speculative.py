"""MTP self-speculative decoding (docs/equations.md, MTP): the model's first MTP module drafts, the main model verifies.

``model.generate(input_ids, use_mtp=True)`` runs transformers' own assisted-generation loop (greedy verification,
speculative sampling with ``do_sample=True``, logits processors, stopping criteria, streamers, KV-cache cropping of
rejected drafts); :class:`MTPDraftCandidateGenerator` is the draft source it asks for candidates. transformers
ships an MTP candidate generator of its own, but it rebuilds the MTP layers as a separate ``MtpModel`` from
config fields this architecture does not have, and feeds them the hidden state *before* the final norm; ours
uses the modules already in ``model.layers[num_hidden_layers + k]`` and the hidden state after ``model.norm``,
the convention the released weights are served with (and that our training objective uses).

Each round: the main model has just run on some positions ``i`` (the prompt at first, then the last accepted
token plus the draft), of which the first ``n_matches + 1`` hold accepted tokens only. For each such position the
MTP module takes ``(h_i, embedding of t_{i+1})``, all of them known and final, so its KV cache only ever grows
with verified positions and never needs cropping; its output at the last position predicts the token after the
one the main model just produced: the draft. Greedy output is therefore the plain greedy output token for token
(the verifier decides every token); acceptance only changes how many main-model forwards it takes.

Limits: transformers' assisted loop decodes one sequence at a time (batch 1) and needs a dynamic cache; one draft
token per round (module 1 of D; deeper modules would draft from drafted tokens and need cache rollback).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.candidate_generator import CandidateGenerator

from .layers import causal_mask_for_last_queries


@dataclass
class MTPDraftStats:
    """Counts of the last ``generate(..., use_mtp=True)``: drafts proposed, drafts the main model accepted, and
    main-model forwards run (prefill included)."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    # (position the draft is for, drafted token [1] tensor): kept as tensors so recording costs no host sync
    drafts: list = field(default_factory=list, repr=False)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class MTPDraftCandidateGenerator(CandidateGenerator):
    """Candidate source for transformers' assisted decoding that drafts one token with MTP module 1."""

    # The assisted loop then hands us the main model's outputs and forwards these extra kwargs to it.
    requires_model_outputs = True
    model_kwargs_overrides = {"output_hidden_states": True}  # hidden_states[-1] is the output of model.norm

    def __init__(self, model, generation_config, logits_processor=None, model_kwargs=None):
        if model.config.num_nextn_predict_layers < 1:
            raise ValueError("`use_mtp=True` needs MTP modules: this model has `num_nextn_predict_layers=0`.")
        self.model = model
        self.module = model.model.mtp_layers[0]
        self.cache = DynamicCache()  # grows lazily up to the module's layer index num_hidden_layers
        self.fed = 0  # positions 0..fed-1 have gone through the MTP module
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.stats = MTPDraftStats()
        model.mtp_draft_stats = self.stats

    @torch.no_grad()
    def get_candidates(self, input_ids, model_kwargs=None, model_outputs=None, is_first_iteration=False, n_last_matches=0, **kwargs):
        if input_ids.shape[0] != 1:
            raise ValueError("MTP speculative decoding runs one sequence at a time (transformers' assisted loop).")
        if is_first_iteration or model_outputs is None:
            return input_ids, None  # the main model prefills first; drafting needs its hidden states
        length = input_ids.shape[1]
        new = length - 1 - self.fed  # positions fed..length-2 now have final main hidden states and next tokens
        hidden = model_outputs.hidden_states[-1][:, :new]
        positions = torch.arange(self.fed, length - 1, device=input_ids.device)[None]
        if model_kwargs is not None and model_kwargs.get("position_ids") is not None:
            positions = model_kwargs["position_ids"][:, self.fed : length - 1]  # left padding shifts positions
        embeds = self.model.model.embed_tokens(input_ids[:, self.fed + 1 : length])
        padding = None if model_kwargs is None else model_kwargs.get("attention_mask")
        mask = _causal_mask(new, length - 1, padding[:, : length - 1] if padding is not None else None, hidden.dtype, hidden.device)
        _, normed, _ = self.module(
            hidden,
            embeds,
            self.model.model.rotary_emb(hidden, positions),
            mask,
            past_key_values=self.cache,
            position_ids=positions,
            return_normed=True,
        )
        self.fed = length - 1
        logits = self.model.lm_head(normed[:, -1]).float()  # [1, vocab]
        if self.logits_processor is not None and len(self.logits_processor):
            logits = self.logits_processor(input_ids, logits)
        if self.do_sample:
            draft = torch.multinomial(logits.softmax(dim=-1), num_samples=1)
        else:
            draft = logits.argmax(dim=-1, keepdim=True)
        self.stats.drafted += 1
        self.stats.drafts.append((length, draft[0]))
        return torch.cat([input_ids, draft.to(input_ids.dtype)], dim=-1), logits[:, None]

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        self.stats.verify_steps += 1
        self.stats.accepted += int(num_matches)


def _causal_mask(query_len: int, key_len: int, padding: torch.Tensor | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive [B, 1, T, S] mask for the last ``query_len`` of ``key_len`` positions (0 = attend, min = blocked).

    Built here because transformers' mask helpers read the sequence length from cache layer 0, while the MTP
    module's cache holds only its own layer."""
    allowed = causal_mask_for_last_queries(query_len, key_len, device)
    if padding is not None:
        allowed = allowed & padding.to(device).bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


__all__ = ["MTPDraftCandidateGenerator", "MTPDraftStats"]
