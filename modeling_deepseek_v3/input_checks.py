"""Checks of the model's inputs where they enter ``forward`` and ``generate``: types, shapes and dtypes only, so
they cost no device read and trace under ``torch.compile`` (the value checks that need one read run together in
``DeepseekV3Model._check_inputs``; a tensor of ``logits_to_keep`` positions, which only a caller passes, is read
here). Each error names the argument and what it must be."""

from __future__ import annotations

import difflib
import math
import numbers

import torch
from transformers.cache_utils import (
    BaseQuantizedLayer, Cache, DynamicLayer, EncoderDecoderCache, StaticLayer, StaticSlidingWindowLayer,
)
from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
from transformers.utils.generic import TransformersKwargs


def check_inputs_embeds(inputs_embeds: torch.Tensor, hidden_size: int, model_dtype: torch.dtype | None) -> None:
    """``inputs_embeds`` [batch, seq_len, hidden_size] of a float dtype the model computes in: one it promotes to its
    own (a bf16 input to an fp32 model) runs, a wider one (fp32 into bf16, float64) would fail in the first matmul."""
    if not inputs_embeds.dtype.is_floating_point:
        raise ValueError(f"`inputs_embeds` must be floating-point embeddings, got dtype {inputs_embeds.dtype} (token ids go in `input_ids`).")
    if inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(
            f"`inputs_embeds` must have shape [batch, seq_len, hidden_size={hidden_size}], got {list(inputs_embeds.shape)}."
        )
    autocast = torch.is_autocast_enabled(inputs_embeds.device.type)
    if model_dtype is not None and not autocast and torch.promote_types(inputs_embeds.dtype, model_dtype) != model_dtype:
        raise ValueError(
            f"`inputs_embeds` has dtype {inputs_embeds.dtype} but the model computes in {model_dtype}: cast them "
            f"(`inputs_embeds.to({model_dtype})`) or run under torch.autocast."
        )


def check_position_ids(position_ids, batch_size: int, seq_len: int) -> None:
    """``position_ids`` [batch or 1, seq_len] of integers (their values are checked with the other input values)."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"`position_ids` must be a torch.Tensor, got {type(position_ids).__name__}.")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise ValueError(f"`position_ids` must hold integer positions, got dtype {position_ids.dtype}.")
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch_size) or position_ids.shape[1] != seq_len:
        batch = f"batch={batch_size}" + (" (or 1)" if batch_size > 1 else "")
        raise ValueError(
            f"`position_ids` must have shape [{batch}, seq_len={seq_len}] for input of shape {[batch_size, seq_len]}, got "
            f"{list(position_ids.shape)}."
        )


def check_cache_type(past_key_values) -> None:
    """``past_key_values`` is a decoder-only transformers ``Cache`` (or None)."""
    if past_key_values is None:
        return
    if not isinstance(past_key_values, Cache):
        raise TypeError(
            f"`past_key_values` must be a transformers Cache (e.g. DynamicCache(config=model.config) or StaticCache), got "
            f"{type(past_key_values).__name__}."
        )
    if isinstance(past_key_values, EncoderDecoderCache):
        # it has no `update` of its own for a decoder's layers: it would fail deep inside its self-attention cache
        raise TypeError(
            "`past_key_values` is an EncoderDecoderCache, which is for encoder-decoder models: pass a DynamicCache or "
            "StaticCache built with `config=model.config`."
        )


def check_cache_depth(layers, grows: bool, num_layers: int | None) -> None:
    """A cache of fixed layers has one for each of the ``num_layers`` decoder layers, and none beyond them filled."""
    if num_layers is None or not isinstance(layers, list):
        return
    if len(layers) < num_layers and not grows:
        raise ValueError(
            f"`past_key_values` has {len(layers)} layers, but this model has {num_layers} decoder layers: the cache "
            "was built for another model (build it with `config=model.config`)."
        )
    deeper = next((i for i in range(num_layers, len(layers)) if getattr(layers[i], "is_initialized", False)), None)
    if deeper is not None:
        raise ValueError(
            f"`past_key_values` holds entries for layer {deeper}, but this model has {num_layers} decoder layers: the "
            "cache was filled by a deeper model."
        )


def check_cache(past_key_values, batch_size: int, seq_len: int, widths: tuple[int, int] | None = None,
                num_layers: int | None = None, model_dtype: torch.dtype | None = None) -> None:
    """``past_key_values`` is a transformers ``Cache`` of this batch, filled by a model of this width (``widths``: the
    last dims of the cached keys and values, when the attention knows them), depth (``num_layers`` decoder layers: a
    fixed-size cache of fewer layers would fail on the first layer it lacks, entries past them come from a deeper
    model) and dtype (``model_dtype``, outside autocast: attention refuses keys of another dtype than its queries),
    and a static one has room for the input. Shapes and dtypes only (the static layer's allocated size, the cached
    tensors' shapes): no device read."""
    check_cache_type(past_key_values)
    if past_key_values is None:
        return
    layers = getattr(past_key_values, "layers", None)
    grows = getattr(past_key_values, "layer_class_to_replicate", None) is not None
    layer = layers[0] if layers else None
    if layer is None:
        check_cache_depth(layers, grows, num_layers)
        return
    keys = getattr(layer, "keys", None) if getattr(layer, "is_initialized", False) else None
    if isinstance(keys, torch.Tensor) and keys.dim() < 2:
        # An empty placeholder, not the cached states: transformers' quantized caches keep those in their own layout
        # and leave `keys` a 1-D empty tensor (the fp8 backend always, the others once the residual part is flushed)
        keys = None
    if isinstance(keys, torch.Tensor) and keys.shape[0] != batch_size:
        raise ValueError(
            f"`past_key_values` holds a batch of {keys.shape[0]} sequences, the input has {batch_size}: a cache "
            "belongs to the batch it was filled with."
        )
    values = getattr(layer, "values", None) if isinstance(keys, torch.Tensor) else None
    if widths is not None and isinstance(values, torch.Tensor) and (keys.shape[-1], values.shape[-1]) != tuple(widths):
        raise ValueError(
            f"`past_key_values` caches keys and values of widths {[keys.shape[-1], values.shape[-1]]}, but this model's "
            f"attention caches {list(widths)}: the cache was filled by a model of another config, or built for "
            "attention that caches per-head keys and values of one width, as PEFT's prefix tuning builds its virtual "
            "tokens, which this model's attention does not read: prefix tuning does not apply to it (prompt tuning, "
            "p-tuning and LoRA do)."
        )
    if (model_dtype is not None and isinstance(keys, torch.Tensor) and keys.dtype != model_dtype
            and not torch.is_autocast_enabled(keys.device.type)):
        raise ValueError(
            f"`past_key_values` caches {keys.dtype} keys, but the model computes in {model_dtype}: the cache was filled "
            "by the model in another dtype (a cache belongs to the model and dtype it was filled with)."
        )
    check_cache_depth(layers, grows, num_layers)  # after the widths: another config's cache is named by them first
    capacity = static_capacity(past_key_values)
    if capacity is not None and seq_len > capacity:
        raise ValueError(
            f"The input's {seq_len} tokens do not fit the static cache's {capacity} positions "
            "(`max_cache_len`): build it at least as long as the prompt plus the tokens to generate."
        )


def static_capacity(past_key_values) -> int | None:
    """The positions a static (not sliding-window) cache holds, from its first layer; None for other caches."""
    layers = getattr(past_key_values, "layers", None)
    layer = layers[0] if layers else None
    if isinstance(layer, StaticLayer) and not isinstance(layer, StaticSlidingWindowLayer):
        return layer.max_cache_len
    return None


def check_cached_prompt(past_key_values, prompt_len: int) -> None:
    """A cache passed to ``generate`` holds a strict prefix of the prompt (``generate`` takes the whole sequence as the
    prompt and feeds the positions after the cached ones). One that holds the whole prompt or more leaves nothing to
    feed: transformers' prefill then runs the last positions again over their cached selves and the tokens come out
    different, without a word (its own class too)."""
    if not isinstance(past_key_values, Cache):
        return
    past = past_key_values.get_seq_length()
    if past >= prompt_len:
        raise ValueError(
            f"`past_key_values` already holds {past} positions and the prompt has {prompt_len}: `generate` takes the "
            "whole sequence (the cached positions and the new ones) as the prompt, and the cache must hold fewer "
            f"positions than it (when the cache starts with this very prompt, `past_key_values.crop(-{past - prompt_len + 1})` "
            "drops the positions from its last prompt token on, which is then fed; a reused static cache needs `reset()`)."
        )


def cached_length(past_key_values) -> int | None:
    """The positions ``past_key_values`` holds when its tensors' shapes say it (no cache, or a dynamic one: 0 or the
    cached length), else None (a static cache counts its positions on the device)."""
    if past_key_values is None:
        return 0
    layers = getattr(past_key_values, "layers", None)
    if isinstance(layers, list) and all(type(layer) is DynamicLayer for layer in layers):
        return past_key_values.get_seq_length()
    return None


def check_static_cache_room(capacity: int, max_length: int) -> None:
    """A static cache of ``capacity`` positions holds every position of a generation up to ``max_length`` tokens but
    the last one generated (that token is never fed back)."""
    if capacity < max_length - 1:
        raise ValueError(
            f"The static cache holds {capacity} positions (`max_cache_len`); generating up to `max_length={max_length}` "
            f"tokens (prompt + new) needs {max_length - 1}."
        )


def check_attention_mask(attention_mask: torch.Tensor | None, shape, past: int | None = None, capacity: int | None = None,
                         num_heads: int | None = None, model_dtype: torch.dtype | None = None) -> None:
    """A 2-D padding mask is [batch, cached + new tokens]: one row per sequence, exactly as long as the ``past``
    cached positions plus the input where ``past`` is known (see :func:`cached_length`), else at least as long as the
    input; its values (1 or 0) are checked with the other input values. A prepared 4-D mask is [batch (or 1), 1 or
    ``num_heads``, seq_len, keys], bool (True = attend) or additive float (float32 or ``model_dtype``: the attention
    kernels take no other); keys are the cached plus new positions where ``past`` is known, the static cache's
    ``capacity`` over one, else at least seq_len (the attention adds the mask to scores of exactly that width)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}.")
    batch, seq_len = shape
    if attention_mask.dim() == 2:
        # A longer mask than the cached + new positions would be read from its start by the attention and from its
        # end by the loss and the routers' padding mask: there is no one right reading, so it is refused.
        wrong_length = attention_mask.shape[1] < seq_len if past is None else attention_mask.shape[1] != past + seq_len
        if attention_mask.shape[0] != batch or wrong_length:
            # the messages are formatted only on the way out: under torch.compile with dynamic shapes the sizes are
            # symbolic, and formatting one breaks the graph (a compiled decode step with `fullgraph=True` raises)
            keys = f"past + seq_len = {past} + {seq_len}" if past else f"seq_len = {seq_len}"
            expected = f"past + seq_len ≥ {seq_len}" if past is None else keys
            raise ValueError(
                f"`attention_mask` must have shape [batch={batch}, {expected}] for input of shape {[batch, seq_len]}"
                f"{f' over {past} cached positions' if past else ''}, got {list(attention_mask.shape)}."
            )
        return
    if attention_mask.dim() != 4:
        raise ValueError(
            f"`attention_mask` must be 2-D (padding, [batch, past + seq_len]) or 4-D (prepared, [batch, 1, seq_len, "
            f"keys]), got shape {list(attention_mask.shape)}."
        )
    if attention_mask.dtype != torch.bool and not attention_mask.dtype.is_floating_point:
        # an integer 4-D mask would be added to the scores as is: 1 where it should attend, 0 where it should not
        raise ValueError(
            f"A 4-D `attention_mask` must be bool (True = attend) or float (0 = attend, large negative = masked), got "
            f"dtype {attention_mask.dtype}."
        )
    if (attention_mask.dtype.is_floating_point and model_dtype is not None
            and attention_mask.dtype not in (torch.float32, model_dtype)
            and not torch.is_autocast_enabled(attention_mask.device.type)):
        allowed = "float32" if model_dtype == torch.float32 else f"the model's dtype {model_dtype} (or float32)"
        raise ValueError(
            f"A float 4-D `attention_mask` must be {allowed}, got {attention_mask.dtype}: SDPA refuses other mask "
            f"dtypes (`attention_mask.to({model_dtype})`)."
        )
    keys = past + seq_len if past is not None else capacity
    wrong_keys = attention_mask.shape[3] < seq_len if keys is None else attention_mask.shape[3] != keys
    heads = (1,) if num_heads is None else (1, num_heads)
    if (attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] not in heads
            or attention_mask.shape[2] != seq_len or wrong_keys):
        # formatted only here, as above: a compiled static-cache step has a symbolic max_cache_len
        if past is not None:
            expected_keys = f"keys = past + seq_len = {past} + {seq_len}" if past else f"keys = seq_len = {seq_len}"
        elif capacity is not None:
            expected_keys = f"keys = the static cache's max_cache_len = {capacity}"
        else:
            expected_keys = f"keys ≥ {seq_len}"
        batch_entry = f"batch={batch}" + (" (or 1)" if batch > 1 else "")
        heads_note = "" if num_heads is None else f" (heads = {num_heads})"
        raise ValueError(
            f"A 4-D `attention_mask` must have shape [{batch_entry}, 1 or heads, seq_len={seq_len}, {expected_keys}]"
            f"{heads_note} for input of shape {[batch, seq_len]}, got {list(attention_mask.shape)}."
        )


def check_logits_to_keep(logits_to_keep, seq_len: int | None = None) -> None:
    """An int ``k`` ≥ 0 (the last k positions; 0 = all) or a 1-D tensor of positions (or a bool mask over the
    ``seq_len`` positions), as in transformers. A bool ``True`` is not a count (it would keep one position), and a
    tensor of another rank would index the logits into another shape."""
    if isinstance(logits_to_keep, torch.Tensor):
        integer = not (logits_to_keep.dtype.is_floating_point or logits_to_keep.dtype.is_complex)
        bool_length_ok = logits_to_keep.dtype != torch.bool or seq_len is None or logits_to_keep.shape[0:1] == (seq_len,)
        if logits_to_keep.dim() != 1 or not integer or not bool_length_ok:
            raise ValueError(
                f"A tensor `logits_to_keep` must be 1-D: the integer positions to compute logits for (or a bool mask "
                f"over the {seq_len if seq_len is not None else 'seq_len'} positions), got dtype {logits_to_keep.dtype} "
                f"of shape {list(logits_to_keep.shape)}."
            )
        if logits_to_keep.dtype != torch.bool and seq_len is not None and logits_to_keep.numel() and not torch.compiler.is_compiling():
            # positions outside the sequence fail inside the indexing with an error that names nothing (on a GPU, a
            # device-side assert); one host read, only for a tensor of positions (generate passes an int)
            low, high = torch.aminmax(logits_to_keep)
            low, high = torch.stack([low, high]).tolist()
            if low < -seq_len or high >= seq_len:
                raise ValueError(
                    f"`logits_to_keep` holds positions in [{low}, {high}], outside the input's {seq_len} positions "
                    f"(valid: -{seq_len} .. {seq_len - 1})."
                )
        return
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, numbers.Integral) or logits_to_keep < 0:
        raise ValueError(
            f"`logits_to_keep` must be an int ≥ 0 (the number of last positions to compute logits for, 0 = all) or a "
            f"tensor of positions, got {logits_to_keep!r}."
        )


def check_num_items_in_batch(num_items_in_batch) -> None:
    """What the Trainer passes: the target count of the whole accumulated batch, an int or a device tensor (whose
    value is not read here: that would cost a host sync per micro-batch; the labels check reads it with its own)."""
    if num_items_in_batch is None:
        return
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool or num_items_in_batch.dtype.is_complex:
            raise ValueError(
                f"`num_items_in_batch` must be the number of targets in the whole batch: a tensor of one number, got "
                f"dtype {num_items_in_batch.dtype} of shape {list(num_items_in_batch.shape)}."
            )
        return
    # numbers.Real: Python's int and float and NumPy's scalars (a count read from an array); a bool is no count
    if (isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real)
            or not math.isfinite(num_items_in_batch) or num_items_in_batch < 0):
        raise ValueError(
            f"`num_items_in_batch` must be the number of targets in the whole batch (an int ≥ 0 or a tensor), got "
            f"{num_items_in_batch!r}."
        )


def check_logits_to_keep_with_targets(logits_to_keep, has_targets: bool) -> None:
    """The loss needs a logit at every target: with ``logits_to_keep=1`` the one kept position has no next token, so
    the loss would be 0 and train nothing."""
    if has_targets and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError(
            f"`logits_to_keep={logits_to_keep!r}` keeps the logits of the last positions only, but `labels` need one at "
            "every target position: pass `logits_to_keep=0` with labels (mask the targets to leave out with -100)."
        )


def check_loss_weight(value, field: str) -> None:
    """A loss weight read from the config at each forward (it may be set after the model was built): a finite real
    number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Config field `{field}` must be a finite number ≥ 0, got {value!r}.")


def check_return_mtp_loss(return_mtp_loss, has_targets: bool, depth: int) -> None:
    if return_mtp_loss is None or return_mtp_loss is False:
        return
    if return_mtp_loss is not True:
        raise ValueError(f"`return_mtp_loss` must be True, False or None, got {return_mtp_loss!r}.")
    if depth == 0:
        raise ValueError("`return_mtp_loss=True` needs MTP modules: this model has `num_nextn_predict_layers=0`.")
    if not has_targets:
        raise ValueError("`return_mtp_loss=True` needs `labels` (or `shift_labels`): the MTP loss is computed against them.")


# What `forward(**kwargs)` passes on: transformers' per-call options (output_*, num_items_in_batch, packed-sequence
# lengths), and the token_type_ids some tokenizers return (the model has no token types: ignored, as transformers'
# decoder-only models do). Ignored too: the `tokenizer` that `generate(..., stop_strings=..., tokenizer=...)` takes
# for its stopping criteria, which transformers' decoding loops leave in the model inputs of every step.
FORWARD_KWARGS = frozenset(TransformersKwargs.__annotations__) | frozenset(FlashAttentionKwargs.__annotations__) | {
    "token_type_ids", "tokenizer",
}

# Arguments transformers' decoder-only models once took and no longer read.
_RETIRED_KWARGS = {"head_mask": "the model has no head masking"}


def check_cache_position(cache_position, seq_len: int) -> None:
    """``cache_position`` (which transformers 4 models read, and transformers 5 still passes to remote code) is read by
    nothing here: the cache is written at its own length. It is accepted where it says just that, the [seq_len]
    positions after the cached ones (its values are checked with the other input values)."""
    if cache_position is None:
        return
    if not isinstance(cache_position, torch.Tensor):
        raise TypeError(f"`cache_position` must be a torch.Tensor, got {type(cache_position).__name__}.")
    if cache_position.dim() != 1 or cache_position.shape[0] != seq_len or cache_position.dtype.is_floating_point:
        raise ValueError(
            f"`cache_position` must be the {seq_len} integer positions the input takes after the cached ones, got "
            f"dtype {cache_position.dtype} of shape {list(cache_position.shape)} (it is not needed: the model writes "
            "the cache at its own length)."
        )


# transformers' naive pipeline-parallel forward runs the base model of a stage that is not the last one with every
# argument of the causal LM's forward bound by its signature: the head's own ones (read by the last stage only) and its
# `**kwargs` as one mapping under the name "kwargs".
_HEAD_PARAMETERS = frozenset({"labels", "logits_to_keep", "return_mtp_loss", "shift_labels"})


def check_forward_kwargs(kwargs: dict, parameters) -> None:
    """The extra keyword arguments of ``forward`` are ones it reads: a misspelt argument (``attention_masks``,
    ``past_key_value``) would otherwise be swallowed by ``**kwargs`` and the forward run without it."""
    if isinstance(kwargs.get("kwargs"), dict):
        check_forward_kwargs(kwargs["kwargs"], parameters)
    unknown = [name for name in kwargs if name not in FORWARD_KWARGS and name not in _HEAD_PARAMETERS
               and not (name == "kwargs" and isinstance(kwargs[name], dict))]
    if not unknown:
        return
    known = sorted(set(parameters) | FORWARD_KWARGS)
    notes = []
    for name in unknown:
        if name in _RETIRED_KWARGS:
            notes.append(f"`{name}`: {_RETIRED_KWARGS[name]}")
        elif close := difflib.get_close_matches(name, known, n=1):
            notes.append(f"`{name}`: did you mean `{close[0]}`?")
    raise TypeError(
        f"forward() got unexpected keyword argument(s) {unknown}" + (f" ({'; '.join(notes)})" if notes else "") + "."
    )


def check_generate_kwargs(kwargs: dict, generation_config) -> None:
    """Generation arguments that transformers' ``generate`` takes without a word and then misreads: a fractional
    ``max_new_tokens`` (rounded up by its length check), ``num_beams`` < 1 (a ZeroDivisionError deep inside), beam
    search with ``use_mtp`` (the MTP drafts are dropped with a log line: the beams run without them), and a
    ``past_key_values`` that is no Cache (an AttributeError on a private attribute)."""
    def value(name):
        return kwargs[name] if name in kwargs else getattr(generation_config, name, None)

    max_new_tokens = value("max_new_tokens")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral)):
        raise ValueError(f"`max_new_tokens` must be an int > 0 (the number of tokens to generate), got {max_new_tokens!r}.")
    num_beams = value("num_beams")
    if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, numbers.Integral) or num_beams < 1):
        raise ValueError(f"`num_beams` must be an int ≥ 1 (1 = no beam search), got {num_beams!r}.")
    use_mtp = value("use_mtp")
    if use_mtp is not None and not isinstance(use_mtp, bool):  # a string such as "no" would switch it on
        raise TypeError(f"`use_mtp` must be True or False, got {use_mtp!r}.")
    if use_mtp and num_beams is not None and num_beams > 1:
        raise ValueError(
            f"`use_mtp=True` drafts for greedy decoding and sampling only; with `num_beams={num_beams}` the drafts would "
            "be dropped: drop `use_mtp` for beam search, or `num_beams`."
        )
    check_cache_type(kwargs.get("past_key_values"))
    # Assisted decoding crops the cache after each rejected draft; transformers' quantized layers keep their states
    # in a layout of their own that the crop they inherit cannot cut (an IndexError inside the first crop)
    drafts = [name for name in ("use_mtp", "assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
              if value(name) not in (None, False)]
    layers = getattr(kwargs.get("past_key_values"), "layers", None) or ()
    quantized = value("cache_implementation") == "quantized" or any(isinstance(layer, BaseQuantizedLayer) for layer in layers)
    if drafts and quantized:
        raise ValueError(
            f"`{drafts[0]}` (assisted decoding) crops the cache after every rejected draft, which transformers' "
            "quantized cache (`cache_implementation=\"quantized\"`) cannot do: decode with the default dynamic cache "
            "to draft, or drop the draft source to decode with the quantized cache."
        )
