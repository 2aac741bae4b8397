"""Plugin registry: the swappable parts of DeepSeek-V3, looked up by the names used in `config.json`.

Five kinds of plugin exist. Each kind has a small base class below that documents its contract; a
plugin subclasses it and registers under a name:

    @register_plugin("router", "my_router")
    class MyRouter(RouterPlugin): ...

Third-party packages register through the entry-point group ``modeling_deepseek_v3.plugins``. An
entry point named ``<kind>.<name>`` that points at a class registers that class under that name; any
other entry point is simply imported (its module registers itself with the decorator).

This module imports, of the package, only ``checkpoint_io`` (which imports none of it), so every other module may
import it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import types

from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .checkpoint_io import load_per_expert_entries

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "modeling_deepseek_v3.plugins"


class _ConfigChecked:
    @classmethod
    def check_config(cls, config) -> None:
        """Raise ``ValueError`` naming the field if ``config`` cannot build this plugin. Called by the config."""


class AttentionPlugin(_ConfigChecked, nn.Module):
    """Built as ``cls(config, layer_idx)`` and placed at ``self_attn``.

    ``forward(hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs)``
    returns ``(output [B, T, hidden], attention weights or None)``. The plugin owns its cache layout: it
    writes into ``past_key_values.update(a, b, layer_idx)`` whatever it needs to resume decoding.
    """


class RouterPlugin(_ConfigChecked, nn.Module):
    """Built as ``cls(config)`` and placed at ``mlp.gate`` (parameter ``weight`` [E, hidden]).

    ``forward(hidden [B, T, hidden], token_mask [B, T] bool or None) -> (router_logits [B·T, E] fp32,
    topk_weights [B·T, K], topk_indices [B·T, K] long, aux_loss scalar or None)`` — transformers' router outputs
    (so ``output_router_logits`` records index 0) plus the balance loss. ``token_mask`` is True at real tokens and
    False at padding (None: all real); padding is routed like any token but left out of load counts and balance
    losses. ``aux_loss`` is the balance loss already multiplied by its coefficient, or None when not training.
    While training, a router that balances by counting exposes ``tokens_per_expert`` [E] (real tokens routed to
    each expert since the last reset), ``reset_counts()`` and ``update_bias(load [E], update_speed)``, its balancing
    step from the loads of the whole batch, on the device (it reads nothing on the host: the optimizer step's one
    host read is the statistics); ``modeling_deepseek_v3.training.update_expert_bias`` reads the counts,
    sums them over every rank, calls ``update_bias`` and resets them.

    ``group_limited`` says whether the router keeps each token inside ``topk_group`` of ``n_group`` contiguous expert
    groups (``noaux_tc``); the config's expert-count check and the expert-parallel placement read it, never the name.
    """

    group_limited = False


class ExpertsPlugin(nn.Module):
    """Base of a routed-experts module, placed at ``mlp.experts``: stacked ``gate_up_proj`` [E, 2·I, H] and
    ``down_proj`` [E, H, I] (or their FP8 forms with ``*_scale_inv``), and
    ``forward(hidden [N, H], top_k_index [N, K], top_k_weights [N, K]) -> [N, H]``, the weighted sum of the selected
    experts' outputs; no token is ever dropped.

    How the experts execute is not a plugin of ours but transformers' experts interface: the ``experts`` kind
    below lists and registers experts *implementations* — functions ``fn(experts_module, hidden, top_k_index,
    top_k_weights) -> out`` in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` — selected by
    ``config._experts_implementation`` (our field ``experts_backend``).

    ``load_state_dict`` also takes the official per-expert names (``{e}.gate_proj.weight``, ...) for this module,
    any subset of the experts at a time (``checkpoint_io.load_per_expert_entries``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(_load_per_expert_entries)


def _load_per_expert_entries(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    load_per_expert_entries(module, state_dict, prefix, missing_keys, assign=local_metadata.get("assign_to_params_buffers", False))


class MTPPlugin(_ConfigChecked, nn.Module):
    """Built as ``cls(config, depth)`` and placed at ``model.layers[num_hidden_layers + depth]``.

    ``forward(hidden_prev [B, T, hidden], next_token_embeds [B, T, hidden], position_embeddings,
    attention_mask, **kwargs) -> (hidden [B, T, hidden] before ``shared_head.norm``, aux_loss or None)``; with
    ``return_normed=True`` it returns ``(hidden, shared_head.norm(hidden), aux_loss)``, which is what the training
    loss uses, so that the norm runs inside the module's own forward (FSDP and offload hooks wrap that). Keyword
    ``token_mask`` [B, T] (True = real token) reaches its routers. The embedding and the output head are the main
    model's; the plugin holds references, never copies.
    """


class QuantizerPlugin(_ConfigChecked):
    """Built as ``cls(config)``. ``apply(model)`` swaps the eligible ``nn.Linear`` layers of ``model`` in
    place and returns it; ``is_eligible(name)`` tells which module names it touches."""

    def __init__(self, config):
        self.config = config

    def is_eligible(self, module_name: str) -> bool:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError


PLUGIN_BASES: dict[str, type] = {
    "attention": AttentionPlugin,
    "router": RouterPlugin,
    "mtp": MTPPlugin,
    "quantizer": QuantizerPlugin,
}
# The experts kind lives in transformers' experts interface: its names are "eager" (the experts module's own
# forward) and the functions of ALL_EXPERTS_FUNCTIONS.
EXPERTS_KIND = "experts"
PLUGIN_KINDS = (*PLUGIN_BASES, EXPERTS_KIND)
# How the model calls a plugin of each kind (the constructor's arguments; for experts, the function's), and the
# method a plugin class must define itself: checked at registration, so a plugin that cannot be called is named then
# rather than failing deep inside the first model built with it.
CALLED_AS = {
    "attention": ("config", "layer_idx"),
    "router": ("config",),
    "mtp": ("config", "depth"),
    "quantizer": ("config",),
    EXPERTS_KIND: ("module", "hidden_states", "top_k_index", "top_k_weights"),
}
REQUIRED_METHOD = {"attention": "forward", "router": "forward", "mtp": "forward", "quantizer": "apply"}
# How the model calls that method (after self): the positional arguments, then the keywords. The decoder layer passes
# the attention's inputs by keyword, and the MTP modules get `past_key_values` when they draft.
METHOD_CALLED_AS = {
    "attention": (("hidden_states",), ("position_embeddings", "attention_mask", "past_key_values", "position_ids")),
    "router": (("hidden_states",), ("token_mask",)),
    "mtp": (("hidden_prev", "next_token_embeds", "position_embeddings", "attention_mask"),
            ("past_key_values", "position_ids", "token_mask", "return_normed")),
    "quantizer": (("model",), ()),
}

_PLUGINS: dict[str, dict[str, type]] = {kind: {} for kind in PLUGIN_BASES}
_entry_points_loaded = False
# The names the package itself registers (and transformers' experts functions), fixed once the package is imported:
# a saved config.json naming one of them must build the same module in every process, so they cannot be replaced.
_BUILTIN_NAMES: dict[str, frozenset[str]] = {}
# "<kind>.<name>" of an entry point -> why it was not registered, for the unknown-name error of that name
_ENTRY_POINT_PROBLEMS: dict[str, str] = {}


def _check_kind(kind: str) -> None:
    if kind not in PLUGIN_KINDS:
        raise ValueError(f"Unknown plugin kind {kind!r}; the kinds are {sorted(PLUGIN_KINDS)}.")


def experts_implementations() -> list[str]:
    """The names ``config._experts_implementation`` (our ``experts_backend``) accepts."""
    return sorted({"eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()})


def freeze_builtin_names() -> None:
    """Record the names registered so far as the built-in ones (called once, by the package's ``__init__``)."""
    if not _BUILTIN_NAMES:
        _BUILTIN_NAMES.update({kind: frozenset(names) for kind, names in _PLUGINS.items()})
        _BUILTIN_NAMES[EXPERTS_KIND] = frozenset(experts_implementations())


def _check_not_builtin(kind: str, name: str, new) -> None:
    if name not in _BUILTIN_NAMES.get(kind, ()):
        return
    current = _PLUGINS[kind].get(name) if kind in _PLUGINS else ALL_EXPERTS_FUNCTIONS.get(name)
    if current is new:
        return  # the same object registered again (a module imported twice): nothing changes
    field = {"attention": "attention_backend", "router": "topk_method", "mtp": "mtp_backend", "quantizer": "quantizer",
             EXPERTS_KIND: "experts_backend"}[kind]
    if kind == EXPERTS_KIND and name == "eager":
        reason = "'eager' is the experts module's own forward, which never looks a function up"
    else:
        reason = ("every config.json naming it, the released checkpoints' included, would silently build the "
                  "replacement in this process and the original in any other")
    raise ValueError(
        f"{kind} plugin {name!r} is built in and cannot be replaced: {reason}. Register "
        f"{getattr(new, '__qualname__', new)} under a name of its own and set config field `{field}` to it."
    )


def register_plugin(kind: str, name: str):
    """Decorator registering a plugin of ``kind`` under ``name``. Re-registering a name of one's own replaces it; a
    built-in name (``mla``, ``noaux_tc``, ``eager``, ``grouped_mm``, ...) cannot be replaced.

    For ``kind="experts"`` it decorates a function ``fn(experts_module, hidden, top_k_index, top_k_weights)`` and
    registers it in transformers' experts interface; for the other kinds a subclass of the kind's base class."""
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError(f"A {kind} plugin needs a non-empty string name, got {name!r}.")
    if name != name.strip():
        # config values are compared exactly: " mla " would never be the "mla" a config names
        raise ValueError(f"{kind} plugin name {name!r} has leading or trailing whitespace; register it as {name.strip()!r}.")
    if kind == EXPERTS_KIND:

        def register_experts(fn):
            if not callable(fn) or isinstance(fn, type):
                raise TypeError(f"experts plugin {name!r} must be a function (module, hidden, top_k_index, top_k_weights), got {fn!r}.")
            _check_called_as(kind, name, fn)
            _check_not_builtin(kind, name, fn)
            ALL_EXPERTS_FUNCTIONS.register(name, fn)
            return fn

        return register_experts

    def decorator(cls: type) -> type:
        base = PLUGIN_BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{kind} plugin {name!r} must be a subclass of {base.__name__}, got {cls!r}.")
        method = REQUIRED_METHOD[kind]
        if getattr(cls, method) is getattr(nn.Module if method == "forward" else base, method):
            raise TypeError(f"{kind} plugin {name!r} ({cls.__qualname__}) must define {method}() itself.")
        _check_called_as(kind, name, cls)
        _check_method_called_as(kind, name, cls, method)
        _check_not_builtin(kind, name, cls)
        previous = _PLUGINS[kind].get(name)
        if previous is not None and previous is not cls:
            logger.info("Replacing %s plugin %r (%s) with %s", kind, name, previous.__qualname__, cls.__qualname__)
        _PLUGINS[kind][name] = cls
        cls.plugin_name = name
        return cls

    return decorator


def _check_called_as(kind: str, name: str, obj) -> None:
    """``obj`` (a plugin class, or an experts function) accepts the arguments the model passes it."""
    arguments = CALLED_AS[kind]
    try:
        inspect.signature(obj).bind(*arguments)
    except TypeError:
        what = "its constructor" if isinstance(obj, type) else "the function"
        raise TypeError(
            f"{kind} plugin {name!r} is called as {getattr(obj, '__qualname__', obj)}({', '.join(arguments)}), but "
            f"{what} takes {inspect.signature(obj)}."
        ) from None
    except ValueError:  # no signature to inspect (a builtin): nothing to check
        pass


def _check_method_called_as(kind: str, name: str, cls: type, method: str) -> None:
    """``cls.<method>`` accepts the call the model makes: a renamed or missing argument would otherwise be a TypeError
    of the first forward (or of the model's ``__init__``, for a quantizer), far from the plugin."""
    positional, keywords = METHOD_CALLED_AS[kind]
    function = getattr(cls, method)
    try:
        inspect.signature(function).bind(None, *positional, **dict.fromkeys(keywords))
    except TypeError:
        call = ", ".join([*positional, *(f"{k}=..." for k in keywords)])
        raise TypeError(
            f"{kind} plugin {name!r} is called as {cls.__qualname__}.{method}({call}), but it takes "
            f"{inspect.signature(function)}."
        ) from None
    except ValueError:  # no signature to inspect: nothing to check
        pass


def load_entry_point_plugins(reload: bool = False) -> None:
    """Import the plugins that installed distributions advertise under ``ENTRY_POINT_GROUP``."""
    global _entry_points_loaded
    if _entry_points_loaded and not reload:
        return
    _entry_points_loaded = True
    _ENTRY_POINT_PROBLEMS.clear()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        # One broken third-party plugin must neither break the import of ours nor keep the entry points after it
        # from registering: each problem is logged and remembered for the error of the name it would have provided.
        try:
            obj = entry_point.load()
        except Exception as error:
            _entry_point_problem(entry_point, f"it failed to import: {type(error).__name__}: {error}")
            continue
        kind, dot, name = entry_point.name.partition(".")
        if not dot or isinstance(obj, types.ModuleType):
            continue  # a module that registers itself on import
        if kind not in PLUGIN_KINDS:
            _entry_point_problem(entry_point, f"{kind!r} is not a plugin kind (the kinds are {sorted(PLUGIN_KINDS)})")
            continue
        try:
            register_plugin(kind, name)(obj)
        except (TypeError, ValueError) as error:
            _entry_point_problem(entry_point, str(error))


def _entry_point_problem(entry_point, why: str) -> None:
    _ENTRY_POINT_PROBLEMS[entry_point.name] = f"entry point {entry_point.name!r} ({entry_point.value}) was not registered: {why}"
    logger.warning("Plugin %s", _ENTRY_POINT_PROBLEMS[entry_point.name])


def get_plugin(kind: str, name: str, field: str | None = None):
    """The class registered as ``name`` (for ``experts``: the function, None for ``eager``); a ``ValueError`` naming
    the config ``field`` if there is none."""
    _check_kind(kind)
    field = field or kind
    if not isinstance(name, str):
        raise ValueError(f"Config field `{field}` must be a string naming a {kind} plugin, got {name!r} ({type(name).__name__}).")
    names = experts_implementations() if kind == EXPERTS_KIND else _PLUGINS[kind]
    if name not in names:
        load_entry_point_plugins()
        names = experts_implementations() if kind == EXPERTS_KIND else _PLUGINS[kind]
    if name not in names:
        # the entry point meant to provide it (one of a misspelt kind, too)
        problem = _ENTRY_POINT_PROBLEMS.get(f"{kind}.{name}") or next(
            (why for key, why in _ENTRY_POINT_PROBLEMS.items() if key.partition(".")[2] == name), None
        )
        hint = (
            f" The {problem.rstrip('.')}." if problem else
            # a config saved in a process that registered its own plugin names it; this process must register it too
            " A plugin registered in another process (e.g. the one that saved this config) must be registered in "
            f"this one too: import the module that registers it, or install it under the entry-point group {ENTRY_POINT_GROUP!r}."
        )
        raise ValueError(f"Unknown {kind} plugin {name!r} in config field `{field}`; registered {kind} plugins: {sorted(names)}.{hint}")
    if kind == EXPERTS_KIND:
        return None if name == "eager" else ALL_EXPERTS_FUNCTIONS[name]
    return names[name]


def list_plugins() -> dict[str, list[str]]:
    """``{kind: [registered names]}`` for every kind, entry-point plugins included."""
    load_entry_point_plugins()
    return {**{kind: sorted(names) for kind, names in _PLUGINS.items()}, EXPERTS_KIND: experts_implementations()}
