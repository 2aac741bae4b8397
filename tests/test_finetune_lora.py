"""LoRA with PEFT: over the kept-FP8 base (FP8Linear), on the stacked routed experts (target_parameters), merging
both ways into the official layout, and the target checks.

Ground truth: the base model without adapters, PEFT's own LoRA layer over the dequantized base, transformers'
``DeepseekV3ForCausalLM`` reading the merged folder, and fp32 references of the FP8 GEMMs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from conftest import build_model, relative_error, tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from modeling_deepseek_v3 import DeepseekV3FP8Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.lora import merge_and_unload, prepare_lora_config
from modeling_deepseek_v3.quantization import FP8Linear, FP8TrainingLinear, formats
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter
from modeling_deepseek_v3.quantization.linear import fp8_grouped_linear_frozen, quantize_expert_weights
from modeling_deepseek_v3.quantization.lora import FP8LoraLinear

MLA = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def ids_batch(seed=1, batch=2, length=12):
    return torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def train(model, ids, steps=4, lr=1e-2):
    """A few AdamW steps on the trainable parameters; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def load_fp8(folder, dequantize=False):
    return DeepseekV3ForCausalLM.from_pretrained(
        folder, quantization_config=DeepseekV3FP8Config(dequantize=dequantize), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_lora")
    build_model(tiny_config(num_hidden_layers=2)).save_pretrained(root / "fp32")
    DeepseekV3FP8Converter.from_pretrained(root / "fp32").quantize(root / "fp8", progress=False)
    return root / "fp8"


@pytest.fixture(scope="module")
def trained_fp8(fp8_folder):
    """LoRA on the MLA projections of the FP8 model, after a few steps: (peft model, losses, frozen snapshot,
    first-backward record, base logits)."""
    model = load_fp8(fp8_folder)
    ids = ids_batch()
    with torch.no_grad():
        base_logits = model(ids).logits
    frozen = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
    peft_model = get_peft_model(model, prepare_lora_config(model, LoraConfig(r=4, lora_alpha=8, target_modules=MLA)))
    with torch.no_grad():
        init_logits = peft_model(ids).logits

    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    graph, seen, stack = set(), set(), [loss.grad_fn]
    while stack:  # the backward graph's node types
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            graph.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    loss.backward()
    with_grad = {n: p.grad.abs().sum().item() for n, p in peft_model.named_parameters() if p.grad is not None}
    peft_model.zero_grad()
    losses = train(peft_model, ids, steps=3)
    return dict(model=peft_model, ids=ids, base_logits=base_logits, init_logits=init_logits, frozen=frozen,
                graph=graph, with_grad=with_grad, losses=losses)


def test_fp8_linear_backward_is_the_fp8_dgrad():
    torch.manual_seed(0)
    fp8 = FP8Linear.from_linear(torch.nn.Linear(300, 200, bias=False))
    x = torch.randn(7, 300, requires_grad=True)
    grad_out = torch.randn(7, 200)
    fp8(x).backward(grad_out)
    # the Dgrad of the FP8 training layer over the same blocks (its master weight dequantizes to the same bytes)
    training = FP8TrainingLinear(300, 200, bias=False)
    training.weight.data.copy_(fp8.dequantize_weight(torch.float32))
    x_ref = x.detach().clone().requires_grad_(True)
    training(x_ref).backward(grad_out)
    assert torch.equal(x.grad, x_ref.grad)
    assert relative_error(x.grad, grad_out @ fp8.dequantize_weight(torch.float32)) < 0.05  # fp32 reference
    assert fp8.weight.grad is None and fp8.weight_scale_inv.grad is None

    weight = torch.randn(4, 200, 300) * 0.05
    q, s = quantize_expert_weights(weight, False)
    tokens_per_expert = torch.tensor([3, 0, 5, 2])
    x_sorted = torch.randn(10, 300, requires_grad=True)
    grad_out = torch.randn(10, 200)
    fp8_grouped_linear_frozen(x_sorted, tokens_per_expert, q, s).backward(grad_out)
    dense = torch.stack([formats.dequantize_weight_128x128(q[e], s[e]) for e in range(4)])
    expert_of_row = torch.repeat_interleave(torch.arange(4), tokens_per_expert)
    assert relative_error(x_sorted.grad, torch.einsum("tn,tnk->tk", grad_out, dense[expert_of_row])) < 0.05


def test_lora_over_fp8_starts_at_the_base_and_trains_only_the_adapters(trained_fp8):
    run = trained_fp8
    assert torch.equal(run["init_logits"], run["base_logits"])  # B = 0 at initialisation
    assert run["losses"][-1] < run["losses"][0]
    # gradients: adapters only, and they reach the first layer through every FP8 layer after it
    assert run["with_grad"] and all(".lora_" in name for name in run["with_grad"])
    assert run["with_grad"]["base_model.model.model.layers.0.self_attn.q_a_proj.lora_B.default.weight"] > 0
    assert {"FrozenFP8LinearFunctionBackward", "FrozenFP8GroupedLinearFunctionBackward"} <= run["graph"]
    # the base is untouched: FP8 bytes, scales, embeddings, norms, routers
    assert any(p.dtype == torch.float8_e4m3fn for _, p, _ in run["frozen"])
    for name, tensor, before in run["frozen"]:
        assert torch.equal(tensor.detach().view(torch.uint8), before.view(torch.uint8)), name
    layer = run["model"].base_model.model.model.layers[0].self_attn.q_a_proj
    assert isinstance(layer, FP8LoraLinear) and isinstance(layer.base_layer, FP8Linear)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # never the e4m3 storage dtype


def test_fp8_lora_layer_adds_exactly_the_low_rank_update(trained_fp8):
    layer = trained_fp8["model"].base_model.model.model.layers[1].self_attn.kv_b_proj
    x = torch.randn(5, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        update = layer(x) - layer.base_layer(x)
    assert relative_error(update, x @ a.t() @ b.t() * layer.scaling["default"]) < 1e-5


def test_dequantize_merge_saves_what_transformers_reads(trained_fp8, fp8_folder, tmp_path):
    run = trained_fp8
    with torch.no_grad():
        lora_logits = run["model"](run["ids"]).logits
    run["model"].save_pretrained(tmp_path / "adapter")
    merged = merge_and_unload(copy.deepcopy(run["model"]), fp8="dequantize", dtype=torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in merged.modules())
    with torch.no_grad():
        merged_logits = merged(run["ids"]).logits
    # ground truth: PEFT's own LoRA layer over the dequantized base, with the same adapter weights
    reference = PeftModel.from_pretrained(load_fp8(fp8_folder, dequantize=True), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert relative_error(merged_logits, reference(run["ids"]).logits) < 1e-5
    assert relative_error(merged_logits, lora_logits) < 0.1  # the FP8 activation rounding the merge leaves out

    merged.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.float32
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys and not any(k.endswith("_scale_inv") for k in keys)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative_error(theirs(run["ids"]).logits, merged_logits) < 1e-5


def test_requantize_merge_stays_fp8_within_the_e4m3_bound(trained_fp8, fp8_folder, tmp_path):
    peft_model = copy.deepcopy(trained_fp8["model"])
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, FP8LoraLinear)}
    exact = {}
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
        exact[name] = layer.base_layer.dequantize_weight(torch.float32) + b @ a * layer.scaling["default"]
    merged = merge_and_unload(peft_model, fp8="requantize")
    for name, layer in layers.items():
        stored = layer.base_layer
        assert isinstance(stored, FP8Linear) and stored.weight.dtype == torch.float8_e4m3fn
        block_scale = formats.expand_weight_scale(stored.weight_scale_inv, tuple(stored.weight.shape))
        error = (stored.dequantize_weight(torch.float32) - exact[name]).abs()
        # half an e4m3 step: 2^-4 relative in the normal range, 2^-10 of the block scale among the subnormals
        bound = torch.maximum(exact[name].abs() * 2.0**-4, block_scale * 2.0**-10) * (1 + 1e-6)
        assert bool((error <= bound).all()), name
        assert layer.merge_report["weight_relative_error"] < 2.0**-4
    with torch.no_grad():
        merged_logits = merged(trained_fp8["ids"]).logits

    merged.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "fp8"
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.float8_e4m3fn
        assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in handle.keys()
        assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in handle.keys()
    with torch.no_grad():
        assert torch.equal(load_fp8(tmp_path / "merged")(trained_fp8["ids"]).logits, merged_logits)


def test_unmerge_restores_the_fp8_bytes_and_adapters_reload_over_fp8(trained_fp8, fp8_folder, tmp_path):
    peft_model = copy.deepcopy(trained_fp8["model"])
    layer = peft_model.base_model.model.model.layers[1].self_attn.o_proj
    original = layer.base_layer
    layer.merge()
    assert layer.merged and layer.base_layer is not original
    layer.unmerge()
    assert layer.base_layer is original and not layer.merged

    peft_model.save_pretrained(tmp_path / "adapter")
    base = load_fp8(fp8_folder)
    config = prepare_lora_config(base, LoraConfig.from_pretrained(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter", config=config).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(trained_fp8["ids"]).logits, peft_model(trained_fp8["ids"]).logits)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_stacked_experts_lora_starts_at_the_base(implementation):
    model = build_model(tiny_config(num_hidden_layers=2))
    model.set_experts_implementation(implementation)
    ids = ids_batch()
    with torch.no_grad():
        base = model(ids).logits
    peft_model = get_peft_model(model, prepare_lora_config(model, LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS)))
    experts = peft_model.base_model.model.model.layers[1].mlp.experts
    assert experts.lora_A["default"].weight.shape == (2 * 8, 32)  # rank 2 for each of the 8 experts (down_proj)
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, base)


def test_stacked_experts_lora_trains_merges_and_saves_per_expert(tmp_path):
    model = build_model(tiny_config(num_hidden_layers=2))
    ids = ids_batch()
    experts_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp.experts." in n}
    config = prepare_lora_config(model, LoraConfig(r=4, lora_alpha=8, target_modules=MLA, target_parameters=EXPERTS))
    peft_model = get_peft_model(model, config)
    losses = train(peft_model, ids, steps=3)
    assert losses[-1] < losses[0]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for name, param in peft_model.get_base_model().named_parameters():
        key = name.replace(".base_layer", "")
        if key in experts_before:
            assert torch.equal(param, experts_before[key]), name
    with torch.no_grad():
        lora_logits = peft_model(ids).logits
    merged = merge_and_unload(peft_model)
    assert isinstance(merged, DeepseekV3ForCausalLM)
    assert any(not torch.equal(merged.state_dict()[n], t) for n, t in experts_before.items())
    with torch.no_grad():
        merged_logits = merged(ids).logits
    assert relative_error(merged_logits, lora_logits) < 1e-5

    merged.save_pretrained(tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert {f"model.layers.1.mlp.experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")} <= keys
    assert not any("gate_up_proj" in k or "lora" in k for k in keys)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert relative_error(theirs(ids).logits, merged_logits) < 1e-5


@pytest.mark.parametrize(
    "targets, message",
    [
        (dict(target_modules=["q_a_proj", "q_typo_proj"]), "'q_typo_proj' matches no module"),
        (dict(target_modules=["experts"]), "target_parameters=\\['mlp.experts.gate_up_proj'"),
        (dict(target_modules=["q_a_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.typo"]),
         "'mlp.experts.typo' matches no parameter"),
        (dict(target_modules=[], target_parameters=["mlp.experts.0.gate_proj.weight"]),
         "'mlp.experts.0.gate_proj.weight' matches no parameter.*experts are stacked"),
    ],
)
def test_bad_targets_are_named(targets, message):
    model = build_model(tiny_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match=message):
        prepare_lora_config(model, LoraConfig(r=2, **targets))


def test_lora_on_fp8_experts_is_refused_naming_the_parameter(fp8_folder):
    model = load_fp8(fp8_folder)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts\.(gate_up|down)_proj' is stored in FP8"):
        prepare_lora_config(model, LoraConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    # PEFT turns target_modules gate_proj/up_proj/down_proj into the stacked expert parameters: refused in dispatch
    with pytest.raises(ValueError, match=r"parameter model\.layers\.1\.mlp\.experts\.(gate_up|down)_proj: .* stored in FP8"):
        get_peft_model(model, prepare_lora_config(model, LoraConfig(r=2, target_modules=["q_a_proj", "gate_proj", "up_proj"])))


def test_lora_options_fp8_layers_do_not_implement_are_named(fp8_folder):
    model = load_fp8(fp8_folder)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_a_proj'.*`use_dora`"):
        get_peft_model(model, prepare_lora_config(model, LoraConfig(r=2, target_modules=["q_a_proj"], use_dora=True)))
