"""Plugin registry: the swappable parts of DeepSeek-V3, looked up by the names used in `config.json`.

Five kinds of plugin exist. Each kind has a small base class below that documents its contract; a
plugin subclasses it and registers under a name:

    @register_plugin("router", "my_router")
    class MyRouter(RouterPlugin): ...

Third-party packages register through the entry-point group ``modeling_deepseek_v3.plugins``. An
entry point named ``<kind>.<name>`` that points at a class registers that class under that name; any
other entry point is simply imported (its module registers itself with the decorator).

This module imports nothing from the rest of the package, so every other module may import it.
"""

from __future__ import annotations

import importlib.metadata
import logging

from torch import nn

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

    ``forward(hidden [B, T, hidden], token_mask [B, T] bool or None) -> (topk_idx [B·T, K] long,
    topk_weight [B·T, K], aux_loss scalar or None)``. ``token_mask`` is True at real tokens and False at padding
    (None: all real); padding is routed like any token but left out of load counts and balance losses.
    ``aux_loss`` is the balance loss already multiplied by its coefficient, or None when not training.
    While training, a router that balances by counting exposes ``tokens_per_expert`` [E] (real tokens routed to
    each expert since the last reset) and ``reset_counts()``; ``modeling_deepseek_v3.training.update_expert_bias``
    reads, all-reduces and resets them, and moves ``e_score_correction_bias`` where the router has one.
    """


class ExpertsPlugin(_ConfigChecked, nn.Module):
    """Built as ``cls(config)`` and placed at ``mlp.experts``.

    ``forward(hidden [N, hidden], topk_idx [N, K], topk_weight [N, K]) -> [N, hidden]``: the weighted sum of
    the selected routed experts' outputs. No token is ever dropped.
    """


class MTPPlugin(_ConfigChecked, nn.Module):
    """Built as ``cls(config, depth)`` and placed at ``model.layers[num_hidden_layers + depth]``.

    ``forward(hidden_prev [B, T, hidden], next_token_embeds [B, T, hidden], position_embeddings,
    attention_mask, **kwargs) -> hidden [B, T, hidden]`` (before ``shared_head.norm``); with
    ``return_normed=True`` it returns ``(hidden, shared_head.norm(hidden))``, which is what the training loss
    uses, so that the norm runs inside the module's own forward (FSDP and offload hooks wrap that). Keyword
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
    "experts": ExpertsPlugin,
    "mtp": MTPPlugin,
    "quantizer": QuantizerPlugin,
}

_PLUGINS: dict[str, dict[str, type]] = {kind: {} for kind in PLUGIN_BASES}
_entry_points_loaded = False


def _check_kind(kind: str) -> None:
    if kind not in PLUGIN_BASES:
        raise ValueError(f"Unknown plugin kind {kind!r}; the kinds are {sorted(PLUGIN_BASES)}.")


def register_plugin(kind: str, name: str):
    """Class decorator registering a plugin of ``kind`` under ``name``. Re-registering a name replaces it."""
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise ValueError(f"A {kind} plugin needs a non-empty string name, got {name!r}.")

    def decorator(cls: type) -> type:
        base = PLUGIN_BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"{kind} plugin {name!r} must be a subclass of {base.__name__}, got {cls!r}.")
        previous = _PLUGINS[kind].get(name)
        if previous is not None and previous is not cls:
            logger.info("Replacing %s plugin %r (%s) with %s", kind, name, previous.__qualname__, cls.__qualname__)
        _PLUGINS[kind][name] = cls
        cls.plugin_name = name
        return cls

    return decorator


def load_entry_point_plugins(reload: bool = False) -> None:
    """Import the plugins that installed distributions advertise under ``ENTRY_POINT_GROUP``."""
    global _entry_points_loaded
    if _entry_points_loaded and not reload:
        return
    _entry_points_loaded = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry_point.load()
        except Exception as error:  # a broken third-party plugin must not break the import of ours
            logger.warning("Could not load plugin entry point %r: %s", entry_point.value, error)
            continue
        kind, _, name = entry_point.name.partition(".")
        if isinstance(obj, type) and kind in PLUGIN_BASES and name:
            register_plugin(kind, name)(obj)


def get_plugin(kind: str, name: str, field: str | None = None) -> type:
    """The class registered as ``name``; a ``ValueError`` naming the config ``field`` if there is none."""
    _check_kind(kind)
    plugins = _PLUGINS[kind]
    if name not in plugins:
        load_entry_point_plugins()
    if name not in plugins:
        field = field or kind
        raise ValueError(
            f"Unknown {kind} plugin {name!r} in config field `{field}`; registered {kind} plugins: {sorted(plugins)}."
        )
    return plugins[name]


def list_plugins() -> dict[str, list[str]]:
    """``{kind: [registered names]}`` for every kind, entry-point plugins included."""
    load_entry_point_plugins()
    return {kind: sorted(names) for kind, names in _PLUGINS.items()}
