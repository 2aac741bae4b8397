"""The released config.json of each DeepSeek-V3-architecture family, shrunk to a tiny size with every structural choice
kept, as a random checkpoint in the released layout: loaded through the Auto classes after `import
modeling_deepseek_v3`, it must be our model and give transformers' own DeepseekV3ForCausalLM's numbers on the same
folder (fp32).

Families (tests/fixtures holds their released config.json): DeepSeek-V3 (R1, V3-0324 and V3.1 ship the same
structure: 8 expert groups of which 4 are kept, YaRN with mscale / mscale_all_dim, three dense layers, one MTP module,
the FP8 block quantization_config), Kimi K2 (model_type "kimi_k2", 384 experts in one group, YaRN at theta 50000 with
equal betas, no MTP module, FP8), Moonlight-16B-A3B (no q-LoRA, plain RoPE, 2 shared experts, no
num_nextn_predict_layers field) and a DeepSeek-V3 with the remaining switches flipped (norm_topk_prob false,
routed_scaling_factor 1, 2 shared experts, rope_scaling null, tied embeddings beside the MTP module).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_model, relative_error

from modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV3Model
from modeling_deepseek_v3.plugins.attention.mla import MultiHeadLatentAttention
from modeling_deepseek_v3.quantization.converter import main as convert

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASED = {name: json.loads((FIXTURES / file).read_text()) for name, file in [
    ("deepseek-v3", "deepseek_v3_official_config.json"),
    ("kimi-k2", "kimi_k2_config.json"),
    ("moonlight-16b-a3b", "moonlight_16b_a3b_config.json"),
]}
OTHER = {k: v for k, v in RELEASED["deepseek-v3"].items() if k != "quantization_config"}
RELEASED["deepseek-v3-other-switches"] = OTHER | dict(norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
                                                      rope_scaling=None, tie_word_embeddings=True)
VOCAB = 160
ORIGINAL_MAX = 16  # YaRN's original_max_position_embeddings, shrunk; the prompts below run past it
MODES = ("expanded", "absorbed", "auto")


def shrink(released: dict) -> dict:
    """The released fields, tiny: widths, depth (two MoE layers after the dense ones) and the vocabulary shrink; the
    expert groups, top-k, scoring, YaRN block (factor, betas, mscales), MTP depth, quantization_config, auto_map,
    torch_dtype and model_type stay as released (Kimi K2 keeps its 384 experts)."""
    config = copy.deepcopy(released)
    config.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=8, num_attention_heads=4,
                  num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                  vocab_size=VOCAB, num_hidden_layers=released["first_k_dense_replace"] + 2)
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(field) is not None:
            config[field] %= VOCAB
    if config["q_lora_rank"] is not None:
        config["q_lora_rank"] = 24
    if config["n_routed_experts"] != 384:
        config["n_routed_experts"] = max(4 * config["n_group"], 16)  # 4 experts per group, as top-k needs
    if config["rope_scaling"]:
        config["rope_scaling"]["original_max_position_embeddings"] = ORIGINAL_MAX
        config["max_position_embeddings"] = int(ORIGINAL_MAX * config["rope_scaling"]["factor"])
    else:
        config["max_position_embeddings"] = 256
    return config


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=1))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (released-layout folder, fp32 folder transformers' class reads, the shrunk released config)."""
    out = {}
    for name, released in RELEASED.items():
        root = tmp_path_factory.mktemp(name)
        config = shrink(released)
        plugin_fields = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map", "architectures")}
        build_model(DeepseekV3Config(**plugin_fields)).save_pretrained(root / "hp")
        write_config(root / "hp", {k: v for k, v in config.items() if k != "quantization_config"})
        folder = reference = root / "hp"
        if "quantization_config" in config:
            # as released: FP8 projections with their block scales, written by the converter's command line
            assert convert([str(root / "hp"), str(root / "fp8"), "--to", "fp8", "--no-progress"]) == 0
            write_config(root / "fp8", config)
            assert convert([str(root / "fp8"), str(root / "fp32"), "--to", "fp32", "--no-progress"]) == 0
            folder, reference = root / "fp8", root / "fp32"
        if config["model_type"] != "deepseek_v3":
            # transformers' class keeps "kimi_k2" on its config and then misses the expert stacking keyed by
            # "deepseek_v3" (its experts stay random): it reads the same tensors under the type it knows
            shutil.copytree(reference, root / "as_deepseek_v3")
            write_config(root / "as_deepseek_v3", json.loads((reference / "config.json").read_text()) | {"model_type": "deepseek_v3"})
            reference = root / "as_deepseek_v3"
        out[name] = folder, reference, config
    return out


def set_mla_mode(model, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.mode = mode


def load_pair(families, name):
    folder, reference, _ = families[name]
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(reference, dtype=torch.float32, attn_implementation="eager")
    assert type(ours) is DeepseekV3ForCausalLM
    return ours.eval(), theirs.eval()


def random_ids(batch, length, seed=0):
    return torch.randint(2, VOCAB - 10, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(RELEASED))
@torch.no_grad()
def test_logits_loss_and_greedy_decoding_match_transformers_in_every_mla_mode(families, name):
    ours, theirs = load_pair(families, name)
    config = families[name][2]
    assert ours.config.rope_parameters == theirs.config.rope_parameters
    ids = random_ids(2, 3 * ORIGINAL_MAX)  # YaRN past the original context
    expected = theirs(ids, labels=ids)
    prompt = ids[:, : ORIGINAL_MAX + 4]
    tokens = {cache: theirs.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation=cache)
              for cache in ("dynamic", "static")}
    for mode in MODES:
        set_mla_mode(ours, mode)
        got = ours(ids, labels=ids)
        assert relative_error(got.logits, expected.logits) < 1e-5, mode
        assert torch.allclose(got.loss, expected.loss, rtol=1e-5), mode
        for cache, want in tokens.items():
            assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation=cache), want), (mode, cache)
    # the whole extended context, up to max_position_embeddings
    long_ids = random_ids(1, config["max_position_embeddings"], seed=1)
    assert relative_error(ours(long_ids).logits, theirs(long_ids).logits) < 1e-5
    # the MTP modules the file declares (Moonlight's has no field: transformers' and DeepSeek's default of 1)
    depth = config.get("num_nextn_predict_layers", 1)
    assert len(ours.model.layers) == config["num_hidden_layers"] + depth
    assert len(theirs.model.layers) == config["num_hidden_layers"]


def test_kimi_k2_loads_through_every_auto_class(families, tmp_path):
    # transformers reads "kimi_k2" as "deepseek_v3" only inside Kimi K2.5's config; AutoConfig refused the folder
    # (its auto_map asked to run remote code that is not there)
    folder, reference, _ = families["kimi-k2"]
    config = transformers.AutoConfig.from_pretrained(folder)
    assert type(config) is DeepseekV3Config and config.model_type == "deepseek_v3"
    assert config.n_routed_experts == 384 and config.n_group == 1 and config.routed_scaling_factor == 2.827
    assert type(transformers.AutoModel.from_pretrained(folder, dtype=torch.float32)) is DeepseekV3Model
    # the model card tells users to pass trust_remote_code=True: the package's class is still the one used
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True).eval()
    assert type(ours) is DeepseekV3ForCausalLM
    direct = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # the class itself too
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    ids = random_ids(2, 24)
    with torch.no_grad():
        assert relative_error(ours(ids).logits, theirs(ids).logits) < 1e-5
        assert torch.equal(direct(ids).logits, ours(ids).logits)
    # saved, it is a deepseek_v3 folder that transformers' own class reads as it is
    ours.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "deepseek_v3"
    reread = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reread(ids).logits, theirs(ids).logits)
    # relatives transformers implements itself are still refused
    write_config(tmp_path / "saved", json.loads((tmp_path / "saved" / "config.json").read_text()) | {"model_type": "deepseek_v32"})
    with pytest.raises(ValueError, match="which transformers implements as another architecture"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("name", list(RELEASED))
def test_save_round_trip_is_read_by_transformers_class(families, name, tmp_path):
    ours, theirs = load_pair(families, name)
    ours.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    released = families[name][2]
    assert saved["model_type"] == "deepseek_v3" and saved["tie_word_embeddings"] == released["tie_word_embeddings"]
    assert (saved.get("rope_scaling") or {}).get("type") == (released["rope_scaling"] or {}).get("type")
    assert "quantization_config" not in saved  # dequantized at load (the default without CUDA): a plain folder
    reread = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32, attn_implementation="eager").eval()
    ours_again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    ids = random_ids(2, 20)
    with torch.no_grad():
        expected = theirs(ids).logits
        assert torch.equal(reread(ids).logits, expected)
        assert relative_error(ours_again(ids).logits, expected) < 1e-6
    if released["tie_word_embeddings"]:
        assert ours_again.lm_head.weight is ours_again.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2"])
def test_fp8_folder_mtp_module_and_converter_round_trip(families, name, tmp_path):
    folder, reference, config = families[name]
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    plain = DeepseekV3ForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    # every tensor, the MTP module's included, is the dequantized checkpoint's
    for (key, a), (_, b) in zip(ours.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    if config["num_nextn_predict_layers"]:
        ids = random_ids(1, 12)
        with torch.no_grad():
            assert torch.equal(ours.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True),
                               ours.generate(ids, max_new_tokens=6, do_sample=False))
        ours.train()
        assert torch.isfinite(ours(ids, labels=ids).mtp_loss)
    # the converter's bf16 output of the released FP8 folder keeps the released fields and loads in both classes
    assert convert([str(folder), str(tmp_path / "bf16"), "--to", "bf16", "--no-progress"]) == 0
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in written and written["rope_scaling"] == config["rope_scaling"]
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert type(bf16) is DeepseekV3ForCausalLM and bf16.dtype == torch.bfloat16
