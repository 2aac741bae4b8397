"""The private transformers/torch APIs we rely on exist in the installed versions (``modeling_deepseek_v3.compat``),
and a missing one fails with a message naming it."""

from __future__ import annotations

import pytest
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
