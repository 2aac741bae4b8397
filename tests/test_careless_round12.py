"""Bad or odd input on the newest features, as a careless user writes it: assisted decoding over transformers'
quantized cache, LoRA configs under tensor parallelism that leave the refused layers out, router and experts plugins
that return the wrong thing at runtime. Each test feeds the input and checks that it is accepted as PEFT/transformers
read it, or refused naming what is wrong."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from conftest import build_model, save_checkpoint, tiny_config
from transformers.cache_utils import Cache, QuantizedLayer
from modeling_deepseek_v3 import parallel_plans, register_plugin
from modeling_deepseek_v3.plugins.routing.topk_router import TopKRouter
from modeling_deepseek_v3.lora import prepare_lora_config


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    folder = save_checkpoint(tiny_config(num_nextn_predict_layers=1), tmp_path_factory.mktemp("careless12"))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
GREEDY = dict(do_sample=False, pad_token_id=0, max_new_tokens=4)


class _ExactQuantizedLayer(QuantizedLayer):
    def _quantize(self, tensor, axis):
        return tensor.clone()

    def _dequantize(self, q_tensor):
        return q_tensor


# --- quantized KV cache with assisted decoding ------------------------------------------------------------------


@pytest.mark.parametrize("draft", ["use_mtp", "prompt_lookup_num_tokens", "assistant_model"])
@pytest.mark.parametrize("cache", ["cache_implementation", "past_key_values"])
def test_assisted_decoding_over_a_quantized_cache_is_refused_by_name(causal, draft, cache):
    # the assisted loop crops the cache after a rejected draft: "IndexError: too many indices for tensor of dimension
    # 1" inside transformers' cache layer (transformers' class fails the same)
    options = {"use_mtp": dict(use_mtp=True), "prompt_lookup_num_tokens": dict(prompt_lookup_num_tokens=2),
               "assistant_model": dict(assistant_model=causal)}[draft]
    layers = causal.config.num_hidden_layers
    options |= {"cache_implementation": dict(cache_implementation="quantized", cache_config={"backend": "fp8"}),
                "past_key_values": dict(past_key_values=Cache(layers=[_ExactQuantizedLayer() for _ in range(layers)]))}[cache]
    with torch.no_grad(), pytest.raises(ValueError, match=rf"`{draft}` \(assisted decoding\) crops the cache .* quantized"):
        causal.generate(PROMPT, **GREEDY, **options)
    with torch.no_grad():  # each alone decodes
        plain = causal.generate(PROMPT, **GREEDY)
        assert torch.equal(causal.generate(PROMPT, **GREEDY, **{
            k: v for k, v in options.items() if k not in ("cache_implementation", "cache_config", "past_key_values")}), plain)
        quantized = Cache(layers=[_ExactQuantizedLayer() for _ in range(layers)])
        assert torch.equal(causal.generate(PROMPT, **GREEDY, past_key_values=quantized), plain)


# --- LoRA under tensor parallelism ------------------------------------------------------------------------------


def as_if_tensor_parallel(model, size=2):
    """The two things prepare_lora_config reads of a model transformers' engine split: the distributed config and
    the plan it applied (no process group needed to check a LoRA config)."""
    model.config.distributed_config = transformers.DistributedConfig(tp_size=size)
    model.tp_plan = {"lm_head": "colwise_gather_output",
                     **{"model." + k: v for k, v in parallel_plans.tp_plan(model.config.q_lora_rank).items()}}
    return model


def adapted(peft_model) -> set[str]:
    return {name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("exclude", [["o_proj", "kv_a_proj_with_mqa", "experts", "gate_proj", "up_proj", "down_proj"],
                                     r".*(o_proj|kv_a_proj_with_mqa|mlp\..*)"])
def test_tensor_parallel_all_linear_with_the_refused_layers_excluded_is_taken(exclude):
    # the refusal named o_proj (and then the stacked experts) though exclude_modules, which PEFT applies, left them out
    model = as_if_tensor_parallel(build_model(tiny_config(num_hidden_layers=2)))
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa.*'mla_kv_a_proj' tensor-parallel style"):
        prepare_lora_config(model, LoraConfig(r=2, target_modules="all-linear"))
    config = prepare_lora_config(model, LoraConfig(r=2, target_modules="all-linear", exclude_modules=exclude))
    assert config.target_parameters is None
    names = adapted(get_peft_model(model, config))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_a_proj", "q_b_proj", "kv_b_proj")}


def test_tensor_parallel_lora_still_refuses_what_the_selection_keeps():
    model = as_if_tensor_parallel(build_model(tiny_config(num_hidden_layers=2)))
    # layers_to_transform keeps layer 1's o_proj: refused by name; [0] of a 2-layer model's experts: none left
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj: .*'rowwise'"):
        prepare_lora_config(model, LoraConfig(r=2, target_modules=["q_a_proj", "o_proj"], layers_to_transform=[1]))
    config = prepare_lora_config(model, LoraConfig(r=2, target_modules=["q_a_proj", "o_proj"], exclude_modules=["o_proj"]))
    assert adapted(get_peft_model(model, config)) == {"model.layers.0.self_attn.q_a_proj", "model.layers.1.self_attn.q_a_proj"}
    model = as_if_tensor_parallel(build_model(tiny_config(num_hidden_layers=2)))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.experts\.gate_up_proj': the routed experts are split"):
        prepare_lora_config(model, LoraConfig(r=2, target_parameters=["mlp.experts.gate_up_proj"], layers_to_transform=[1]))
    with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] leave out every parameter"):
        prepare_lora_config(model, LoraConfig(r=2, target_parameters=["mlp.experts.gate_up_proj"], layers_to_transform=[0]))


# --- plugins that return the wrong thing at runtime -------------------------------------------------------------


def router_returning(name, change):
    class Router(TopKRouter):
        def forward(self, hidden_states, token_mask=None):
            logits = self.router_logits(hidden_states).view(-1, self.n_routed_experts)
            weights, indices = self.scores(logits).topk(self.top_k, dim=-1)
            return change(logits, self.scale_weights(weights), indices)

    register_plugin("router", name)(Router)
    return name


ROUTERS = {
    "a 3-tuple": (lambda l, w, i: (l, w, i), r"must return \(router_logits, topk_weights, topk_indices, aux_loss\), got a tuple of 3"),
    "float ids": (lambda l, w, i: (l, w, i.float(), None), r"returned topk_indices of dtype torch\.float32"),
    "fewer weights": (lambda l, w, i: (l, w[:, :1], i, None), r"both \[tokens=14, top_k\], got \[14, 1\] and \[14, 3\]"),
    "[B, T, K]": (lambda l, w, i: (l, w.view(2, 7, -1), i.view(2, 7, -1), None), r"both \[tokens=14, top_k\], got \[2, 7, 3\]"),
    "a float aux_loss": (lambda l, w, i: (l, w, i, 0.5), r"aux_loss as None or a 0-dim tensor, got float"),
    "a vector aux_loss": (lambda l, w, i: (l, w, i, l.sum(0)), r"aux_loss as None or a 0-dim tensor, got \[8\]"),
}


@pytest.mark.parametrize("index", range(len(ROUTERS)))
def test_a_router_plugin_returning_the_wrong_thing_is_named(index):
    # these failed deep inside transformers' experts functions ("index 18 is out of bounds"), in the loss sum
    # ("'float' object has no attribute 'to'"), or ran: float ids were used as ids, a vector aux_loss summed
    change, message = list(ROUTERS.values())[index]
    name = router_returning(f"careless12_router_{index}", change)
    ids = PROMPT[:, :7].repeat(2, 1)
    model = build_model(tiny_config(num_hidden_layers=2, topk_method=name)).train()
    with pytest.raises(ValueError, match=rf"router plugin '{name}' \(`topk_method`\) .*" + message):
        model(ids, labels=ids)


def test_a_router_plugin_with_int32_ids_runs_as_with_int64():
    logits = []
    for name, change in (("careless12_int64", lambda l, w, i: (l, w, i, None)),
                         ("careless12_int32", lambda l, w, i: (l, w, i.int(), None))):
        with torch.no_grad():
            logits.append(build_model(tiny_config(num_hidden_layers=2, topk_method=router_returning(name, change))).eval()(PROMPT).logits)
    torch.testing.assert_close(logits[0], logits[1])


EXPERTS = [(lambda h: h[:, :5], r"\[10, 5\]"), (lambda h: h[:3], r"\[3, 64\]"), (lambda h: (h, None), "tuple")]


@pytest.mark.parametrize("index", range(len(EXPERTS)))
def test_an_experts_plugin_returning_the_wrong_shape_is_named(index):
    # "shape '[1, 10, 64]' is invalid for input of size 50" in the MoE block's reshape, naming no plugin
    output, got = EXPERTS[index]
    name = f"careless12_experts_{index}"
    register_plugin("experts", name)(lambda module, hidden, top_k_index, top_k_weights: output(hidden))
    model = build_model(tiny_config(num_hidden_layers=2, experts_backend=name)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=rf"experts implementation '{name}'\) must return "
                                                          rf"\[tokens=10, hidden=64\], got {got}"):
        model(PROMPT)


# --- a cache passed to generate that holds the whole prompt -------------------------------------------------------


@pytest.mark.parametrize("cached", [len(PROMPT[0]), len(PROMPT[0]) + 2])
def test_a_cache_holding_the_whole_prompt_is_refused_and_the_crop_it_names_decodes(causal, cached):
    # the prefill found nothing left to feed and ran the last positions again over their cached selves: different
    # tokens without a word (transformers' class too)
    longer = torch.cat([PROMPT, torch.tensor([[9, 9]])], dim=1)[:, :cached]
    cache = transformers.DynamicCache(config=causal.config)
    with torch.no_grad():
        causal(longer, past_key_values=cache, use_cache=True)
        plain = causal.generate(PROMPT, **GREEDY)
        with pytest.raises(ValueError, match=rf"holds {cached} positions and the prompt has {PROMPT.shape[1]}.*crop\(-{cached - 9}\)"):
            causal.generate(PROMPT, past_key_values=cache, **GREEDY)
        cache.crop(-(cached - 9))
        assert torch.equal(causal.generate(PROMPT, past_key_values=cache, **GREEDY), plain)
