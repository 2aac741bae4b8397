"""FP8 interop and block-edge shapes: transformers' `FineGrainedFP8Config` and ours on FP8 and bf16 folders, a folder's
`modules_to_not_convert` kept when a config is passed, and the `fp8_block` training path of the routed experts at sizes
that are not multiples of 128, against a plain-PyTorch fake-quant reference written here (not `formats`).

The kernels' half of the edge shapes runs again in a child pytest under the Triton interpreter (`TRITON_INTERPRET=1`,
as in tests/test_fp8_kernels.py): the same reference against the layers dispatched to the kernels."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import FineGrainedFP8Config

from conftest import build_model, run_file_under_triton_interpreter, tiny_config
from modeling_deepseek_v3 import DeepseekV3FP8Config, DeepseekV3ForCausalLM
from modeling_deepseek_v3.checkpoint import CheckpointError
from modeling_deepseek_v3.quantization import formats
from modeling_deepseek_v3.quantization import linear as L
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def relative(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------------ fake-quant reference
# E4M3 with amax/448 scales over (rows × cols) tiles, zero-padded at the edges (ceil division), the scale floored at
# 1e-12/448 and, with power_of_two, rounded up to 2^ceil(log2 scale) (frexp: exact, unlike log2); the GEMMs are plain
# fp32 matmuls of the dequantized operands.


def fake_quant(x: torch.Tensor, rows: int, cols: int, power_of_two: bool) -> torch.Tensor:
    n, k = x.shape
    padded = torch.nn.functional.pad(x.float(), (0, -k % cols, 0, -n % rows))
    tiles = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    scale = tiles.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / 448
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
    q = (tiles / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return q.view_as(padded)[:n, :k]


class FakeQuantLinear(torch.autograd.Function):
    """y = x Wᵀ: x per 1×128 tile, W per 128×128 block; dx with dy per 1×128; dW with dy and x per 128 tokens × 1."""

    @staticmethod
    def forward(ctx, x, weight, power_of_two):
        ctx.save_for_backward(x, weight)
        ctx.power_of_two = power_of_two
        return (fake_quant(x, 1, 128, power_of_two) @ fake_quant(weight, 128, 128, power_of_two).t()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        p2 = ctx.power_of_two
        grad_x = fake_quant(grad, 1, 128, p2) @ fake_quant(weight, 128, 128, p2)
        grad_w = fake_quant(grad, 128, 1, p2).t() @ fake_quant(x, 128, 1, p2)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


def reference_experts(x, top_k_index, top_k_weights, gate_up, down, power_of_two):
    """Each expert on its own tokens: gate_proj, up_proj and down_proj as separate fake-quant Linears (their own
    128×128 blocks, as the checkpoint stores them)."""
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tokens, slot = (top_k_index == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        h = x[tokens]
        gate = FakeQuantLinear.apply(h, gate_up[e, :inter], power_of_two)
        up = FakeQuantLinear.apply(h, gate_up[e, inter:], power_of_two)
        y = FakeQuantLinear.apply(torch.nn.functional.silu(gate) * up, down[e], power_of_two)
        out = out.index_add(0, tokens, y * top_k_weights[tokens, slot, None])
    return out


def routing(num_tokens: int):
    """Expert 0 gets every token, expert 1 one token, experts 3 and 4 the rest; experts 2, 5, 6 and 7 none."""
    index = torch.empty(num_tokens, 3, dtype=torch.long)
    index[:, 0], index[:, 1], index[:, 2] = 0, 3, 4
    index[0, 1] = 1
    weights = torch.rand(num_tokens, 3, generator=torch.Generator().manual_seed(2))
    return index, weights


def experts_against_reference(inter: int, power_of_two: bool, num_tokens: int = 21):
    """The `fp8_block` (train) experts of a model with hidden 200 and `moe_intermediate_size=inter`: forward and
    gradients, and the reference's."""
    config = tiny_config(hidden_size=200, moe_intermediate_size=inter, quantizer="fp8_block",
                         fp8_power_of_two_scales=power_of_two)
    experts = build_model(config).model.layers[1].mlp.experts
    assert config._experts_implementation == "deepseek_fp8"
    x = torch.randn(num_tokens, 200, generator=torch.Generator().manual_seed(1))
    index, weights = routing(num_tokens)
    grad = torch.randn(num_tokens, 200, generator=torch.Generator().manual_seed(3))
    results = []
    for run in ("ours", "reference"):
        xx = x.clone().requires_grad_()
        gate_up = experts.gate_up_proj.detach().clone().requires_grad_()
        down = experts.down_proj.detach().clone().requires_grad_()
        if run == "ours":
            experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(gate_up), torch.nn.Parameter(down)
            gate_up, down = experts.gate_up_proj, experts.down_proj
            out = experts(xx, index, weights)
        else:
            out = reference_experts(xx, index, weights, gate_up, down, power_of_two)
        out.backward(grad)
        results.append((out.detach(), xx.grad, gate_up.grad, down.grad))
    return results


# ------------------------------------------------------------------------------------------------ CPU tests

if not INTERPRETING:

    @pytest.mark.interpreter
    def test_edge_shapes_on_the_triton_kernels_under_the_interpreter():
        run_file_under_triton_interpreter(__file__)

    @pytest.mark.parametrize("inter,power_of_two", [(72, False), (200, False), (72, True), (128, False)])
    def test_fp8_block_experts_train_on_the_checkpoints_blocks(inter, power_of_two):
        """moe_intermediate_size 72 or 200: a 128×128 block of the stacked [2·I, H] gate_up_proj would hold gate and up
        rows; gate and up are quantized on their own blocks, as the dense MLP's and the checkpoint's are. Experts with 0,
        1 and all tokens; forward, dx and both weight gradients against the fake-quant reference."""
        warnings.simplefilter("ignore")  # the once-per-process CPU fallback warning
        ours, ref = experts_against_reference(inter, power_of_two)
        for name, got, want in zip(("out", "grad_x", "grad_gate_up", "grad_down"), ours, ref):
            assert relative(got, want) < 1e-5, (name, relative(got, want))
        inter_rows = slice(0, inter)
        for idle in (2, 5, 6, 7):
            assert torch.equal(ours[2][idle], torch.zeros_like(ours[2][idle]))
        assert ours[2][1, inter_rows].abs().sum() > 0  # the expert with one token learns

    def test_fp8_block_trains_like_the_model_it_saves():
        """A model trained with `fp8_block` at moe_intermediate_size 72 computes what its FP8 inference form
        (`fp8_mode='inference'`, the checkpoint's blocks) computes from the same weights."""
        warnings.simplefilter("ignore")
        config = dict(hidden_size=200, moe_intermediate_size=72, quantizer="fp8_block")
        train = build_model(tiny_config(**config))
        inference = build_model(tiny_config(**config, fp8_mode="inference"))
        with torch.no_grad():
            assert relative(train(IDS).logits, inference(IDS).logits) < 1e-5

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("shape", [(200, 72), (1, 129), (130, 257)])
    def test_training_linear_at_edge_shapes_matches_the_fake_quant_reference(shape, dtype):
        warnings.simplefilter("ignore")
        out_features, in_features = shape
        g = torch.Generator().manual_seed(5)
        layer = L.FP8TrainingLinear(in_features, out_features, bias=False, dtype=dtype)
        x = torch.randn(3, 70, in_features, generator=g).to(dtype)
        grad = torch.randn(3, 70, out_features, generator=g).to(dtype)
        xx, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        weight = layer.weight.detach().clone().requires_grad_()
        y = layer(xx)
        y.backward(grad)
        ref = FakeQuantLinear.apply(xr.view(-1, in_features), weight, False).view(3, 70, out_features)
        ref.backward(grad)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output rounded once, in either order
        for got, want in ((y, ref), (xx.grad, xr.grad), (layer.weight.grad, weight.grad)):
            assert got.dtype == dtype and relative(got, want) < tol

    def test_zero_and_huge_blocks():
        """An all-zero block gets a finite positive scale and zeros (no nan); the largest element of a block maps to
        ±448 and nothing saturates past it, for values near the fp32 and fp16 maxima too."""
        w = torch.randn(130, 200)
        w[:128, :128] = 0
        w[128:, 128:] = 3e38
        w[129, 199] = -3.3e38
        q, s = formats.quantize_weight_128x128(w)
        assert torch.isfinite(s).all() and (s > 0).all() and torch.equal(q[:128, :128].float(), torch.zeros(128, 128))
        back = formats.dequantize_weight_128x128(q, s)
        assert torch.isfinite(back).all() and float(q[129, 199].float()) == -448.0
        assert (back[128:, 128:] / w[128:, 128:] - 1).abs().max() < 0.07  # (a norm of these would overflow)
        x = torch.full((2, 130), 65504.0, dtype=torch.float16)
        q, s = formats.quantize_act_1x128(x)
        assert torch.equal(q.float(), torch.full((2, 130), 448.0))
        assert torch.equal(formats.dequantize_act_1x128(q, s, torch.float16), x)

    # -------------------------------------------------------------------------------------------- folders

    MIXED_KEPT = ("model.layers.1.mlp.shared_experts", "model.layers.2.self_attn.kv_a_proj_with_mqa", "model.layers.1.mlp.experts")

    @pytest.fixture(scope="module")
    def folders(tmp_path_factory):
        """"small": every side at most 128 (transformers' CPU FP8 path reads only whole or single blocks); "mixed":
        sides that are not multiples of 128, FP8 except three modules kept bf16 and listed in its
        `modules_to_not_convert`, as a user's partial FP8 export is."""
        root = tmp_path_factory.mktemp("fp8_interop")
        build_model(tiny_config(num_nextn_predict_layers=1)).to(torch.bfloat16).save_pretrained(root / "small_bf16")
        DeepseekV3FP8Converter.from_pretrained(root / "small_bf16").quantize(root / "small", progress=False)
        odd = tiny_config(hidden_size=200, kv_lora_rank=72, qk_rope_head_dim=16, q_lora_rank=136, intermediate_size=260,
                          moe_intermediate_size=72, num_nextn_predict_layers=1)
        build_model(odd).to(torch.bfloat16).save_pretrained(root / "odd_bf16")
        DeepseekV3FP8Converter.from_pretrained(root / "odd_bf16").quantize(root / "mixed", progress=False)
        tensors = load_file(root / "mixed" / "model.safetensors")
        for key in [k for k in tensors if k.startswith(MIXED_KEPT) and k.endswith(".weight")]:
            scale = tensors.pop(key[: -len("weight")] + "weight_scale_inv")
            tensors[key] = formats.dequantize_weight_128x128(tensors[key], scale, torch.bfloat16)
        save_file(tensors, root / "mixed" / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((root / "mixed" / "config.json").read_text())
        config["quantization_config"]["modules_to_not_convert"] = list(MIXED_KEPT)
        (root / "mixed" / "config.json").write_text(json.dumps(config))
        return root

    def raw(t):
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    @pytest.mark.parametrize("passed", [DeepseekV3FP8Config(dequantize=False), FineGrainedFP8Config(dequantize=False)])
    def test_a_passed_config_keeps_the_folders_modules_to_not_convert(folders, passed, tmp_path):
        """`dequantize` from the passed config, the skip list from the folder (the passed config gives none): the kept
        modules load as the bf16 tensors stored, the rest stays FP8, and the save writes the same folder back."""
        model = DeepseekV3ForCausalLM.from_pretrained(folders / "mixed", dtype=torch.bfloat16, quantization_config=passed)
        stored = load_file(folders / "mixed" / "model.safetensors")
        kept = model.model.layers[2].self_attn.kv_a_proj_with_mqa
        assert type(kept) is torch.nn.Linear
        assert torch.equal(kept.weight, stored["model.layers.2.self_attn.kv_a_proj_with_mqa.weight"])
        assert type(model.model.layers[1].mlp.shared_experts.up_proj) is torch.nn.Linear
        assert type(model.model.layers[1].mlp.experts).__name__ != "FP8Experts"
        assert type(model.model.layers[2].mlp.experts).__name__ == "FP8Experts"
        assert type(model.model.layers[3].self_attn.kv_a_proj_with_mqa).__name__ == "FP8Linear"
        with torch.no_grad():
            assert torch.isfinite(model(IDS).logits).all()
        model.save_pretrained(tmp_path / "out")
        saved = load_file(tmp_path / "out" / "model.safetensors")
        assert set(saved) == set(stored)
        assert all(saved[k].dtype == stored[k].dtype and torch.equal(raw(saved[k]), raw(stored[k])) for k in stored)
        block = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        assert block == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128], "modules_to_not_convert": list(MIXED_KEPT)}
        # transformers' own config class reads the block we wrote
        assert FineGrainedFP8Config.from_dict(block).modules_to_not_convert == list(MIXED_KEPT)

    def test_a_passed_skip_list_still_replaces_the_folders(folders):
        """A config that gives `modules_to_not_convert` sets it (transformers' loading attributes); a module the folder
        stores in FP8 is then refused, naming the entry to drop, and a bf16 one names the field to list it in."""
        with pytest.raises(CheckpointError, match=r"lists 'model.layers.3.mlp.experts', which keeps it high precision"):
            DeepseekV3ForCausalLM.from_pretrained(folders / "mixed", quantization_config=DeepseekV3FP8Config(
                dequantize=False, modules_to_not_convert=[*MIXED_KEPT, "model.layers.3.mlp.experts"]))
        with pytest.raises(CheckpointError, match=r"is BF16, .* or list 'model\.layers\.[12]\..*' in "
                                                  r"`quantization_config.modules_to_not_convert` to keep it"):
            DeepseekV3ForCausalLM.from_pretrained(folders / "mixed", quantization_config=DeepseekV3FP8Config(
                dequantize=False, modules_to_not_convert=["lm_head"]))

    @pytest.mark.parametrize("dequantize", [True, False])
    def test_finegrained_fp8_config_routes_to_our_quantizer_and_matches_transformers(folders, dequantize):
        """transformers' own config on an FP8 folder: our layers (FP8Linear kept, or dequantized), and with
        `dequantize=True` the very logits of transformers' class given the same config (bf16; in fp32 its loader keeps
        the non-FP8 tensors in bf16 and its forward fails)."""
        passed = FineGrainedFP8Config(dequantize=dequantize, modules_to_not_convert=["lm_head"])
        ours = DeepseekV3ForCausalLM.from_pretrained(folders / "small", dtype=torch.bfloat16, quantization_config=passed)
        layer = type(ours.model.layers[1].self_attn.q_b_proj).__name__
        assert layer == ("Linear" if dequantize else "FP8Linear")
        with torch.no_grad():
            logits = ours(IDS).logits
        if dequantize:
            theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
                folders / "small", dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True))
            with torch.no_grad():
                assert torch.equal(logits, theirs(IDS).logits)
        else:
            assert ours.config.quantization_config.to_dict()["modules_to_not_convert"] == ["lm_head"]

    @pytest.mark.parametrize("passed,error", [
        (FineGrainedFP8Config(), r"needs an FP8 checkpoint\. To quantize a bf16 model, use the `fp8_block`"),
        (FineGrainedFP8Config(weight_block_size=(64, 64)), r"weight_block_size must be \[128, 128\].*got \[64, 64\]"),
        (FineGrainedFP8Config(activation_scheme="static"), r"activation_scheme must be 'dynamic', got 'static'"),
    ])
    def test_finegrained_fp8_config_on_a_bf16_folder_or_another_format_is_a_clear_error(folders, passed, error):
        # transformers' own class needs a GPU to quantize a bf16 folder on load; we point at the fp8_block plugin
        with pytest.raises(ValueError, match=error):
            DeepseekV3ForCausalLM.from_pretrained(folders / "small_bf16", quantization_config=passed)

    def test_our_config_round_trips_in_the_official_format():
        config = DeepseekV3FP8Config(dequantize=False, modules_to_not_convert=["lm_head"], scale_fmt="ue8m0")
        block = config.to_dict()
        assert block == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
                         "modules_to_not_convert": ["lm_head"], "scale_fmt": "ue8m0"}
        assert json.loads(config.to_json_string()) == block
        assert DeepseekV3FP8Config.from_dict(json.loads(config.to_json_string())).to_dict() == block
        theirs = FineGrainedFP8Config.from_dict(block)
        assert (theirs.quant_method, theirs.weight_block_size, theirs.activation_scheme) == ("fp8", [128, 128], "dynamic")
        assert config.get_loading_attributes() == {"dequantize": False, "modules_to_not_convert": ["lm_head"]}
        assert DeepseekV3FP8Config().get_loading_attributes() == {"dequantize": None}

# ------------------------------------------------------------------------------------------------ under the interpreter

else:

    from modeling_deepseek_v3.quantization import kernels as K  # imports triton, after TRITON_INTERPRET=1 is set

    def same_bytes(a, b):
        return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    def test_quant_kernels_on_zero_huge_and_edge_blocks():
        w = torch.randn(130, 131)
        w[:128, :128] = 0
        w[128:, 128:] = 3e38
        for power_of_two in (False, True):
            for kernel, ref in ((K.weight_quant_128x128, formats.quantize_weight_128x128),
                                (K.act_quant_1x128, formats.quantize_act_1x128)):
                q, s = kernel(w, power_of_two)
                q_ref, s_ref = ref(w, power_of_two)
                assert same_bytes(q, q_ref) and torch.equal(s, s_ref) and torch.isfinite(s).all()

    def test_gemm_kernels_at_tiny_and_edge_shapes():
        g = torch.Generator().manual_seed(4)
        for m, n, k in ((1, 1, 5), (3, 129, 131)):
            a_q, a_s = formats.quantize_act_1x128(torch.randn(m, k, generator=g))
            b_q, b_s = formats.quantize_weight_128x128(torch.randn(n, k, generator=g))
            out = K.fp8_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.float32)
            assert relative(out, formats.fp8_gemm_reference(a_q, a_s, b_q, b_s, out_dtype=torch.float32)) < 1e-6

    def test_fp8_block_experts_on_the_kernels_match_the_fake_quant_reference(monkeypatch):
        """The training experts with gate and up on their own blocks (moe_intermediate_size 72), dispatched to the
        grouped Fprop/Dgrad/Wgrad kernels; experts with 0, 1 and all of 9 tokens."""
        warnings.simplefilter("ignore")
        monkeypatch.setattr(L, "use_triton", lambda device: True)
        ours, ref = experts_against_reference(72, False, num_tokens=9)
        for name, got, want in zip(("out", "grad_x", "grad_gate_up", "grad_down"), ours, ref):
            assert relative(got, want) < 1e-5, (name, relative(got, want))
