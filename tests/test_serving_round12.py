"""Folders handed to vLLM or SGLang: every save a user reaches (bf16, FP8 kept, LoRA merged into FP8 or bf16,
dequantized, the converter's outputs, MTP after fine-tuning, a classification head) checked against what the
DeepSeek-V2/V3 loaders of those servers read. They cannot run here (no GPU), so `serving_problems` states their
conventions, as read in their model files, in our own terms; each check says which convention it encodes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import transformers
from conftest import build_model, edit_json, edit_tensors, tiny_config
from safetensors import safe_open

from modeling_deepseek_v3 import DeepseekV3FP8Config
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from modeling_deepseek_v3.lora import merge_and_unload, prepare_lora_config  # noqa: E402

SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# The MTP module's own tensors beside its decoder layer. The servers' MTP loaders take the embedding and the head from
# these copies (vLLM), or the norm, enorm, hnorm and eh_proj from here and the embedding and head from the main model
# (SGLang's NextN): a folder must hold all six.
MTP_EXTRAS = ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
              "shared_head.head.weight")


def read_headers(folder) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    out[key] = (piece.get_dtype(), list(piece.get_shape()))
    return out


def expected_names(config: dict, head: str) -> tuple[set[str], set[str]]:
    """The tensor names the servers' DeepSeek-V3 class builds parameters for, and the subset of `.weight`s their FP8
    method quantizes. Their loader looks every checkpoint name up among its parameters, so a name outside this set
    is an error (or, for a `.bias` of a projection they build without one, silently dropped), and one of these
    missing is an error for a plain folder and an uninitialised parameter for an FP8 one."""
    n, depth = config["num_hidden_layers"], config.get("num_nextn_predict_layers", 0)
    names = {"model.embed_tokens.weight", "model.norm.weight", f"{head}.weight"}
    quantized = set()
    for i in range(n + depth):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.kv_a_layernorm.weight"}
        linears = ["self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj"]
        if config["q_lora_rank"] is not None:
            linears += ["self_attn.q_a_proj", "self_attn.q_b_proj"]
            names.add(p + "self_attn.q_a_layernorm.weight")
        else:
            linears.append("self_attn.q_proj")
        if i < config["first_k_dense_replace"]:
            linears += [f"mlp.{w}_proj" for w in ("gate", "up", "down")]
        else:
            names.add(p + "mlp.gate.weight")  # the router: built without quantization
            if config["topk_method"] == "noaux_tc":  # the correction bias exists only for this method
                names.add(p + "mlp.gate.e_score_correction_bias")
            linears += [f"mlp.shared_experts.{w}_proj" for w in ("gate", "up", "down")]
            linears += [f"mlp.experts.{e}.{w}_proj" for e in range(config["n_routed_experts"]) for w in ("gate", "up", "down")]
        if i >= n:
            names |= {p + extra for extra in MTP_EXTRAS}  # eh_proj, the embedding and the head stay unquantized
        quantized |= {p + linear + ".weight" for linear in linears}
    return names | quantized, quantized


def serving_problems(folder, head: str = "lm_head") -> list[str]:
    """What would make vLLM's or SGLang's DeepSeek-V3 loader fail on ``folder`` or load it wrong, one line each."""
    config = json.loads((folder / "config.json").read_text())
    headers = read_headers(folder)
    problems = []
    n, depth = config["num_hidden_layers"], config.get("num_nextn_predict_layers", 0)
    names, quantized = expected_names(config, head)
    block = config.get("quantization_config")
    fp8 = block is not None
    if fp8:
        # their FP8 config: `quant_method` containing "fp8", `activation_scheme` present and "dynamic" for block
        # scales, `weight_block_size` a list of two ints (the scales' tile); no other method is the released one
        if block.get("quant_method") != "fp8" or block.get("activation_scheme") != "dynamic" or block.get("fmt") != "e4m3":
            problems.append(f"quantization_config {block} is not the FP8 block")
        size = block.get("weight_block_size")
        if not (isinstance(size, list) and len(size) == 2 and all(type(b) is int for b in size)):
            problems.append(f"weight_block_size {size!r} is not a list of two ints")
        names |= {w.removesuffix("weight") + "weight_scale_inv" for w in quantized}
    if head != "lm_head":
        # a pooling model built from the causal LM drops its head; MTP layers are skipped by the main model (below)
        names = {k for k in names if not any(k.startswith(f"model.layers.{n + d}.") for d in range(depth))}
    for key in sorted(set(headers) - names):
        # names under layer N + k (k < num_nextn_predict_layers) are the MTP loader's and the main model skips them;
        # a classification folder need not hold all of them (no server drafts for a pooling model)
        if head != "lm_head" and any(key.startswith(f"model.layers.{n + d}.") for d in range(depth)):
            continue
        problems.append(f"unexpected tensor {key}")
    problems += [f"missing tensor {key}" for key in sorted(names - set(headers))]
    dtype = SAFETENSORS_DTYPE[config.get("dtype") or config.get("torch_dtype")]
    for key, (stored, shape) in headers.items():
        if key.endswith("e_score_correction_bias"):
            want = "F32"  # built as an fp32 parameter, as released
        elif key.endswith("weight_scale_inv"):
            want = "F32"  # their block-scale parameter is fp32
            weight = headers.get(key.removesuffix("_scale_inv"))
            if weight is not None and shape != [math.ceil(weight[1][0] / 128), math.ceil(weight[1][1] / 128)]:
                problems.append(f"{key} has grid {shape} for weight {weight[1]}")
        elif fp8 and key in quantized:
            want = "F8_E4M3"  # an FP8 folder's quantized layers are e4m3 with their scales
        else:
            want = dtype  # the dtype config.json declares ("auto" serves in it)
        if stored != want:
            problems.append(f"{key} is {stored}, expected {want}")
    problems += config_problems(config, folder)
    return problems


def config_problems(config: dict, folder) -> list[str]:
    """config.json fields the servers read, with the types they read them as."""
    problems = []
    if config.get("model_type") != "deepseek_v3":
        problems.append(f"model_type {config.get('model_type')!r}")
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and architectures[0].startswith("DeepseekV3For")):
        problems.append(f"architectures {architectures!r}")  # the registry key that picks their class
    for field in ("n_group", "topk_group", "n_routed_experts", "num_experts_per_tok", "first_k_dense_replace",
                  "moe_intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "num_nextn_predict_layers"):
        if type(config.get(field)) is not int:
            problems.append(f"{field} {config.get(field)!r} is not an int")
    if not isinstance(config.get("routed_scaling_factor"), (int, float)) or isinstance(config.get("routed_scaling_factor"), bool):
        problems.append(f"routed_scaling_factor {config.get('routed_scaling_factor')!r}")
    if config.get("scoring_func") not in ("sigmoid", "softmax"):
        problems.append(f"scoring_func {config.get('scoring_func')!r}")  # read as given; a null falls to softmax
    if config.get("topk_method") not in ("noaux_tc", "greedy"):
        problems.append(f"topk_method {config.get('topk_method')!r}")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        # servers on transformers 4 (and SGLang's own reader) take YaRN from the legacy block: `type`, a float
        # `factor`, `original_max_position_embeddings`, and the mscales the softmax scale uses
        legacy = config.get("rope_scaling")
        if not isinstance(legacy, dict) or legacy.get("type") != rope["rope_type"]:
            problems.append(f"rope_scaling {legacy!r} lacks the legacy `type` of {rope['rope_type']!r}")
        elif not isinstance(legacy.get("factor"), (int, float)) or type(legacy.get("original_max_position_embeddings")) is not int:
            problems.append(f"rope_scaling {legacy!r} lacks factor / original_max_position_embeddings")
        elif legacy.get("rope_theta") != rope.get("rope_theta"):
            problems.append(f"rope_scaling's theta {legacy.get('rope_theta')!r} is not {rope.get('rope_theta')!r}")
    for module in {ref.split(".")[0] for ref in (config.get("auto_map") or {}).values()}:
        if not (folder / f"{module}.py").is_file():
            # `--trust-remote-code` makes their config reader import the module auto_map names
            problems.append(f"auto_map names {module}.py, which the folder lacks")
    return problems


# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A bf16 folder with an MTP module, and the converter's FP8 folder of it."""
    root = tmp_path_factory.mktemp("serving")
    build_model(tiny_config(num_nextn_predict_layers=1)).to(torch.bfloat16).save_pretrained(root / "bf16")
    DeepseekV3FP8Converter.from_pretrained(root / "bf16").quantize(root / "fp8", progress=False)
    return root


def fp8_kept(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=DeepseekV3FP8Config(dequantize=False))


def lora_merged(model, fp8):
    config = LoraConfig(r=4, target_modules=["q_a_proj", "kv_b_proj", "o_proj"], init_lora_weights=False)
    if fp8 is None:  # a bf16 base: the routed experts take an update per expert too
        config.target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_model = get_peft_model(model, prepare_lora_config(model, config))
    return merge_and_unload(peft_model) if fp8 is None else merge_and_unload(peft_model, fp8=fp8)


def save_of(case: str, sources, out):
    bf16, fp8 = sources / "bf16", sources / "fp8"
    if case == "bf16":
        transformers.AutoModelForCausalLM.from_pretrained(bf16).save_pretrained(out)
    elif case == "fp8 kept":
        fp8_kept(fp8).save_pretrained(out)
    elif case == "fp8 dequantize()":
        fp8_kept(fp8).dequantize(dtype=torch.bfloat16).save_pretrained(out)
    elif case in ("lora into fp8", "lora into bf16 from fp8"):
        lora_merged(fp8_kept(fp8), "requantize" if case == "lora into fp8" else "dequantize").save_pretrained(out)
    elif case == "lora over bf16":
        lora_merged(transformers.AutoModelForCausalLM.from_pretrained(bf16), None).save_pretrained(out)
    elif case == "convert --to fp8":
        return fp8
    elif case == "convert --to bf16":
        DeepseekV3FP8Converter.from_pretrained(fp8, to="bf16").quantize(out, progress=False)
    elif case == "loaded without mtp":
        transformers.AutoModelForCausalLM.from_pretrained(bf16, num_nextn_predict_layers=0).save_pretrained(out)
    return out


CASES = ["bf16", "fp8 kept", "fp8 dequantize()", "lora into fp8", "lora into bf16 from fp8", "lora over bf16",
         "convert --to fp8", "convert --to bf16", "loaded without mtp"]


@pytest.mark.parametrize("case", CASES)
def test_every_save_a_user_reaches_is_what_the_servers_load(case, sources, tmp_path):
    folder = save_of(case, sources, tmp_path / "out")
    assert serving_problems(folder) == []
    config = json.loads((folder / "config.json").read_text())
    # FP8 stays FP8 where the user kept it, and only there (the servers pick their FP8 method from the block alone)
    assert (config.get("quantization_config") is not None) == (case in ("fp8 kept", "lora into fp8", "convert --to fp8"))
    # the MTP module is served as a draft (speculative decoding) when the config declares it, at layer N
    assert config["num_nextn_predict_layers"] == (0 if case == "loaded without mtp" else 1)
    # their default sampling settings and end-of-sequence token come from generation_config.json
    assert (folder / "generation_config.json").is_file()


def test_the_mtp_module_after_fine_tuning_is_saved_with_current_copies(sources, tmp_path):
    # vLLM's draft model loads its embedding and head from the MTP layer's own copies, not from the main model's:
    # stale copies would draft with the weights before fine-tuning, silently
    model = transformers.AutoModelForCausalLM.from_pretrained(sources / "bf16", dtype=torch.float32).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    model.save_pretrained(tmp_path / "tuned")
    assert serving_problems(tmp_path / "tuned") == []
    n = model.config.num_hidden_layers
    with safe_open(tmp_path / "tuned" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(f"model.layers.{n}.embed_tokens.weight"), model.model.embed_tokens.weight.detach())
        assert torch.equal(f.get_tensor(f"model.layers.{n}.shared_head.head.weight"), model.lm_head.weight.detach())
        assert torch.equal(f.get_tensor(f"model.layers.{n}.eh_proj.weight"), model.model.layers[n].eh_proj.weight.detach())
        assert not torch.equal(f.get_tensor("lm_head.weight"),
                               safe_open(sources / "bf16" / "model.safetensors", "pt").get_tensor("lm_head.weight").float())


def test_a_classification_head_is_the_score_the_pooling_adapter_loads(sources, tmp_path):
    # the servers serve `DeepseekV3ForSequenceClassification` as their causal LM with a bias-free top-level `score`
    # of [num_labels, hidden] (num_labels read from id2label) in place of the head
    model = transformers.AutoModelForSequenceClassification.from_pretrained(sources / "bf16", num_labels=1)
    model.save_pretrained(tmp_path / "reward")
    assert serving_problems(tmp_path / "reward", head="score") == []
    config = json.loads((tmp_path / "reward" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForSequenceClassification"] and len(config["id2label"]) == 1
    assert read_headers(tmp_path / "reward")["score.weight"][1] == [1, model.config.hidden_size]


def test_a_greedy_router_saves_no_correction_bias(tmp_path):
    # the servers build `e_score_correction_bias` for topk_method "noaux_tc" only; any other method's folder holding
    # one fails on the unknown name
    build_model(tiny_config(topk_method="greedy")).save_pretrained(tmp_path / "greedy")
    assert serving_problems(tmp_path / "greedy") == []
    assert json.loads((tmp_path / "greedy" / "config.json").read_text())["scoring_func"] == "softmax"


def test_a_folder_saved_from_the_released_config_drops_its_auto_map(sources, tmp_path):
    # the released config.json names its own configuration_deepseek.py in auto_map; save_pretrained does not copy
    # that code, so a kept auto_map made `trust_remote_code=True` (vLLM's and SGLang's config reader, as their
    # DeepSeek-V3 instructions run it) fail on the missing file
    released = tmp_path / "released"
    released.mkdir()
    for name in ("config.json", "model.safetensors"):
        (released / name).write_bytes((sources / "bf16" / name).read_bytes())
    auto_map = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    edit_json(released / "config.json", lambda c: c.update(auto_map=auto_map))
    assert transformers.AutoConfig.from_pretrained(released).auto_map == auto_map  # read as released
    transformers.AutoModelForCausalLM.from_pretrained(released).save_pretrained(tmp_path / "saved")
    assert serving_problems(tmp_path / "saved") == []
    assert "auto_map" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    config = transformers.PreTrainedConfig.get_config_dict(tmp_path / "saved")[0]
    assert transformers.AutoConfig.for_model(**config).model_type == "deepseek_v3"
    # transformers' own reader with remote code allowed, as the servers call it: the built-in class, no file needed
    assert type(transformers.AutoConfig.from_pretrained(tmp_path / "saved", trust_remote_code=True)).__name__ == "DeepseekV3Config"
    # the converter copies the source's other files, code included, so its output's auto_map stays true
    for module in ("configuration_deepseek", "modeling_deepseek"):
        (released / f"{module}.py").write_text("# the released code\n")
    DeepseekV3FP8Converter.from_pretrained(released).quantize(tmp_path / "converted", progress=False)
    assert serving_problems(tmp_path / "converted") == []
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["auto_map"] == auto_map


def test_the_checks_name_what_a_server_would_trip_on(sources, tmp_path):
    # the conventions above catch each kind of mismatch they are there for
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((sources / "fp8" / name).read_bytes())

    def edit(tensors):
        tensors["model.layers.1.mlp.gate.tokens_per_expert"] = torch.zeros(8, dtype=torch.bfloat16)  # no server builds it
        del tensors["model.layers.2.mlp.experts.7.down_proj.weight_scale_inv"]
        tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"] = tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"].bfloat16()
        tensors["model.layers.1.mlp.gate.e_score_correction_bias"] = tensors["model.layers.1.mlp.gate.e_score_correction_bias"].bfloat16()

    edit_tensors(folder / "model.safetensors", edit)
    edit_json(folder / "config.json", lambda c: (c["quantization_config"].update(weight_block_size=[128.0, 128]),
                                                 c.update(auto_map={"AutoConfig": "configuration_deepseek.X"}, scoring_func=None)))
    assert serving_problems(folder) == [
        "weight_block_size [128.0, 128] is not a list of two ints",
        "unexpected tensor model.layers.1.mlp.gate.tokens_per_expert",
        "missing tensor model.layers.2.mlp.experts.7.down_proj.weight_scale_inv",
        "model.layers.0.self_attn.o_proj.weight_scale_inv is BF16, expected F32",
        "model.layers.1.mlp.gate.e_score_correction_bias is BF16, expected F32",
        "scoring_func None",
        "auto_map names configuration_deepseek.py, which the folder lacks",
    ]
