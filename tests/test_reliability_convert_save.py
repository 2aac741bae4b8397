"""Bad input to the converter and to save_pretrained's folder handling (atomic save, model card): each case either
fails with an error naming the tensor / file, or now gives the right result."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from safetensors.torch import save_file

from conftest import build_model, tiny_config
from modeling_deepseek_v3 import model_card
from modeling_deepseek_v3.checkpoint_io import CheckpointError, atomic_save
from modeling_deepseek_v3.quantization import formats
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter, main
from test_checkpoint import read_folder

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


@pytest.fixture(scope="module")
def fp32_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32") / "model"
    model.save_pretrained(folder)
    return folder


def _copy(folder, tmp_path, name="src") -> Path:
    shutil.copytree(folder, tmp_path / name)
    return tmp_path / name


# ---- converter ------------------------------------------------------------------------------------------------


def test_bf16_weight_with_stale_fp8_scale_is_refused(fp32_folder, tmp_path, capsys):
    DeepseekV3FP8Converter.from_pretrained(fp32_folder).quantize(tmp_path / "fp8", progress=False)
    tensors = read_folder(tmp_path / "fp8")
    scale_key = O_PROJ + "_scale_inv"
    true = formats.dequantize_weight_128x128(tensors[O_PROJ], tensors[scale_key], torch.bfloat16)
    tensors[O_PROJ], tensors[scale_key] = true, tensors[scale_key] * 8  # weight replaced, the old scale left behind
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    for to in ("fp8", "bf16"):
        assert main([str(tmp_path / "fp8"), str(tmp_path / f"out-{to}"), "--to", to, "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert O_PROJ in err and scale_key in err and "BF16, not FP8" in err, err
        assert not (tmp_path / f"out-{to}").exists()


def test_scale_without_weight_is_refused(fp32_folder, tmp_path):
    src = _copy(fp32_folder, tmp_path)
    tensors = read_folder(src)
    tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    del tensors[O_PROJ]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv.*has no weight 'model\.layers\.1\.self_attn\.o_proj\.weight'"):
        DeepseekV3FP8Converter.from_pretrained(src).quantize(tmp_path / "out", progress=False)


@pytest.mark.parametrize("source_dtype, to", [(torch.float32, "bf16"), (torch.bfloat16, "fp32"), (torch.float32, "fp16")])
def test_high_precision_target_casts_every_tensor(model, tmp_path, source_dtype, to):
    """config.json declares the requested dtype; the tensors must be in it (the router bias stays fp32)."""
    src = tmp_path / "src"
    build_model(tiny_config()).to(source_dtype).save_pretrained(src)
    assert main([str(src), str(tmp_path / "out"), "--to", to, "--no-progress"]) == 0
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[to]
    tensors = read_folder(tmp_path / "out")
    for key, tensor in tensors.items():
        expected = torch.float32 if key.endswith("e_score_correction_bias") else dtype
        assert tensor.dtype == expected, (key, tensor.dtype)
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == str(dtype).removeprefix("torch.")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert loaded.model.embed_tokens.weight.dtype == dtype


def test_file_prefix_on_single_file_source_writes_an_index_and_loads(model, fp32_folder, tmp_path):
    DeepseekV3FP8Converter.from_pretrained(fp32_folder).quantize(tmp_path / "out", file_prefix="x", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors*")) == ["model.safetensors.index.json",
                                                                                  "x-model.safetensors"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=0.1)  # within FP8 error


def test_in_memory_source_leaves_no_temporary_copy(model, tmp_path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    converter = DeepseekV3FP8Converter.from_pretrained(model)
    with pytest.raises(FileExistsError, match="full is not empty"):
        converter.quantize(tmp_path / "full", progress=False)
    assert list(temp.iterdir()) == []
    converter.quantize(tmp_path / "out", progress=False)  # the same converter still works after the refusal
    assert list(temp.iterdir()) == []
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_index_with_shards_in_a_subfolder(fp32_folder, tmp_path):
    src = tmp_path / "src"
    build_model(tiny_config()).save_pretrained(src, max_shard_size="100KB")
    index = json.load(open(src / "model.safetensors.index.json"))
    (src / "sub").mkdir()
    for shard in set(index["weight_map"].values()):
        os.replace(src / shard, src / "sub" / shard)
    index["weight_map"] = {k: f"sub/{v}" for k, v in index["weight_map"].items()}
    json.dump(index, open(src / "model.safetensors.index.json", "w"))
    transformers.AutoModelForCausalLM.from_pretrained(src)  # the loader accepts this layout
    assert main([str(src), str(tmp_path / "out"), "--to", "fp8", "--no-progress"]) == 0
    assert (tmp_path / "out" / "sub").is_dir() and not list((tmp_path / "out").glob("model-*"))
    # and again over the existing output: the sub-folder is merged file by file
    assert main([str(src), str(tmp_path / "out"), "--to", "fp8", "--no-progress", "--overwrite"]) == 0
    out_index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert set(out_index["weight_map"].values()) == set(index["weight_map"].values())
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---- model card ----------------------------------------------------------------------------------------------

_PLACEHOLDER = ("This is the model card of a 🤗 transformers model that has been pushed on the Hub. "
                "This model card has been automatically generated.")


def _placeholder(**data) -> str:
    card_data = ModelCardData(tags=["my-tag"], library_name="transformers", **data)
    return str(ModelCard.from_template(card_data, model_description=_PLACEHOLDER))


def test_edited_transformers_placeholder_is_kept(model, tmp_path):
    text = _placeholder(license="mit") + "\nNotes: trained on my data.\n"
    (tmp_path / "README.md").write_text(text, encoding="utf-8")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == text


def test_untouched_transformers_placeholder_is_replaced(model, tmp_path):
    (tmp_path / "README.md").write_text(_placeholder(), encoding="utf-8")
    model.save_pretrained(tmp_path)
    assert "import modeling_deepseek_v3" in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_our_card_is_replaced_until_someone_edits_it(tmp_path):
    build_model(tiny_config()).save_pretrained(tmp_path)
    other = build_model(tiny_config(num_hidden_layers=2))
    other.save_pretrained(tmp_path)  # our own card, unmodified: regenerated for the new model
    card = ModelCard.load(tmp_path / "README.md")
    assert "| layers | 2 (" in card.text
    card.data.tags.append("added-by-a-tool")  # a tag added (push_to_hub(tags=...)) leaves it ours
    card.save(tmp_path / "README.md")
    assert model_card.is_generated_card((tmp_path / "README.md").read_text(encoding="utf-8"))
    card.data.license = "mit"
    card.save(tmp_path / "README.md")
    edited = (tmp_path / "README.md").read_text(encoding="utf-8")
    build_model(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == edited


def test_card_of_an_all_dense_model_has_no_experts():
    config = tiny_config(first_k_dense_replace=3)
    text = model_card.build_model_card(build_model(config)).text
    assert "| layers | 3 (3 dense, 0 MoE) |" in text
    assert "per token) +" not in text and "3/8" not in text
    assert "no MoE layers" in text
    counts = model_card.count_parameters(build_model(config))
    assert counts["activated"] == counts["total"]


@pytest.mark.parametrize("kind", ["not utf-8", "folder"])
def test_unreadable_readme_is_the_users(model, tmp_path, kind):
    """A README that is not UTF-8 text cannot be a card a tool wrote: it is kept, and the save goes on."""
    target = tmp_path / "out"
    target.mkdir()
    readme = target / "README.md"
    if kind == "folder":
        readme.mkdir()
        (readme / "notes.txt").write_text("mine")
    else:
        readme.write_bytes(b"\xff\xfe")
    assert not model_card.may_replace_card(readme)

    def write(tmp):
        model.save_pretrained(Path(tmp) / "inner")  # any content; what matters is the card decision
        model_card.write_card(model, target, tmp)

    atomic_save(target, write)
    assert readme.is_dir() if kind == "folder" else readme.read_bytes() == b"\xff\xfe"
    assert (target / "inner" / "model.safetensors").is_file()


# ---- atomic save with a read-only parent ---------------------------------------------------------------------


def _check_reloads(model, folder):
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_into_writable_folder_under_read_only_parent(model, tmp_path):
    parent = tmp_path / "parent"
    target = parent / "out"
    target.mkdir(parents=True)
    parent.chmod(0o555)
    try:
        if os.geteuid() == 0 or os.access(parent, os.W_OK):
            pytest.skip("chmod does not restrict this user (root): test_read_only_parent_simulated covers the logic")
        model.save_pretrained(target)
        _check_reloads(model, target)
        assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == []
    finally:
        parent.chmod(0o755)


def _refuse_mkdir(monkeypatch, refused):
    """``Path.mkdir`` failing as on a read-only file system for the folders ``refused(path)`` names."""
    original = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if refused(self):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_read_only_parent_simulated(model, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    _refuse_mkdir(monkeypatch, lambda p: p.parent == tmp_path and p.name.startswith(".out.tmp-"))
    model.save_pretrained(target)
    _check_reloads(model, target)
    assert [p.name for p in target.iterdir() if p.name.startswith(".")] == []


def test_nothing_writable_names_the_target(model, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    _refuse_mkdir(monkeypatch, lambda p: p.name.startswith((".out.tmp-", ".tmp-save-")))
    with pytest.raises(PermissionError, match=rf"Cannot save into {target}: neither its parent folder {tmp_path} nor "
                                              r"the folder itself is writable"):
        model.save_pretrained(target)
    _refuse_mkdir(monkeypatch, lambda p: p.name.startswith(".new.tmp-"))
    with pytest.raises(PermissionError, match=rf"Cannot save into {tmp_path / 'new'}: its parent folder .* is not writable"):
        model.save_pretrained(tmp_path / "new")
