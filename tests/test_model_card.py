"""Model cards written by save_pretrained / push_to_hub (huggingface_hub.ModelCard), tested up to the network."""

from __future__ import annotations

import huggingface_hub
import pytest
import transformers
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError

from conftest import build_model, tiny_config
from modeling_deepseek_v3.model_card import card_template_path, count_parameters


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(num_nextn_predict_layers=1))


def test_save_writes_valid_card(model, tmp_path):
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers"
    assert {"deepseek_v3", "modeling_deepseek_v3", "mtp"} <= set(card.data.tags)
    assert card.data.license is None  # left to the user
    assert card.data.base_model is None  # built from scratch: no base model to name
    counts = count_parameters(model)
    assert f"{counts['total']:,}" in card.text and f"{counts['activated']:,}" in card.text
    assert counts["activated"] < counts["total"]
    assert "import modeling_deepseek_v3" in card.text and "`noaux_tc`" in card.text and "depth 1" in card.text
    assert card_template_path().endswith("deepseek_v3.md")


def test_card_names_base_model_and_fp8(tmp_path):
    model = build_model(tiny_config())
    model.config.name_or_path = "deepseek-ai/DeepSeek-V3"
    model.save_pretrained(tmp_path / "bf16")
    from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter
    DeepseekV3FP8Converter.from_pretrained(tmp_path / "bf16").quantize(tmp_path / "fp8", progress=False)
    fp8 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp8", quantization_config=transformers.FineGrainedFP8Config(dequantize=False))
    fp8.config.name_or_path = "deepseek-ai/DeepSeek-V3"
    fp8.save_pretrained(tmp_path / "again")
    card = ModelCard.load(tmp_path / "again" / "README.md")
    assert card.data.base_model == "deepseek-ai/DeepSeek-V3" and "fp8" in card.data.tags
    assert "128×128" in card.text


def test_user_card_is_kept(model, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "---\nlicense: mit\n---\n# mine\n"


def test_push_to_hub_commits_our_card(model, monkeypatch):
    """transformers' push_to_hub runs unmocked; only the three Hub calls (network) are replaced."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def load(cls, repo_id_or_path, *args, **kwargs):
        if str(repo_id_or_path) == "me/tiny-dsv3":
            raise EntryNotFoundError("no README.md in a new repository")
        return original_load(repo_id_or_path, *args, **kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        # read the files now: transformers deletes its temporary folder once the commit returns
        commits.append((repo_id, {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}))
        return None

    original_load = ModelCard.load.__func__.__get__(ModelCard)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(load))
    model.push_to_hub("me/tiny-dsv3", tags=["my-tag"])
    (repo_id, operations), = commits
    assert repo_id == "me/tiny-dsv3"
    assert {"README.md", "config.json", "model.safetensors"} <= set(operations)
    card = ModelCard(operations["README.md"].decode())
    assert card.data.library_name == "transformers" and "my-tag" in card.data.tags and "deepseek_v3" in card.data.tags
    assert 'from_pretrained("me/tiny-dsv3"' in card.text


def test_push_offline_stops_at_network(model, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="(?i)offline|connect|network"):
        model.push_to_hub("me/tiny-dsv3")
