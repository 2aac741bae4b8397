"""The private APIs reached through ``modeling_deepseek_v3.compat`` that the review listed there: a release that
drops one fails ``compat.check()`` naming it."""

from __future__ import annotations

import inspect

import pytest
from transformers.generation import GenerationConfig
from transformers.modeling_layers import GenericForTokenClassification

from modeling_deepseek_v3 import compat


def test_a_missing_generation_mask_length_is_named(monkeypatch):
    annotations = dict(inspect.get_annotations(GenerationConfig))
    del annotations["_mask_length"]
    monkeypatch.setattr(GenerationConfig, "__annotations__", annotations)
    with pytest.raises(compat.IncompatibleVersionError, match=r"GenerationConfig\._mask_length does not exist"):
        compat.check()


def test_an_undecorated_generic_head_is_named(monkeypatch):
    monkeypatch.setattr(GenericForTokenClassification, "forward", lambda self, *args, **kwargs: None)
    with pytest.raises(compat.IncompatibleVersionError, match=r"GenericForTokenClassification\.forward is not a decorated"):
        compat.check()


def test_a_renamed_offload_store_is_named(monkeypatch):
    from accelerate.hooks import AlignDevicesHook

    original = AlignDevicesHook.__init__

    def renamed(self, *args, weights_map=None, **kwargs):
        original(self, *args, **kwargs)
        self.offload_map = weights_map

    monkeypatch.setattr(AlignDevicesHook, "__init__", renamed)
    with pytest.raises(compat.IncompatibleVersionError, match=r"_hf_hook\.weights_map"):
        compat.check()


def test_renamed_forward_hooks_are_named(monkeypatch):
    monkeypatch.setattr(compat, "forward_hooks", lambda module: [])  # what a torch without `_forward_hooks` gives
    with pytest.raises(compat.IncompatibleVersionError, match=r"torch\.nn\.Module\._forward_hooks"):
        compat.check()
