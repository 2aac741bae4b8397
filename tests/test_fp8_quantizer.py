"""The ``fp8_block`` quantizer plugin: which Linears it swaps, both modes, state-dict conversion, a model training."""

import pytest
import torch
from torch import nn
from conftest import tiny_config

from modeling_deepseek_v3.quantization import (
    FP8BlockQuantizer,
    FP8Linear,
    FP8TrainingLinear,
    dequantize_state_dict,
    is_fp8_eligible,
    quantize_state_dict,
)
from modeling_deepseek_v3.registry import get_plugin, list_plugins


pytestmark = pytest.mark.filterwarnings("ignore:FP8 kernels need a CUDA GPU")


# --------------------------------------------------------------------------------------------------- a model-shaped tree


class Attention(nn.Module):
    def __init__(self, d, q_lora=True):
        super().__init__()
        if q_lora:
            self.q_a_proj = nn.Linear(d, 32, bias=False)
            self.q_a_layernorm = nn.LayerNorm(32)
            self.q_b_proj = nn.Linear(32, d, bias=False)
        else:
            self.q_proj = nn.Linear(d, d, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, 24, bias=False)
        self.kv_a_layernorm = nn.LayerNorm(16)
        self.kv_b_proj = nn.Linear(16, 2 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)


class MLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)


class MoE(nn.Module):
    def __init__(self, d, n_experts=3):
        super().__init__()
        self.gate = nn.Linear(d, n_experts, bias=False)  # the router: stays high precision
        self.experts = nn.ModuleList(MLP(d, 16) for _ in range(n_experts))
        self.shared_experts = MLP(d, 16)


class Layer(nn.Module):
    def __init__(self, d, moe, q_lora=True, mtp=False):
        super().__init__()
        self.self_attn = Attention(d, q_lora)
        self.mlp = MoE(d) if moe else MLP(d, 40)
        self.input_layernorm = nn.LayerNorm(d)
        if mtp:
            self.enorm, self.hnorm = nn.LayerNorm(d), nn.LayerNorm(d)
            self.eh_proj = nn.Linear(2 * d, d, bias=False)


class Inner(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, d)
        self.layers = nn.ModuleList([Layer(d, moe=False), Layer(d, moe=True, q_lora=False), Layer(d, moe=True, mtp=True)])
        self.norm = nn.LayerNorm(d)


class Tree(nn.Module):
    def __init__(self, d=48):
        super().__init__()
        self.model = Inner(d)
        self.lm_head = nn.Linear(d, 50, bias=False)


ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP_NAMES = ["gate_proj", "up_proj", "down_proj"]
EXPECTED = (
    [f"model.layers.0.self_attn.{p}" for p in ATTN]
    + [f"model.layers.0.mlp.{p}" for p in MLP_NAMES]
    + [f"model.layers.1.self_attn.{p}" for p in ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]]
    + [f"model.layers.2.self_attn.{p}" for p in ATTN]
    + [f"model.layers.{i}.mlp.{part}{p}" for i in (1, 2) for part in ["shared_experts.", "experts.0.", "experts.1.", "experts.2."] for p in MLP_NAMES]
)


def linear_names(model, cls):
    return sorted(name for name, m in model.named_modules() if type(m) is cls)


# --------------------------------------------------------------------------------------------------- tests


def test_registered_as_fp8_block():
    assert "fp8_block" in list_plugins()["quantizer"]
    assert get_plugin("quantizer", "fp8_block") is FP8BlockQuantizer


@pytest.mark.parametrize("name", EXPECTED + ["model.layers.61.mlp.experts.255.down_proj", "self_attn.q_proj"])
def test_eligible_names(name):
    assert is_fp8_eligible(name)


@pytest.mark.parametrize(
    "name",
    ["lm_head", "model.embed_tokens", "model.layers.1.mlp.gate", "model.layers.2.eh_proj", "model.layers.0.self_attn.q_a_layernorm",
     "model.layers.0.input_layernorm", "model.layers.3.shared_head.head", "model.layers.1.mlp.experts", "model.layers.1.mlp.experts.0",
     "model.layers.0.self_attn", "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.x.up_proj", "model.layers.0.self_attn.k_proj"],
)
def test_not_eligible_names(name):
    assert not is_fp8_eligible(name)


def test_training_mode_swaps_exactly_the_eligible_linears():
    torch.manual_seed(0)
    model = Tree()
    before = {name: p for name, p in model.named_parameters()}
    x = torch.randn(5, 48)
    ref = model.model.layers[2].mlp.experts[1].down_proj.weight.detach().clone()
    FP8BlockQuantizer(None).apply(model)
    assert linear_names(model, FP8TrainingLinear) == sorted(EXPECTED)
    assert linear_names(model, nn.Linear) == sorted(["lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "model.layers.2.eh_proj"])
    # the same parameters, under the same names: optimizer state and checkpoints are unaffected
    assert {name: p for name, p in model.named_parameters()} == before
    assert torch.equal(model.model.layers[2].mlp.experts[1].down_proj.weight, ref)
    # applying twice changes nothing
    FP8BlockQuantizer(None).apply(model)
    assert linear_names(model, FP8TrainingLinear) == sorted(EXPECTED)
    expert = model.model.layers[1].mlp.experts[2]
    assert isinstance(expert.up_proj, FP8TrainingLinear) and expert.up_proj(x).shape == (5, 16)
    FP8BlockQuantizer.dequantize(model)
    assert linear_names(model, FP8TrainingLinear) == []
    assert {name: p for name, p in model.named_parameters()} == before


def test_inference_mode_stores_the_checkpoint_format():
    torch.manual_seed(0)
    model = Tree()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    FP8BlockQuantizer(None, mode="inference").apply(model)
    assert linear_names(model, FP8Linear) == sorted(EXPECTED)
    sd = model.state_dict()
    scales = sorted(k[: -len(".weight_scale_inv")] for k in sd if k.endswith("weight_scale_inv"))
    assert scales == sorted(EXPECTED)
    for name in EXPECTED:
        assert sd[f"{name}.weight"].dtype == torch.float8_e4m3fn
    assert sd["lm_head.weight"].dtype == torch.float32 and sd["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    # the offline state-dict converter produces the same tensors, and its inverse approximates the dense weights
    converted = quantize_state_dict(dense)
    assert set(converted) == set(sd)
    for key in sd:
        assert torch.equal(converted[key].view(torch.uint8), sd[key].view(torch.uint8)) if sd[key].dtype == torch.float8_e4m3fn \
            else torch.equal(converted[key], sd[key])
    back = dequantize_state_dict(converted, torch.float32)
    assert set(back) == set(dense)
    w = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    assert ((back[w] - dense[w]).norm() / dense[w].norm()) < 0.04
    FP8BlockQuantizer.dequantize(model, torch.float32)
    assert linear_names(model, FP8Linear) == [] and torch.allclose(model.state_dict()[w], back[w])


def test_mode_from_config_and_bad_mode():
    class Cfg:
        fp8_mode = "inference"
        fp8_power_of_two_scales = True

    q = FP8BlockQuantizer(Cfg())
    assert q.mode == "inference" and q.power_of_two_scales
    model = FP8BlockQuantizer(Cfg()).apply(Tree())
    scale = model.model.layers[0].mlp.up_proj.weight_scale_inv
    assert torch.all(torch.frexp(scale)[0] == 0.5)
    with pytest.raises(ValueError, match="fp8_mode"):
        FP8BlockQuantizer(None, mode="int4")


# --------------------------------------------------------------------------------------------------- the real model


def test_tiny_deepseek_v3_trains_with_fp8_block():
    from modeling_deepseek_v3 import DeepseekV3ForCausalLM

    config = tiny_config(quantizer="fp8_block", hidden_size=128, intermediate_size=192, moe_intermediate_size=64)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).float().train()
    swapped = {name for name, m in model.named_modules() if isinstance(m, FP8TrainingLinear)}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert swapped == {name for name in linears if is_fp8_eligible(name)} and len(swapped) > 0
    assert "lm_head" not in swapped and not any(n.endswith("mlp.gate") for n in swapped)
    assert any(n.endswith("self_attn.kv_b_proj") for n in swapped)
    # the stacked routed experts keep their master weights and run the grouped FP8 implementation
    assert model.config._experts_implementation == "deepseek_fp8"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(1, config.vocab_size, (2, 24), generator=gen)
    losses = []
    for _ in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5  # memorizing one batch: the loss falls clearly
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bad_fp8_mode_in_config_names_the_field():
    with pytest.raises(ValueError, match="`fp8_mode`"):
        tiny_config(quantizer="fp8_block", fp8_mode="int4")


@pytest.mark.parametrize("power_of_two", [False, True])
def test_fp8_experts_follow_the_power_of_two_flag(power_of_two):
    # the routed experts of an fp8_block model compute exactly what one FP8TrainingLinear per expert computes with
    # the same scale rounding, whichever experts implementation was configured before the quantizer ran
    from conftest import build_model, relative_error, tiny_config
    from modeling_deepseek_v3.expert_slots import SortedSlots
    from modeling_deepseek_v3.quantization import FP8TrainingLinear

    outputs = []
    for backend in ("eager", "grouped_mm"):
        model = build_model(tiny_config(quantizer="fp8_block", fp8_power_of_two_scales=power_of_two, experts_backend=backend,
                                        hidden_size=128, moe_intermediate_size=128))
        assert model.config._experts_implementation == "deepseek_fp8"
        experts = model.model.layers[1].mlp.experts
        x = torch.randn(10, 128, generator=torch.Generator().manual_seed(0))
        idx = torch.randint(0, 8, (10, 3), generator=torch.Generator().manual_seed(1))
        w = torch.rand(10, 3, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            outputs.append(experts(x, idx, w))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    slots, expected = SortedSlots(idx, 8), torch.zeros(30, 128)
    xs, start = slots.gather(x), 0
    with torch.no_grad():
        for e, end in enumerate(slots.offsets.tolist()):
            if end > start:
                gate_up = nn.Linear(128, 256, bias=False)
                gate_up.weight.copy_(experts.gate_up_proj[e])
                down = nn.Linear(128, 128, bias=False)
                down.weight.copy_(experts.down_proj[e])
                h = FP8TrainingLinear.from_linear(gate_up, power_of_two)(xs[start:end])
                g, u = h.chunk(2, dim=-1)
                expected[start:end] = FP8TrainingLinear.from_linear(down, power_of_two)(torch.nn.functional.silu(g) * u)
            start = end
    assert relative_error(outputs[0], slots.combine(expected, w, x)) < 1e-6
