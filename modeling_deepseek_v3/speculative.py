"""MTP self-speculative decoding (docs/equations.md, MTP): the model's first MTP module drafts, the main model verifies.

``model.generate(input_ids, use_mtp=True)`` runs transformers' own assisted-generation loop (greedy verification,
speculative sampling with ``do_sample=True``, logits processors, stopping criteria, streamers, KV-cache cropping of
rejected drafts); :class:`MTPDraftCandidateGenerator` is the draft source it asks for candidates. transformers
ships an MTP candidate generator of its own, but it rebuilds the MTP layers as a separate ``MtpModel`` from
config fields this architecture does not have, and feeds them the hidden state *before* the final norm; ours
uses the modules already in ``model.layers[num_hidden_layers + k]`` and the hidden state after ``model.norm``,
the convention the released weights are served with (and that our training objective uses).

Each round of that loop: the main model has just run on some positions ``i`` (the prompt at first, then the last accepted
token plus the draft), of which the first ``n_matches + 1`` hold accepted tokens only. For each such position the
MTP module takes ``(h_i, embedding of t_{i+1})``, all of them known and final, so its KV cache only ever grows
with verified positions and never needs cropping; its output at the last position predicts the token after the
one the main model just produced: the draft. Greedy output is therefore the plain greedy output token for token
(the verifier decides every token); acceptance only changes how many main-model forwards it takes.

Over a static cache (``cache_implementation="static"``, or a ``StaticCache`` passed in) :func:`mtp_static_decoding`
runs instead, from the model's ``_assisted_decoding``. The point of a static cache is a decoding step of fixed
shapes that compiles to one graph (one CUDA graph), so every round has the same shapes: a verification step of
2 query positions (the last accepted token and its draft) over the whole static cache, then an MTP step of the
same 2 positions over the MTP module's own static cache. A rejected draft is forgotten by lowering the layers'
lengths on the device; its slot is overwritten by the next write there, and until then the causal mask (built
from those lengths) keeps it out of every query, in both caches. For the MTP step the two positions are fed
whether or not the draft was accepted (the second then holds a stale hidden state, and is forgotten the same way);
the draft is read from the last accepted one. Neither forward reads the host; each round reads it once, to learn
whether the draft was accepted (so how far ``input_ids`` grows), whether to stop and which tokens to stream. The
main forward is compiled by transformers' own path for static caches (``compile_config``, the same criteria as
its decoding loop), and the rounds' MTP step under the same ``compile_config``; the prefill and a last
single-token step (where the cache, sized by ``generate`` to ``max_length - 1``, has no slot left for a draft) run
eagerly.

Why a loop of its own rather than transformers' assisted loop over a cache that can crop static layers: that loop
refuses static caches by name and by type, so it would have to be handed a disguised cache; it never takes the
compile path (only transformers' plain decoding loop does); and it reads the host several times per round (to
slice the accepted tokens, to find an EOS among them, for the stop flag, for the streamer), plus once more in the
mask builder, which asks whether the static cache is empty. The loop here is what a fixed-shape round needs and
no more; everything around it is transformers': ``generate``'s argument handling, cache creation and logits
processors, the stopping criteria (both possible sequence lengths are evaluated before the one read), the
streamer, the causal-mask builder, ``get_compiled_call``, and the output class.

The MTP module is a decoder layer, so once the prefill (``output_hidden_states=True``) has installed transformers'
output-capturing hooks it runs them too; they read a context variable that ``torch.compile`` cannot trace outside
transformers' own compiled forward. The MTP step therefore runs with output capturing off
(``compat.without_output_capture``), and compiles as one graph.

Limits: batch 1 (both loops; over a static cache a larger batch is an error naming it); not under PEFT's prompt
learning (``check_no_prompt_learning``); one draft token per round (module 1 of D; deeper modules would draft from
drafted tokens); over a static cache, an empty cache at the start,
``input_ids`` rather than ``inputs_embeds``, no ``synced_gpus``, and ``return_dict_in_generate`` gives ``scores``
and ``logits`` but not attentions or hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import CompileConfig
from transformers.cache_utils import Cache, DynamicCache, StaticLayer
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_causal_mask

from . import compat, input_checks
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


def check_single_draft_source(generation_config, assistant_model=None) -> None:
    """``use_mtp=True`` drafts with the model's own MTP module; another draft source asked for at the same time would
    otherwise be ignored without a word."""
    others = [name for name, value in (
        ("assistant_model", assistant_model),
        ("prompt_lookup_num_tokens", getattr(generation_config, "prompt_lookup_num_tokens", None)),
        ("assistant_early_exit", getattr(generation_config, "assistant_early_exit", None)),
    ) if value is not None]
    if others:
        raise ValueError(
            f"`use_mtp=True` drafts with the model's own MTP module; drop {', '.join(f'`{n}`' for n in others)} (another "
            "draft source), or `use_mtp`."
        )


def check_no_prompt_learning(model) -> None:
    """PEFT's prompt learning (prompt tuning, p-tuning, ...) generates through its own ``prepare_inputs_for_generation``,
    set on the model for the call, which puts its virtual tokens in front of the prompt and, once they are in the
    cache, keeps only the last token of a step's input: a verification step (the last accepted token and the draft)
    would lose one, and the draft would read the main model's hidden states shifted by the virtual tokens, so the
    output silently differed from plain greedy decoding (and the static loop failed on mismatched shapes)."""
    owner = getattr(model.prepare_inputs_for_generation, "__self__", model)
    peft_config = getattr(owner, "active_peft_config", None)
    if owner is not model and getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(
            f"`use_mtp=True` does not run under PEFT's prompt learning "
            f"({getattr(peft_config.peft_type, 'value', peft_config.peft_type)}): its virtual tokens "
            "shift the positions the MTP draft reads, and its generation inputs keep one token of each verification "
            "step. Generate without `use_mtp`."
        )


class MTPDraftCandidateGenerator(CandidateGenerator):
    """Candidate source for transformers' assisted decoding that drafts one token with MTP module 1."""

    # The assisted loop then hands us the main model's outputs and forwards these extra kwargs to it.
    requires_model_outputs = True
    model_kwargs_overrides = {"output_hidden_states": True}  # hidden_states[-1] is the output of model.norm

    def __init__(self, model, generation_config, logits_processor=None, model_kwargs=None):
        if model.config.num_nextn_predict_layers < 1:
            raise ValueError("`use_mtp=True` needs MTP modules: this model has `num_nextn_predict_layers=0`.")
        if model_kwargs is not None and model_kwargs.get("inputs_embeds") is not None:
            raise ValueError("MTP speculative decoding needs `input_ids`, not `inputs_embeds`: each draft embeds the prompt's tokens.")
        check_no_prompt_learning(model)
        self.model = model
        self.module = model.model.mtp_layers[0]
        self.cache = DynamicCache()  # grows lazily up to the module's layer index num_hidden_layers
        self.fed = 0  # positions start..fed-1 have gone through the MTP module
        self.start = None  # the first of them, set from the main model's first step
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
        if self.start is None:
            # a cache passed to generate may hold a prefix of the prompt, which the main model's first step skipped:
            # there are hidden states for the rest only, and the MTP module (its own cache empty) drafts from those
            self.start = self.fed = length - 1 - model_outputs.hidden_states[-1].shape[1]
        new = length - 1 - self.fed  # positions fed..length-2 now have final main hidden states and next tokens
        hidden = model_outputs.hidden_states[-1][:, :new]
        positions = torch.arange(self.fed, length - 1, device=input_ids.device)[None]
        if model_kwargs is not None and model_kwargs.get("position_ids") is not None:
            positions = model_kwargs["position_ids"][:, self.fed : length - 1]  # left padding shifts positions
        embeds = self.model.model.embed_tokens(input_ids[:, self.fed + 1 : length])
        padding = None if model_kwargs is None else model_kwargs.get("attention_mask")
        padding = padding[:, self.start : length - 1] if padding is not None else None
        mask = _causal_mask(new, length - 1 - self.start, padding, hidden.dtype, hidden.device)
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


def is_static_cache(cache) -> bool:
    """Whether ``cache`` is made of preallocated static layers (what ``cache_implementation="static"`` builds)."""
    layers = getattr(cache, "layers", None)
    return isinstance(cache, Cache) and bool(layers) and all(isinstance(layer, StaticLayer) for layer in layers)


def _roll_back(cache: Cache, count) -> None:
    """Forget the last ``count`` positions (an int or a device tensor: no host read) of every allocated static layer.

    Their slots keep the rejected entries until the next write at that position overwrites them; until then the
    causal mask, built from the layer's length, keeps them out of every query."""
    for layer in cache.layers:
        if layer.is_initialized:
            compat.static_layer_length(layer).sub_(count.to(layer.device) if torch.is_tensor(count) else count)


def _static_causal_mask(config, cache: Cache, layer_idx: int | None, positions: torch.Tensor, padding, dtype) -> torch.Tensor:
    """transformers' causal mask [1, 1, T, max_cache_len] for the queries at ``positions`` over ``cache``'s layer
    ``layer_idx`` (None: the main model's), always materialised: skipping it (SDPA's ``is_causal``) is decided by
    reading the cache length on the host, and the mask's shape stays the same every round."""
    return create_causal_mask(
        config=config,
        inputs_embeds=torch.empty((1, positions.shape[1], 0), dtype=dtype, device=positions.device),
        attention_mask=padding,
        past_key_values=cache,
        position_ids=positions,
        layer_idx=layer_idx,
        allow_is_causal_skip=False,
    )


def _draft_logits(model, hidden, next_tokens, positions, mask, cache) -> torch.Tensor:
    """MTP module 1 on main hidden states ``hidden`` [1, T, H] (after ``model.norm``) and the tokens after them
    [1, T], writing to ``cache``: fp32 logits [1, T, vocab], position t predicting the token two after it."""
    embeds = model.model.embed_tokens(next_tokens)
    _, normed, _ = model.model.mtp_layers[0](
        hidden, embeds, model.model.rotary_emb(hidden, positions), mask,
        past_key_values=cache, position_ids=positions, return_normed=True,
    )
    return model.lm_head(normed).float()


def _draft_step(model, hidden, next_tokens, positions, mask, cache) -> torch.Tensor:
    """:func:`_draft_logits` with output capturing off: a round's MTP step records nothing, and this way it compiles
    as one graph even after the prefill (``output_hidden_states=True``) installed transformers' capturing hooks."""
    return compat.without_output_capture(_draft_logits, model, hidden, next_tokens, positions, mask, cache)


# One compiled draft step per compile configuration, reused by every generate call (a fresh torch.compile wrapper
# per call would recompile each time, up to torch's recompile limit); transformers keeps its compiled forward on the
# model (`get_compiled_call`) for the same reason.
_COMPILED_DRAFT_STEPS: dict[str, object] = {}


def _compiled_draft_step(compile_config):
    options = compile_config.to_dict()
    key = repr(sorted(options.items()))
    if key not in _COMPILED_DRAFT_STEPS:
        _COMPILED_DRAFT_STEPS[key] = torch.compile(_draft_step, **options)
    return _COMPILED_DRAFT_STEPS[key]


def _pick(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """[1, vocab] processed scores -> [1] token (sampled or argmax)."""
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)[:, 0]
    return scores.argmax(dim=-1)


def _speculative_sample(scores: torch.Tensor, draft: torch.Tensor, draft_probs: torch.Tensor):
    """Speculative sampling of one drafted token, at fixed shapes and without host reads: keep the draft ``d`` with
    probability ``min(1, p(d) / q(d))``, otherwise sample from ``max(0, p - q)`` renormalised. ``scores`` [1, vocab]
    are the main model's processed scores, ``draft_probs`` [1, vocab] = q. Returns (accepted [1] bool, token [1])."""
    p = scores.softmax(dim=-1)
    ratio = p.gather(-1, draft[:, None]) / draft_probs.gather(-1, draft[:, None])
    accepted = (torch.rand_like(ratio) <= ratio)[:, 0]
    residual = (p - draft_probs).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    # all zero only where p == q, which accepts every draft: sample from p then (the value is never used)
    residual = torch.where(total > 0, residual / total.clamp(min=torch.finfo(total.dtype).tiny), p)
    return accepted, torch.where(accepted, draft, torch.multinomial(residual, num_samples=1)[:, 0])


@torch.no_grad()
def mtp_static_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                        streamer=None, **model_kwargs):
    """``generate(..., use_mtp=True)`` over a static cache (see the module docstring): prefill, then rounds of one
    two-token verification step and one two-position MTP step, each at fixed shapes."""
    config = model.config
    batch_size = input_ids.shape[0]
    if batch_size != 1:
        raise ValueError(
            f"MTP speculative decoding over a static cache decodes one sequence at a time (batch size 1), got batch "
            f"size {batch_size}: generate the sequences one by one, or without `use_mtp`."
        )
    if config.num_nextn_predict_layers < 1:
        raise ValueError("`use_mtp=True` needs MTP modules: this model has `num_nextn_predict_layers=0`.")
    check_no_prompt_learning(model)
    if synced_gpus:
        # generate sets it by itself for a model sharded by transformers' engine (FSDP), whose forwards are collectives
        raise ValueError(
            "MTP speculative decoding over a static cache does not support `synced_gpus=True`, which generate sets for "
            "a model sharded over several processes: on a sharded model, use_mtp=True needs a dynamic cache (leave "
            "cache_implementation unset), or decode without use_mtp."
        )
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError("MTP speculative decoding over a static cache needs `input_ids` (the drafts embed tokens).")
    return_dict = generation_config.return_dict_in_generate
    if return_dict and (generation_config.output_attentions or generation_config.output_hidden_states):
        raise ValueError(
            "MTP speculative decoding over a static cache returns `scores` and `logits` only, not attentions or "
            "hidden states: drop `output_attentions`/`output_hidden_states`."
        )
    cache = model_kwargs["past_key_values"]
    if int(cache.get_seq_length()) != 0:  # one host read before decoding starts
        raise ValueError("MTP speculative decoding over a static cache starts from an empty cache (the MTP module "
                         "needs the main model's hidden states of every position).")
    capacity = cache.get_max_length()
    input_checks.check_static_cache_room(capacity, generation_config.max_length)

    device, do_sample, dtype = model.device, bool(generation_config.do_sample), model.dtype
    input_device, input_ids = input_ids.device, input_ids.to(model.device)
    prompt_len, mtp_layer = input_ids.shape[1], config.num_hidden_layers
    padding = model_kwargs.get("attention_mask")  # generate drops a mask of all ones: one that is left marks padding
    if padding is not None:
        # a fixed-size key mask (the cache's length) keeps the mask builder at the same shapes every round
        padding = torch.cat([padding.to(device).bool(), torch.ones(1, capacity - prompt_len, dtype=torch.bool, device=device)], -1)
    prompt_positions = model_kwargs.get("position_ids")
    if prompt_positions is None:
        prompt_positions = torch.arange(prompt_len, device=device)[None]
    prompt_positions = prompt_positions.to(device)
    shift = prompt_positions[:, -1:] - (prompt_len - 1)  # after the prompt, cache slot j holds position j + shift

    # transformers' compile path for static caches (`compile_config`), as its own decoding loop decides it
    compile_forward = compat.auto_compile_applies(model, model_kwargs, generation_config)
    forward = model.get_compiled_call(generation_config.compile_config) if compile_forward else model.__call__
    # the rounds' MTP step, compiled under the same configuration (same 2-position shapes every round)
    draft_step = _compiled_draft_step(generation_config.compile_config or CompileConfig()) if compile_forward else _draft_step
    # The MTP module's own static cache, as long as the main one; only its layer (num_hidden_layers) is allocated.
    module_cache = Cache(layers=[StaticLayer(max_cache_len=capacity) for _ in range(mtp_layer + 1)])

    stats = MTPDraftStats()
    model.mtp_draft_stats = stats
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None

    def record(processed, raw):
        nonlocal scores, raw_logits
        if scores is not None:
            scores += (processed,)
        if raw_logits is not None:
            raw_logits += (raw,)

    def with_scores(*extra):
        return None if scores is None else scores + extra

    def draft_from(logits, sequence):
        processed = logits_processor(sequence, logits)
        draft = _pick(processed, do_sample)
        stats.drafted += 1
        stats.drafts.append((sequence.shape[1], draft))
        return draft, processed.softmax(dim=-1) if do_sample else None

    def take_one(out, input_ids):
        """The next token from a plain (non-verifying) forward's last logits: ``(input_ids + token, stop)``."""
        stats.verify_steps += 1
        raw = out.logits[:, -1].float()
        processed = logits_processor(input_ids, raw)
        token = _pick(processed, do_sample)
        longer = torch.cat([input_ids, token[:, None]], dim=-1)
        stop = stopping_criteria(longer, with_scores(processed))
        stop, token_value = torch.stack([stop[0].long(), token[0]]).tolist()  # this step's one host read
        record(processed, raw)
        if streamer is not None:
            streamer.put(torch.tensor([[token_value]]))
        return longer, stop

    # Prefill: the main model on the prompt, then the MTP module on every prompt position.
    inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    inputs["output_hidden_states"] = True  # hidden_states[-1] is the output of model.norm
    out = model(**inputs, return_dict=True)
    input_ids, stop = take_one(out, input_ids)
    draft = draft_probs = None
    if not stop and input_ids.shape[1] < capacity:  # (else the one step left has no slot for a draft)
        mask = _static_causal_mask(config, module_cache, mtp_layer, prompt_positions, padding, dtype)
        logits = _draft_logits(model, out.hidden_states[-1], input_ids[:, 1:], prompt_positions, mask, module_cache)
        draft, draft_probs = draft_from(logits[:, -1], input_ids)

    model.model._verifying_drafts = True  # the tokens fed from here on are the model's own: no input-check read
    try:
        while not stop:
            length = input_ids.shape[1]
            slot = length - 1  # the last token's cache slot: it has not been through the main model yet
            if slot + 1 >= capacity:
                # No slot left for a draft (the last token of max_length): one plain decoding step, not compiled
                # (a graph of its own for one step per call would not pay).
                positions = torch.full((1, 1), slot, device=device) + shift
                mask = _static_causal_mask(config, cache, None, positions, padding, dtype)
                out = model(input_ids=input_ids[:, -1:], position_ids=positions, attention_mask=mask,
                              past_key_values=cache, use_cache=True, return_dict=True)
                input_ids, stop = take_one(out, input_ids)
                if not stop:
                    raise RuntimeError(f"The static cache ({capacity} positions) is full before generation stopped.")
                break

            # Verification: the last token and its draft, 2 query positions over the static cache, every round.
            positions = torch.arange(slot, slot + 2, device=device)[None] + shift
            mask = _static_causal_mask(config, cache, None, positions, padding, dtype)
            out = forward(input_ids=torch.stack([input_ids[:, -1], draft], dim=-1), position_ids=positions,
                          attention_mask=mask, past_key_values=cache, use_cache=True, output_hidden_states=True,
                          return_dict=True)
            stats.verify_steps += 1
            # a copy: a compiled forward's outputs (CUDA graphs) are overwritten by its next call
            raw = out.logits.to(copy=True, dtype=torch.float32)  # [1, 2, vocab]
            first = logits_processor(input_ids, raw[:, 0])
            second = logits_processor(torch.cat([input_ids, draft[:, None]], dim=-1), raw[:, 1])  # used if accepted
            if do_sample:
                accepted, token = _speculative_sample(first, draft, draft_probs)
            else:
                token = first.argmax(dim=-1)
                accepted = token == draft
            new = torch.stack([token, _pick(second, do_sample)], dim=-1)  # [1, 2]: the second only if accepted
            longer = torch.cat([input_ids, new], dim=-1)
            stop_first = stopping_criteria(longer[:, :-1], with_scores(first))
            stop_second = stopping_criteria(longer, with_scores(first, second))
            _roll_back(cache, 1 - accepted.long()[0])  # a rejected draft's entry is forgotten (on the device)
            # The round's one host read, unavoidable: whether the draft was accepted (how many tokens input_ids
            # grows by, where the next round starts), whether generation stops, and the tokens for the streamer.
            accepted, stop_first, stop_second, *tokens = torch.cat(
                [accepted.long(), stop_first.long(), stop_second.long(), new[0]]
            ).tolist()
            taken = 2 if accepted and not stop_first else 1
            if accepted and stop_first:
                _roll_back(cache, 1)  # accepted, but generation stops at the first token
            stats.accepted += taken - 1
            record(first, raw[:, 0])
            if taken == 2:
                record(second, raw[:, 1])
            input_ids = longer[:, : length + taken]
            if streamer is not None:
                streamer.put(torch.tensor([tokens[:taken]]))
            stop = stop_first or (taken == 2 and stop_second)
            if stop or input_ids.shape[1] >= capacity:
                continue  # finished, or the next step has no slot for a draft
            # MTP step: positions slot and slot+1 with their main hidden states and the tokens after them; the
            # draft comes from the last accepted position, the other one (if rejected) is forgotten.
            mask = _static_causal_mask(config, module_cache, mtp_layer, positions, padding, dtype)
            logits = draft_step(model, out.hidden_states[-1], new, positions, mask, module_cache)
            _roll_back(module_cache, 2 - taken)
            draft, draft_probs = draft_from(logits[:, taken - 1], input_ids)
    finally:
        model.model._verifying_drafts = False

    if streamer is not None:
        streamer.end()
    input_ids = input_ids.to(input_device)
    if return_dict:
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, past_key_values=cache)
    return input_ids


__all__ = ["MTPDraftCandidateGenerator", "MTPDraftStats", "check_single_draft_source", "is_static_cache", "mtp_static_decoding"]
