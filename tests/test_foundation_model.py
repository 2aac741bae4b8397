"""Model behaviour beyond parity: plugins, experts executor, MTP layout, registry, Auto classes, bad input, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_model, relative_error, tiny_config

import modeling_deepseek_v3
from modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3Model, list_plugins, register_plugin
from modeling_deepseek_v3.registry import ENTRY_POINT_GROUP, RouterPlugin, load_entry_point_plugins

REPO = Path(__file__).resolve().parents[1]


def test_public_names_exist():
    for name in ("DeepseekV3Config", "DeepseekV3Model", "DeepseekV3ForCausalLM", "ExpertBiasUpdateCallback",
                 "list_plugins", "register_plugin"):
        assert hasattr(modeling_deepseek_v3, name), name
    plugins = list_plugins()
    assert set(plugins) == {"attention", "router", "experts", "mtp", "quantizer"}
    assert {"mla", "mha"} <= set(plugins["attention"]) and {"noaux_tc", "greedy"} <= set(plugins["router"])
    model = build_model(tiny_config())
    assert callable(model.update_expert_bias)


def test_auto_classes_return_ours_only_after_import(tmp_path):
    config = tiny_config()
    assert isinstance(transformers.AutoModelForCausalLM.from_config(config), DeepseekV3ForCausalLM)
    assert isinstance(transformers.AutoModel.from_config(config), DeepseekV3Model)
    config.save_pretrained(tmp_path)
    # A fresh interpreter that does not import us gets transformers' own class.
    code = f"import transformers; c = transformers.AutoConfig.from_pretrained({str(tmp_path)!r}); " \
           "m = transformers.AutoModelForCausalLM.from_config(c); print(type(m).__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("transformers.models.deepseek_v3")


@torch.no_grad()
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_stacked_experts_equal_per_token_reference(implementation):
    config = tiny_config(first_k_dense_replace=0)
    model = build_model(config)
    model.set_experts_implementation(implementation)
    moe = model.model.layers[0].mlp
    torch.manual_seed(0)
    hidden = torch.randn(1, 23, config.hidden_size)
    _, topk_weight, topk_idx, _ = moe.gate(hidden)
    flat = hidden[0]
    got = moe.experts(flat, topk_idx, topk_weight)
    experts, inter = moe.experts, config.moe_intermediate_size

    def expert(e, x):  # the official per-expert SwiGLU MLP, from the stacked rows
        gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
        return experts.down_proj[e] @ (torch.nn.functional.silu(gate @ x) * (up @ x))

    expected = torch.stack([
        sum(topk_weight[t, k] * expert(int(topk_idx[t, k]), flat[t]) for k in range(topk_idx.shape[1]))
        for t in range(flat.shape[0])
    ])
    assert relative_error(got, expected) < 1e-6


@torch.no_grad()
def test_noaux_tc_selects_within_kept_groups_and_uses_bias_only_for_choice():
    config = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=0)
    router = build_model(config).model.layers[0].mlp.gate
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, config.hidden_size)
    router.e_score_correction_bias.zero_()
    router.e_score_correction_bias[:4] = 10.0  # group 0 always wins, its experts always chosen
    _, weight, idx, _ = router(hidden)
    groups = idx // 4
    assert bool((groups == 0).any(dim=-1).all())
    assert all(len(set(row.tolist())) <= 2 for row in groups)  # at most topk_group groups per token
    scores = torch.sigmoid(router.router_logits(hidden).view(-1, 16))
    gathered = scores.gather(1, idx)
    assert torch.allclose(weight, gathered / gathered.sum(-1, keepdim=True) * config.routed_scaling_factor)


def test_greedy_router_aux_loss_trains_the_router():
    config = tiny_config(topk_method="greedy", aux_loss_alpha=0.01)
    model = build_model(config).train()
    ids = torch.randint(1, config.vocab_size, (2, 10))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, labels=ids).aux_loss is None


def test_mha_backend_runs_and_caches_consistently():
    config = tiny_config(attention_backend="mha")
    model = build_model(config)
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.k_proj.weight" in names and not any("kv_b_proj" in n for n in names)
    ids = torch.randint(1, config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits
    assert relative_error(torch.cat([out.logits, step], 1), full) < 1e-5


@torch.no_grad()
def test_latent_cache_holds_only_c_kv_and_k_rope():
    config = tiny_config()
    model = build_model(config)
    out = model(torch.randint(1, config.vocab_size, (2, 7)), use_cache=True)
    layer = out.past_key_values.layers[0]
    assert tuple(layer.keys.shape) == (2, 1, 7, config.kv_lora_rank)
    assert tuple(layer.values.shape) == (2, 1, 7, config.qk_rope_head_dim)


def test_mtp_modules_have_official_names():
    config = tiny_config(num_nextn_predict_layers=2)
    names = {n for n, _ in build_model(config).named_parameters()}
    for depth in range(2):
        prefix = f"model.layers.{config.num_hidden_layers + depth}."
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                       "self_attn.kv_b_proj.weight", "mlp.gate.weight", "mlp.experts.gate_up_proj",
                       "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert prefix + suffix in names, prefix + suffix
    assert build_model(config).model.mtp_layers[0].eh_proj.weight.shape == (config.hidden_size, 2 * config.hidden_size)


def test_mtp_layers_do_not_change_main_logits(tmp_path):
    with_mtp = build_model(tiny_config(num_nextn_predict_layers=1))
    with_mtp.save_pretrained(tmp_path)
    without = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, num_nextn_predict_layers=0, dtype=torch.float32)
    assert len(without.model.layers) == 3
    ids = torch.randint(1, 97, (1, 9))
    with torch.no_grad():
        assert relative_error(without(ids).logits, with_mtp(ids).logits) < 1e-6


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "non-empty"),
        (lambda: dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "non-empty"),
        (lambda: dict(input_ids=torch.tensor([[1, 2, 97]])), "vocab_size"),
        (lambda: dict(input_ids=torch.tensor([[1, -2, 3]])), "vocab_size"),
        (lambda: dict(), "exactly one"),
    ],
)
def test_bad_input_gets_clear_error(make_input, message):
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=message):
        model(**make_input())


def test_registered_third_party_router_is_used():
    @register_plugin("router", "first_k_test")
    class FirstKRouter(RouterPlugin):
        def __init__(self, config):
            super().__init__()
            self.k = config.num_experts_per_tok
            self.weight = torch.nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))

        def forward(self, hidden, token_mask=None):
            n = hidden.shape[0] * hidden.shape[1]
            idx = torch.arange(self.k).expand(n, -1)
            return hidden.new_zeros(n, self.weight.shape[0]), torch.full((n, self.k), 1.0 / self.k), idx, None

    model = build_model(tiny_config(topk_method="first_k_test"))
    assert isinstance(model.model.layers[1].mlp.gate, FirstKRouter)
    assert "first_k_test" in list_plugins()["router"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(1, 97, (1, 5))).logits).all()


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    # A real installed distribution on sys.path: a module plus a dist-info advertising it in our group.
    (tmp_path / "ep_attention_plugin.py").write_text(textwrap.dedent("""
        from modeling_deepseek_v3.plugins.attention.mha import MultiHeadAttention

        class RenamedAttention(MultiHeadAttention):
            pass
    """))
    dist = tmp_path / "ep_attention_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-attention-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nattention.renamed_mha = ep_attention_plugin:RenamedAttention\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_entry_point_plugins(reload=True)
    assert "renamed_mha" in list_plugins()["attention"]
    model = build_model(tiny_config(attention_backend="renamed_mha"))
    assert type(model.model.layers[0].self_attn).__name__ == "RenamedAttention"


def test_register_plugin_rejects_wrong_base():
    with pytest.raises(TypeError, match="RouterPlugin"):
        register_plugin("router", "not_a_router")(torch.nn.Linear)
    with pytest.raises(ValueError, match="kind"):
        register_plugin("tokenizer", "x")


def test_gradient_checkpointing_gives_same_gradients():
    config = tiny_config()
    ids = torch.randint(1, 97, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = build_model(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[1].self_attn.kv_b_proj.weight.grad.clone())
    assert relative_error(grads[1], grads[0]) < 1e-5


def test_wheel_holds_only_our_namespace(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("modeling_deepseek_v3-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"modeling_deepseek_v3", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert "modeling_deepseek_v3/plugins/attention/mla.py" in names
    assert "modeling_deepseek_v3/quantization/__init__.py" in names
    assert not any(name.startswith(("plugins/", "quantization/")) for name in names)


def test_demo_main_job_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_deepseek_v3.demo", "--steps", "2", "--batch-size", "2",
         "--max-new-tokens", "4", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Reloaded model generates the same tokens." in result.stdout
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-1"], r"argument --steps: must be a positive int, got -1"),
    (["--learning-rate", "nan"], r"argument --learning-rate: must be a positive float"),
    (["--block-size", "0"], r"argument --block-size: must be a positive int"),
    (["--config", "/no/such/config.json"], r"argument --config: no such file: /no/such/config.json"),
    (["--prompt", ""], r"argument --prompt: must not be empty"),
    (["--output-dir", "/proc/not-here"], r"argument --output-dir: cannot create /proc/not-here"),
])
def test_demo_names_a_bad_argument(argv, message, capsys):
    from modeling_deepseek_v3 import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
