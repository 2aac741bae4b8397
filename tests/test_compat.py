"""The private transformers/torch APIs we rely on exist in the installed versions (``modeling_deepseek_v3.compat``),
and a missing one fails with a message naming it."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import StaticLayer
from transformers.generation import GenerationMixin
from transformers.modeling_utils import PreTrainedModel

from modeling_deepseek_v3 import compat


def test_installed_versions_have_every_private_api():
    compat.check()


def test_a_missing_private_api_is_named(monkeypatch):
    monkeypatch.setattr(PreTrainedModel, "_upload_modified_files", None)  # (defined on a mixin: shadowed, not deleted)
    with pytest.raises(compat.IncompatibleVersionError, match=r"PreTrainedModel\._upload_modified_files does not exist"):
        compat.check()


def test_a_changed_signature_is_named(monkeypatch):
    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(lambda model, files: None))
    with pytest.raises(compat.IncompatibleVersionError, match=r"_load_pretrained_model has no parameter\(s\) \['state_dict'"):
        compat.check()


def test_a_changed_generation_hook_is_named(monkeypatch):
    monkeypatch.setattr(GenerationMixin, "_assisted_decoding", lambda self, input_ids, **kwargs: None)
    with pytest.raises(compat.IncompatibleVersionError, match=r"_assisted_decoding has no parameter\(s\) \['logits_processor'"):
        compat.check()


def test_a_static_layer_length_that_is_no_tensor_is_named(monkeypatch):
    # the static-cache MTP loop lowers that tensor in place to forget rejected drafts
    original = StaticLayer.__init__

    def plain_int_length(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.cumulative_length = 0

    monkeypatch.setattr(StaticLayer, "__init__", plain_int_length)
    monkeypatch.setattr(StaticLayer, "lazy_initialization", lambda self, k, v: setattr(self, "is_initialized", True))
    monkeypatch.setattr(StaticLayer, "update", lambda self, k, v, *a, **kw: (torch.zeros(0), torch.zeros(0)))
    with pytest.raises(compat.IncompatibleVersionError, match=r"StaticLayer\.cumulative_length"):
        compat.check()


def test_a_missing_shard_size_parser_is_named(monkeypatch):
    # save_pretrained reads max_shard_size with huggingface_hub's own parser before the save starts
    monkeypatch.delattr(compat.hub_serialization, "parse_size_to_int")
    with pytest.raises(compat.IncompatibleVersionError, match=r"huggingface_hub\.serialization\._base\.parse_size_to_int"):
        compat.check()


def test_a_missing_peft_table_is_named(monkeypatch):
    # lora.py reads which target_modules names PEFT rewrites into the stacked experts' parameters
    pytest.importorskip("peft")
    monkeypatch.delattr(compat._peft_moe_tables(), "_MOE_FUSED_TARGETS")
    with pytest.raises(compat.IncompatibleVersionError, match=r"transformers_weight_conversion\._MOE_FUSED_TARGETS"):
        compat.check()
