"""Plugins written the way docs/plugins.md describes them, one of each kind, through training, saving, reloading in
a fresh process, decoding and compiling; and the registry's refusals of plugins the model could not call."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
from transformers import DistributedConfig, StaticCache

from conftest import build_model, tiny_config
from modeling_deepseek_v3 import DeepseekV3ForCausalLM, ExpertBiasUpdateCallback, distributed, expert_placement, register_plugin
from modeling_deepseek_v3.plugins.routing.noaux_tc import NoAuxTCRouter
from modeling_deepseek_v3.plugins.routing.topk_router import TopKRouter
from modeling_deepseek_v3.registry import AttentionPlugin, MTPPlugin, QuantizerPlugin

# A researcher's module: one plugin of each kind, as the interfaces of docs/plugins.md describe them.
PLUGINS = textwrap.dedent('''
    import torch
    from torch import nn

    from modeling_deepseek_v3 import register_plugin
    from modeling_deepseek_v3.expert_slots import SortedSlots
    from modeling_deepseek_v3.layers import DeepseekV3DecoderLayer, DeepseekV3RMSNorm, apply_rotary
    from modeling_deepseek_v3.plugins.routing.topk_router import TopKRouter
    from modeling_deepseek_v3.registry import AttentionPlugin, MTPPlugin, QuantizerPlugin


    @register_plugin("attention", "r10_attention")
    class OwnAttention(AttentionPlugin):
        """Per-head keys and values, softmax written out: reads the mask as the docs say it comes."""

        def __init__(self, config, layer_idx):
            super().__init__()
            self.config, self.layer_idx, self.heads = config, layer_idx, config.num_attention_heads
            self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
            width = self.heads * (self.nope + self.rope)
            self.q_proj = nn.Linear(config.hidden_size, width, bias=False)
            self.k_proj = nn.Linear(config.hidden_size, width, bias=False)
            self.v_proj = nn.Linear(config.hidden_size, self.heads * config.v_head_dim, bias=False)
            self.o_proj = nn.Linear(self.heads * config.v_head_dim, config.hidden_size, bias=False)

        @staticmethod
        def cache_widths(config):
            return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim

        def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
            b, t, _ = hidden_states.shape
            q, k, v = (p(hidden_states).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            cos, sin = position_embeddings

            def rotate(x):
                x_pass, x_rope = x.split([self.nope, self.rope], dim=-1)
                return torch.cat((x_pass, apply_rotary(x_rope, cos, sin, self.config.rope_interleave)), dim=-1)

            q, k = rotate(q), rotate(k)
            if past_key_values is not None:
                k, v = past_key_values.update(k, v, self.layer_idx)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            if attention_mask is None:  # causal from the first key; one query sees every key
                s = k.shape[-2]
                allowed = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(0 if t > 1 else s)
                scores = scores.masked_fill(~allowed, float("-inf"))
            elif attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask
            weights = scores.softmax(-1)
            return self.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1)), weights


    @register_plugin("router", "r10_router")
    class OwnRouter(TopKRouter):
        """docs/plugins.md's example, with a temperature: a config field of its own."""

        @classmethod
        def check_config(cls, config):
            super().check_config(config)
            if not getattr(config, "router_temperature", 1.0) > 0:
                raise ValueError(f"Config field `router_temperature` must be positive, got {config.router_temperature!r}.")

        def __init__(self, config):
            super().__init__(config)
            self.temperature = getattr(config, "router_temperature", 1.0)

        def forward(self, hidden_states, token_mask=None):
            logits = self.router_logits(hidden_states).view(-1, self.n_routed_experts) / self.temperature
            weights, indices = self.scores(logits).topk(self.top_k, dim=-1)
            self.count_tokens(indices, token_mask)
            return logits, self.scale_weights(weights), indices, None


    @register_plugin("experts", "r10_experts")
    def own_experts(module, hidden_states, top_k_index, top_k_weights):
        slots = SortedSlots(top_k_index, module.num_experts)
        expert = top_k_index.reshape(-1)[slots.order].clamp(0, module.num_experts - 1)
        x = slots.gather(hidden_states)
        h = module._apply_gate(torch.einsum("sh,sih->si", x, module.gate_up_proj[expert]))
        return slots.combine(torch.einsum("si,shi->sh", h, module.down_proj[expert]), top_k_weights, hidden_states)


    class SharedHead(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.norm = DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)


    @register_plugin("mtp", "r10_mtp")
    class OwnMTP(MTPPlugin):
        """No enorm/hnorm: a projection of [embedding; hidden] and one decoder layer."""

        def __init__(self, config, depth):
            super().__init__()
            self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
            self.block = DeepseekV3DecoderLayer(config, config.num_hidden_layers + depth)
            self.shared_head = SharedHead(config)

        def forward(self, hidden_prev, next_token_embeds, position_embeddings, attention_mask=None, return_normed=False, **kwargs):
            hidden = self.eh_proj(torch.cat((next_token_embeds, hidden_prev), dim=-1))
            hidden, aux_loss = self.block(hidden, position_embeddings, attention_mask, **kwargs)
            return (hidden, self.shared_head.norm(hidden), aux_loss) if return_normed else (hidden, aux_loss)


    class RoundedLinear(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(x, self.weight.to(torch.bfloat16).to(self.weight.dtype), self.bias)


    @register_plugin("quantizer", "r10_quantizer")
    class OwnQuantizer(QuantizerPlugin):
        """Fake-quantizes the attention and MLP output projections to bf16 resolution."""

        def is_eligible(self, module_name):
            return module_name.endswith(("o_proj", "down_proj"))

        def apply(self, model):
            for name, module in list(model.named_modules()):
                if type(module) is nn.Linear and self.is_eligible(name):
                    module.__class__ = RoundedLinear
            return model
''')

ALL_FIVE = dict(attention_backend="r10_attention", topk_method="r10_router", experts_backend="r10_experts",
                mtp_backend="r10_mtp", quantizer="r10_quantizer", num_nextn_predict_layers=1, router_temperature=2.0)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r10_plugins")
    (folder / "r10_plugins.py").write_text(PLUGINS)
    sys.path.insert(0, str(folder))  # imported by name: torch.compile looks the module up in sys.modules
    try:
        importlib.import_module("r10_plugins")
    finally:
        sys.path.remove(str(folder))
    return folder


def _ids(length=12, batch=2, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


class _Batches(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = _ids(12, 8)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_one_plugin_of_each_kind_trains_saves_reloads_and_decodes(plugin_dir, tmp_path):
    model = build_model(tiny_config(**ALL_FIVE)).train()
    assert type(model.model.layers[0].self_attn).plugin_name == "r10_attention"
    assert type(model.model.layers[1].mlp.gate).plugin_name == "r10_router"
    assert type(model.model.mtp_layers[0]).plugin_name == "r10_mtp"
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "RoundedLinear"
    assert model.config._experts_implementation == "r10_experts"
    args = transformers.TrainingArguments(str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                                          use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Batches(), callbacks=[ExpertBiasUpdateCallback()])
    trainer.train()
    assert "max_vio_mean" in trainer.state.log_history[0]  # the callback read the own router's counts
    model.eval().save_pretrained(tmp_path / "saved")

    prompt = _ids(6, 1, seed=1)
    plain = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="static"), plain)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, use_mtp=True), plain)
    model.set_attn_implementation("eager")  # the additive float mask instead of SDPA's bool mask or None
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False, cache_implementation="static"), plain)

    # the plugin's own field: in config.json, read back, overridable where the file holds it (docs: "Fields of a
    # plugin's own"), and checked by the plugin's check_config
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", router_temperature=3.0)
    assert reloaded.model.layers[1].mlp.gate.temperature == 3.0
    with pytest.raises(ValueError, match=r"`router_temperature` must be positive"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", router_temperature=-1.0)

    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(plugin_dir)!r})
        import modeling_deepseek_v3, transformers
        if sys.argv[1] == "import":
            import r10_plugins
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}).eval()
        print(model.generate(torch.tensor({prompt.tolist()}), max_new_tokens=5, do_sample=False).tolist())
    """)
    done = subprocess.run([sys.executable, "-c", code, "import"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(plain.tolist())
    done = subprocess.run([sys.executable, "-c", code, "no"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert re.search(r"Unknown \w+ plugin 'r10_\w+' in config field `\w+`", done.stderr), done.stderr
    assert "import the module that registers it" in done.stderr


# -- the registry refuses, at registration, a plugin the model could not call -------------------------------------


class _NoMaskRouter(TopKRouter):
    def forward(self, hidden_states):  # the MoE block passes token_mask=...
        return hidden_states


class _RenamedAttention(AttentionPlugin):
    def __init__(self, config, layer_idx):
        super().__init__()

    def forward(self, x, pe, mask, cache=None):  # the decoder layer passes position_embeddings=..., attention_mask=...
        return x, None


class _NoKwargsMTP(MTPPlugin):
    def __init__(self, config, depth):
        super().__init__()

    def forward(self, hidden_prev, next_token_embeds, position_embeddings, attention_mask):  # no token_mask, return_normed
        return hidden_prev, None


class _NoModelQuantizer(QuantizerPlugin):
    def apply(self):
        return None


@pytest.mark.parametrize("kind, cls, call", [
    ("router", _NoMaskRouter, r"_NoMaskRouter\.forward\(hidden_states, token_mask=\.\.\.\), but it takes \(self, hidden_states\)"),
    ("attention", _RenamedAttention, r"_RenamedAttention\.forward\(hidden_states, position_embeddings=\.\.\., attention_mask=\.\.\."),
    ("mtp", _NoKwargsMTP, r"_NoKwargsMTP\.forward\(hidden_prev, next_token_embeds, position_embeddings, attention_mask, "
                          r"past_key_values=\.\.\., position_ids=\.\.\., token_mask=\.\.\., return_normed=\.\.\.\)"),
    ("quantizer", _NoModelQuantizer, r"_NoModelQuantizer\.apply\(model\), but it takes \(self\)"),
])
def test_a_plugin_method_the_model_cannot_call_is_named_at_registration(kind, cls, call):
    with pytest.raises(TypeError, match=rf"{kind} plugin 'r10_bad_{kind}' is called as .*{call}"):
        register_plugin(kind, f"r10_bad_{kind}")(cls)


# -- whether a router keeps tokens inside expert groups is its class's, not its name's ----------------------------


class _PlainTopK(TopKRouter):  # docs/plugins.md's example: top-k over all experts
    def forward(self, hidden_states, token_mask=None):
        logits = self.router_logits(hidden_states).view(-1, self.n_routed_experts)
        weights, indices = self.scores(logits).topk(self.top_k, dim=-1)
        self.count_tokens(indices, token_mask)
        return logits, self.scale_weights(weights), indices, None


def test_a_router_over_all_experts_is_not_held_to_the_group_limit():
    register_plugin("router", "r10_plain_topk")(_PlainTopK)
    # 8 experts in 2 groups with topk_group=1: a group-limited router could choose among 4, this one among all 8
    model = build_model(tiny_config(topk_method="r10_plain_topk", num_experts_per_tok=5))
    _, _, indices, _ = model.model.layers[1].mlp.gate(torch.randn(1, 4, 64))
    assert indices.shape == (4, 5)
    with pytest.raises(ValueError, match=r"`num_experts_per_tok` \(5\) exceeds the 4 experts"):
        tiny_config(num_experts_per_tok=5)  # noaux_tc is group-limited
    with pytest.raises(ValueError, match=r"`num_experts_per_tok` \(9\) exceeds `n_routed_experts` \(8\)"):
        tiny_config(topk_method="r10_plain_topk", num_experts_per_tok=9)


def test_a_noaux_tc_subclass_under_its_own_name_is_group_limited_under_expert_parallelism():
    register_plugin("router", "r10_own_noaux")(type("OwnNoAux", (NoAuxTCRouter,), {}))
    register_plugin("router", "r10_plain_topk")(_PlainTopK)
    # 8 experts, 2 groups, topk_group=1, ep 2: one group per rank, so a group-limited token reaches one rank
    assert expert_placement.max_destination_ranks(tiny_config(topk_method="r10_own_noaux"), 2) == 1
    assert expert_placement.max_destination_ranks(tiny_config(topk_method="r10_plain_topk"), 2) == 2
    straddling = dict(n_routed_experts=12, n_group=3, topk_group=1, num_experts_per_tok=2)
    for name, warned in (("r10_own_noaux", True), ("r10_plain_topk", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            distributed.check_distributed_config(DeepseekV3ForCausalLM, tiny_config(topk_method=name, **straddling),
                                                 DistributedConfig(ep_size=2, fsdp_size=2), 2)
        assert any("routing groups straddle" in str(w.message) for w in caught) == warned, name


# -- compiled training with MTP modules ---------------------------------------------------------------------------


def test_compiled_training_step_with_mtp_after_a_call_that_recorded_outputs():
    # output_attentions installs transformers' capturing hooks on every attention, the MTP modules' too; those ran
    # outside the backbone's capture and read a ContextVar that torch.compile cannot trace
    model = build_model(tiny_config(num_nextn_predict_layers=1, experts_backend="grouped_mm"))
    ids = _ids()
    with torch.no_grad():
        model(ids, output_attentions=True)
    model.train()
    torch._dynamo.reset()
    step = torch.compile(lambda i: model(i, labels=i), fullgraph=True, backend="eager")  # raises on a graph break
    compiled = step(ids)
    compiled.loss.backward()
    assert compiled.mtp_loss is not None
    assert torch.allclose(compiled.loss.detach(), model(ids, labels=ids).loss.detach(), rtol=1e-5)


def test_own_attention_decodes_under_a_compiled_static_cache_step(plugin_dir):
    model = build_model(tiny_config(attention_backend="r10_attention", experts_backend="grouped_mm"))
    prompt = _ids(6, 1, seed=3)
    with torch.no_grad():
        expected = model(torch.cat([prompt, prompt[:, :1]], dim=1)).logits[:, -1]
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(prompt, past_key_values=cache)
        torch._dynamo.reset()
        step = torch.compile(model, fullgraph=True, backend="eager")
        logits = step(prompt[:, :1], past_key_values=cache, position_ids=torch.tensor([[6]])).logits[:, -1]
    assert torch.allclose(logits, expected, atol=1e-5)
