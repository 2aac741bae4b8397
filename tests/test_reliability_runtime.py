"""Bad runtime inputs (forward, generate, the bias step, the FP8 layers, LoRA, the TRL helpers) get an error naming the
argument, tensor or value where they enter, instead of a deep traceback or a silently wrong result; the inputs
transformers' conventions allow keep working. The value checks ride on the input check's one host read."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_model, tiny_config
from host_reads import HostReads

from modeling_deepseek_v3 import ExpertBiasUpdateCallback
from modeling_deepseek_v3.quantization import FP8Linear
from modeling_deepseek_v3.quantization.experts import FP8Experts, deepseek_fp8_experts_forward
from modeling_deepseek_v3.quantization.formats import FP8_DTYPE
from modeling_deepseek_v3.quantization.linear import fp8_grouped_linear_frozen
from modeling_deepseek_v3.training import update_expert_bias

IDS = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


@pytest.fixture(scope="module")
def mtp_model():
    return build_model(tiny_config(num_nextn_predict_layers=1))


def _additive_mask():
    mask = torch.zeros(2, 6)
    mask[0, 0] = float("-inf")
    return mask


@pytest.mark.parametrize("inputs, error, message", [
    (dict(input_ids=IDS[0]), ValueError, r"non-empty batch of shape \[batch, seq_len\], got `input_ids` of shape \(6,\)"),
    (dict(input_ids=IDS.tolist()), TypeError, r"`input_ids` must be a torch.Tensor, got list"),
    (dict(input_ids=IDS.to(torch.uint8)), ValueError, r"`input_ids` must hold int64 or int32 token ids, got dtype torch.uint8"),
    (dict(inputs_embeds=torch.randn(6, 64)), ValueError, r"\[batch, seq_len, hidden_size\], got `inputs_embeds` of shape \(6, 64\)"),
    (dict(inputs_embeds=torch.randn(2, 6, 32)), ValueError, r"`inputs_embeds` must have shape \[batch, seq_len, hidden_size=64\]"),
    (dict(inputs_embeds=torch.randint(0, 5, (2, 6, 64))), ValueError, r"`inputs_embeds` must be floating-point"),
    (dict(inputs_embeds=torch.randn(2, 6, 64, dtype=torch.float64)), ValueError, r"dtype torch.float64 but the model computes in torch.float32"),
    (dict(input_ids=IDS, position_ids=torch.arange(5)[None]), ValueError, r"`position_ids` must have shape \[batch=2 \(or 1\), seq_len=6\]"),
    (dict(input_ids=IDS, position_ids=torch.arange(6.0)[None]), ValueError, r"`position_ids` must hold integer positions"),
    (dict(input_ids=IDS, position_ids=torch.arange(-1, 5)[None]), ValueError, r"`position_ids` count from 0, got a value of -1"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 6, 6)), ValueError, r"`attention_mask` must be 2-D .* or 4-D"),
    (dict(input_ids=IDS, attention_mask=_additive_mask()), ValueError, r"2-D `attention_mask` holds 1 .* got 1 other value"),
    (dict(input_ids=IDS, attention_mask=torch.full((2, 6), 0.5)), ValueError, r"2-D `attention_mask` holds 1"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 1, 3, 3, dtype=torch.bool)), ValueError, r"4-D `attention_mask` must have shape \[batch=2 \(or 1\), 1 or heads, seq_len=6"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.long)), ValueError, r"4-D `attention_mask` must be bool .* or float"),
    (dict(input_ids=IDS, attention_mask=[[1] * 6] * 2), TypeError, r"`attention_mask` must be a torch.Tensor"),
    (dict(input_ids=IDS, past_key_values=((torch.zeros(1), torch.zeros(1)),), use_cache=True), TypeError, r"`past_key_values` must be a transformers Cache"),
    (dict(input_ids=IDS, logits_to_keep=-2), ValueError, r"`logits_to_keep` must be an int ≥ 0"),
    (dict(input_ids=IDS, logits_to_keep=1.5), ValueError, r"`logits_to_keep` must be an int ≥ 0"),
    (dict(input_ids=IDS, labels=IDS.tolist()), TypeError, r"`labels` must be a torch.Tensor, got list"),
    (dict(input_ids=IDS, labels=IDS, num_items_in_batch=-3), ValueError, r"`num_items_in_batch` must be the number of targets"),
    (dict(input_ids=IDS, labels=IDS, return_mtp_loss=True), ValueError, r"`return_mtp_loss=True` needs MTP modules"),
    (dict(input_ids=IDS, labels=IDS, return_mtp_loss="yes"), ValueError, r"`return_mtp_loss` must be True, False or None"),
])
def test_bad_forward_inputs_are_named(model, inputs, error, message):
    with torch.no_grad(), pytest.raises(error, match=message):
        model(**inputs)


def test_return_mtp_loss_without_labels_is_named(mtp_model):
    with torch.no_grad(), pytest.raises(ValueError, match=r"`return_mtp_loss=True` needs `labels`"):
        mtp_model(IDS, return_mtp_loss=True)


@torch.no_grad()
def test_inputs_transformers_accepts_keep_working(model):
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    reference = model(IDS, attention_mask=mask).logits
    for same in (mask.bool(), mask.float()):  # transformers reads a 2-D mask as bool: any 0/1 dtype
        torch.testing.assert_close(model(IDS, attention_mask=same).logits, reference)
    # int32 ids and labels of any integer width; embeddings the model promotes (bf16 into fp32)
    train_loss = model.train()(IDS, labels=IDS).loss
    torch.testing.assert_close(model(IDS.int(), labels=IDS.to(torch.uint8)).loss, train_loss)
    model.eval()
    assert model(inputs_embeds=model.model.embed_tokens(IDS).bfloat16()).logits.dtype == torch.float32
    assert model(IDS, logits_to_keep=2).logits.shape == (2, 2, 97)


@torch.no_grad()
def test_caches_that_cannot_take_the_input_are_named(model):
    cache = transformers.DynamicCache(config=model.config)
    model(IDS, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"`past_key_values` holds a batch of 2 sequences, the input has 3"):
        model(torch.randint(1, 97, (3, 1)), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"input's 6 tokens do not fit the static cache's 4 positions"):
        model(IDS, past_key_values=transformers.StaticCache(config=model.config, max_cache_len=4), use_cache=True)
    static = transformers.StaticCache(config=model.config, max_cache_len=10)
    model(IDS, past_key_values=static, use_cache=True)
    with pytest.raises(ValueError, match=r"static cache holds 6 of its 10 positions: the input's 6 tokens do not fit"):
        model(IDS, past_key_values=static, use_cache=True)


def test_value_checks_share_the_one_host_read(model):
    # a padding mask's values and a static cache's room are checked in the input check's read; decoding reads nothing
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    cache = transformers.StaticCache(config=model.config, max_cache_len=10)
    with torch.no_grad(), HostReads() as reads:
        model(IDS, attention_mask=mask, past_key_values=cache, use_cache=True, position_ids=torch.arange(6).expand(2, -1))
    ours = [w for w in reads.where if "modeling_deepseek_v3.py" in w]
    assert ours == [w for w in ours if w.startswith("tolist")] and len(ours) == 1, reads.where


def test_generate_inputs_are_named(model, mtp_model):
    with pytest.raises(ValueError, match=r"`generate` takes token ids of shape \[batch, seq_len\], got a prompt of shape \(3,\)"):
        model.generate(torch.tensor([1, 2, 3]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \[batch=1, past \+ seq_len ≥ 5\]"):
        model.generate(IDS[:1, :5], attention_mask=torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)
    prompt = IDS[:1, :5]
    with pytest.raises(ValueError, match=r"`use_mtp=True` drafts with the model's own MTP module; drop `assistant_model`"):
        mtp_model.generate(prompt, max_new_tokens=3, use_mtp=True, assistant_model=model)
    with pytest.raises(ValueError, match=r"drop `prompt_lookup_num_tokens`"):
        mtp_model.generate(prompt, max_new_tokens=3, use_mtp=True, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match=r"needs `input_ids`, not `inputs_embeds`"):
        mtp_model.generate(inputs_embeds=mtp_model.model.embed_tokens(prompt), max_new_tokens=3, use_mtp=True)


def _one_training_step(model):
    model.train()
    model(IDS, labels=IDS).loss.backward()


@pytest.mark.parametrize("update_speed, message", [
    (float("inf"), r"must be finite and non-negative, got inf"),
    (float("nan"), r"must be finite and non-negative, got nan"),
    ("0.01", r"must be a real number, got '0.01'"),
    (True, r"must be a real number, got True"),
])
def test_bad_bias_update_speeds_are_named(update_speed, message):
    model = build_model(tiny_config())
    _one_training_step(model)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    with pytest.raises(ValueError, match=message):
        update_expert_bias(model, update_speed)
    torch.testing.assert_close(model.model.layers[1].mlp.gate.e_score_correction_bias, bias)  # nothing moved
    model.config.router_bias_update_speed = float("inf")  # set at runtime, read at the step
    with pytest.raises(ValueError, match=r"finite and non-negative"):
        model.update_expert_bias()


def test_bias_step_on_a_model_that_is_not_ours_is_named():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no router that counts expert loads"):
        ExpertBiasUpdateCallback().on_step_end(None, transformers.TrainerState(), None, model=gpt2)
    with pytest.raises(TypeError, match=r"update_expert_bias needs the model \(an nn.Module\), got NoneType"):
        update_expert_bias(None)
    # a DeepSeek-V3 model without MoE layers has nothing to update, and says nothing
    assert update_expert_bias(build_model(tiny_config(first_k_dense_replace=3))).max_vio == {}


@pytest.fixture(scope="module")
def fp8_linear():
    return FP8Linear.from_linear(torch.nn.Linear(256, 200))


@pytest.mark.parametrize("corrupt, x, error, message", [
    (None, torch.tensor(1.0), ValueError, r"FP8Linear expects inputs \[\.\.\., 256\], got \(\)"),
    (None, [[1.0] * 256], TypeError, r"FP8Linear expects a torch.Tensor input"),
    ("weight", torch.randn(4, 256), ValueError, r"FP8Linear.weight must be torch.float8_e4m3fn \[200, 256\], got torch.bfloat16"),
    ("weight_scale_inv", torch.randn(4, 256), ValueError, r"FP8Linear.weight_scale_inv must be float32 \[2, 2\] .* got torch.float32 \[1, 1\]"),
])
def test_fp8_linear_bad_inputs_and_storage_are_named(fp8_linear, corrupt, x, error, message):
    layer = FP8Linear.from_linear(torch.nn.Linear(256, 200))
    if corrupt == "weight":
        layer.weight.data = layer.weight.data.to(torch.bfloat16)
    elif corrupt == "weight_scale_inv":
        layer.weight_scale_inv = torch.nn.Parameter(torch.ones(1, 1), requires_grad=False)
    with pytest.raises(error, match=message):
        layer(x)


def test_fp8_from_linear_and_grouped_weights_are_named(fp8_linear):
    with pytest.raises(TypeError, match=r"already an FP8Linear"):
        FP8Linear.from_linear(fp8_linear)
    with pytest.raises(TypeError, match=r"quantizes an nn.Linear, got Conv1d"):
        FP8Linear.from_linear(torch.nn.Conv1d(2, 2, 1))
    x, counts = torch.randn(10, 256), torch.tensor([5, 5])
    with pytest.raises(ValueError, match=r"`weight` must be torch.float8_e4m3fn \[experts, N, 256\], got torch.float8_e4m3fn \(128, 256\)"):
        fp8_grouped_linear_frozen(x, counts, torch.zeros(128, 256, dtype=FP8_DTYPE), torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"`weight` must be torch.float8_e4m3fn .* got torch.float32"):
        fp8_grouped_linear_frozen(x, counts, torch.zeros(2, 128, 256), torch.ones(2, 1, 2))
    with pytest.raises(ValueError, match=r"`weight_scale_inv` must be float32 \[2, 1, 2\]"):
        fp8_grouped_linear_frozen(x, counts, torch.zeros(2, 128, 256, dtype=FP8_DTYPE), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"`m_offsets` must rise from 0 .* running sum of the tokens per expert"):
        fp8_grouped_linear_frozen(x, torch.tensor([3, 3]), torch.zeros(2, 128, 256, dtype=FP8_DTYPE), torch.ones(2, 1, 2))


@pytest.mark.parametrize("hidden, index, weights, message", [
    (torch.randn(4, 64), torch.zeros(3, 3, dtype=torch.long), torch.ones(3, 3), r"must both be \[tokens=4, top_k\], got \(3, 3\)"),
    (torch.randn(4, 64), torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 2), r"must both be \[tokens=4, top_k\]"),
    (torch.randn(4, 64), torch.zeros(4, 3), torch.ones(4, 3), r"`top_k_index` must hold integer expert ids"),
    (torch.randn(1, 4, 64), torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3), r"`hidden_states` \[tokens, 64\], got \(1, 4, 64\)"),
])
def test_routed_experts_inputs_of_mismatched_shapes_are_named(hidden, index, weights, message):
    config = tiny_config(quantizer="fp8_block", fp8_mode="train")
    experts = build_model(config).model.layers[1].mlp.experts
    with pytest.raises(ValueError, match=message):
        FP8Experts.from_experts(experts)(hidden, index, weights)
    with pytest.raises(ValueError, match=message):
        deepseek_fp8_experts_forward(experts, hidden, index, weights)
    if "integer" not in message:  # the eager implementation of the stacked experts checks the shapes too
        experts.config._experts_implementation = "eager"
        with pytest.raises(ValueError, match=message):
            experts(hidden, index, weights)


def test_lora_helpers_name_bad_arguments():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from modeling_deepseek_v3.lora import dequantize_model, merge_and_unload, prepare_lora_config, set_fp8_merge
    from modeling_deepseek_v3.quantization.lora import FP8LoraLinear

    model = build_model(tiny_config(num_hidden_layers=2))
    with pytest.raises(TypeError, match=r"needs a peft.LoraConfig, got dict"):
        prepare_lora_config(model, {"r": 2})
    with pytest.raises(TypeError, match=r"needs the model \(an nn.Module\), got NoneType"):
        prepare_lora_config(None, LoraConfig(r=2, target_modules=["q_a_proj"]))
    with pytest.raises(ValueError, match=r"A string is a regular expression matched against whole module names"):
        prepare_lora_config(model, LoraConfig(r=2, target_modules="q_a_proj"))
    with pytest.raises(TypeError, match=r"folds the adapters of a PeftModel .* got DeepseekV3ForCausalLM"):
        merge_and_unload(model)
    for bad in ("bf16", torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=r"`dtype` must be a floating-point torch.dtype"):
            set_fp8_merge(model, "dequantize", bad)
    fp8 = build_model(tiny_config(num_hidden_layers=2, quantizer="fp8_block", fp8_mode="inference"))
    with pytest.raises(ValueError, match=r"`dtype` must be a floating-point torch.dtype"):
        dequantize_model(fp8, "bfloat16")
    peft_model = get_peft_model(fp8, prepare_lora_config(fp8, LoraConfig(r=2, target_modules=["q_a_proj"])))
    layer = next(m for m in peft_model.modules() if isinstance(m, FP8LoraLinear))
    with pytest.raises(ValueError, match=r"`dtype` must be a floating-point torch.dtype .* got torch.int8"):
        layer.set_merge_target("dense", torch.int8)


def test_trl_helpers_name_bad_arguments():
    pytest.importorskip("trl")
    from modeling_deepseek_v3.balance_hooks import BalanceLossTap
    from modeling_deepseek_v3.trl_trainers import DeepseekV3DPOTrainer

    with pytest.raises(TypeError, match=r"`ref_model` must be a model, got str"):
        DeepseekV3DPOTrainer(build_model(tiny_config(num_hidden_layers=2)), ref_model="some/folder")
    with pytest.raises(TypeError, match=r"BalanceLossTap hooks a model \(an nn.Module\), got NoneType"):
        BalanceLossTap(None)


# ---------------------------------------------------------------------------------------------------
# inputs that ran and gave a wrong result: refused, naming them
# ---------------------------------------------------------------------------------------------------


def test_labels_with_logits_to_keep_are_refused(model):
    # the one kept position has no next token: the loss would be 0 and train nothing
    for keep in (1, 3, torch.tensor([4, 5])):
        with torch.no_grad(), pytest.raises(ValueError, match=r"`logits_to_keep=.*` keeps the logits of the last positions only"):
            model(IDS, labels=IDS, logits_to_keep=keep)


def test_a_padding_mask_longer_than_the_positions_is_refused(model):
    # attention would read its first columns, the loss and the routers its last ones
    with torch.no_grad(), pytest.raises(ValueError, match=r"`attention_mask` must have shape \[batch=2, seq_len = 6\]"):
        model(IDS, attention_mask=torch.ones(2, 9, dtype=torch.long))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS, past_key_values=cache, use_cache=True)
        for columns in (2, 8):  # a decode step over 6 cached positions needs exactly 7 mask columns
            with pytest.raises(ValueError, match=r"past \+ seq_len = 6 \+ 1\] for input of shape \[2, 1\] over 6 cached"):
                model(IDS[:, :1], attention_mask=torch.ones(2, columns, dtype=torch.long), past_key_values=cache, use_cache=True)
        model(IDS[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), past_key_values=cache, use_cache=True)


def test_a_cache_of_another_config_is_named(model):
    other = build_model(tiny_config(kv_lora_rank=8, num_hidden_layers=2))
    cache = transformers.DynamicCache(config=other.config)
    with torch.no_grad():
        other(IDS, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"caches keys and values of widths \[8, 8\], but this model's attention caches \[16, 8\]"):
            model(IDS[:, :1], past_key_values=cache, use_cache=True)


def test_mtp_loss_over_a_cached_prefix_and_bad_run_time_weights_are_refused(mtp_model):
    cache = transformers.DynamicCache(config=mtp_model.config)
    with torch.no_grad():
        mtp_model(IDS[:, :4], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"MTP loss is computed over whole sequences, but `past_key_values` holds a cached prefix"):
            mtp_model(IDS[:, 4:], labels=IDS[:, 4:], past_key_values=cache, use_cache=True, return_mtp_loss=True)
    original = mtp_model.config.mtp_loss_weight
    try:
        for bad in (-1.0, float("inf"), "0.3"):
            mtp_model.config.mtp_loss_weight = bad
            with torch.no_grad(), pytest.raises(ValueError, match=r"Config field `mtp_loss_weight` must be a finite number ≥ 0"):
                mtp_model(IDS, labels=IDS, return_mtp_loss=True)
    finally:
        mtp_model.config.mtp_loss_weight = original


def test_nan_num_items_in_batch_is_named(model):
    with torch.no_grad(), pytest.raises(ValueError, match=r"`num_items_in_batch` must be the number of targets.*nan"):
        model(IDS, labels=IDS, num_items_in_batch=float("nan"))


def test_generate_names_a_list_prompt_and_a_static_cache_too_short(model):
    with pytest.raises(TypeError, match=r"`generate` takes the prompt as a tensor of token ids \[batch, seq_len\], got list"):
        model.generate([[1, 2, 3]], max_new_tokens=2)
    for kwargs in (dict(max_new_tokens=10), dict(max_length=15)):
        cache = transformers.StaticCache(config=model.config, max_cache_len=8)
        with pytest.raises(ValueError, match=r"static cache holds 8 positions .*generating up to `max_length=15` tokens .*needs 14"):
            model.generate(IDS[:1, :5], past_key_values=cache, do_sample=False, **kwargs)
    cache = transformers.StaticCache(config=model.config, max_cache_len=14)
    assert model.generate(IDS[:1, :5], past_key_values=cache, max_new_tokens=10, do_sample=False).shape == (1, 15)


def test_generating_in_training_mode_counts_no_training_loads():
    from modeling_deepseek_v3.registry import RouterPlugin

    model = build_model(tiny_config()).train()
    model.model.layers[1].mlp.shared_experts.eval()  # a part the user froze in eval mode stays so
    model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)
    routers = [m for m in model.modules() if isinstance(m, RouterPlugin)]
    assert all(float(r.tokens_per_expert.sum()) == 0 for r in routers)
    assert model.training and not model.model.layers[1].mlp.shared_experts.training and model.model.layers[2].training


def test_float64_with_grouped_mm_names_the_experts_implementation():
    model = build_model(tiny_config()).double()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"float64, which torch's grouped GEMM .*set_experts_implementation\('eager'\)"):
            model(IDS)
        model.set_experts_implementation("eager")
        assert model(IDS).logits.dtype == torch.float64


def test_switching_the_experts_implementation_of_fp8_experts_is_refused():
    model = build_model(tiny_config(quantizer="fp8_block", fp8_mode="inference"))
    with pytest.raises(ValueError, match=r"routed experts are stored in FP8 .*experts_implementation='eager' applies to high-precision experts"):
        model.set_experts_implementation("eager")


@pytest.mark.parametrize("distributed_config, error, message", [
    ({"ep_sise": 2}, ValueError, r"unknown field\(s\) \['ep_sise'\]"),
    ("ep=2", TypeError, r"`distributed_config` must be a transformers DistributedConfig or a dict of its fields, got str"),
])
def test_bad_distributed_configs_are_named(tmp_path, distributed_config, error, message):
    build_model(tiny_config(num_hidden_layers=2)).save_pretrained(tmp_path)
    with pytest.raises(error, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, distributed_config=distributed_config)


def test_a_world_size_that_is_not_a_number_is_named(tmp_path, monkeypatch):
    build_model(tiny_config(num_hidden_layers=2)).save_pretrained(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    with pytest.raises(ValueError, match=r"WORLD_SIZE must be a positive number of processes, got 'abc'"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, distributed_config=transformers.DistributedConfig(fsdp_size=2))


def test_fused_cross_entropy_ignores_what_ignored_rows_hold():
    from modeling_deepseek_v3 import kernels

    logits = torch.randn(50, 97, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(1))
    targets[:5] = -100
    poisoned = logits.detach().clone()
    poisoned[3, 4] = float("inf")  # an ignored row (padding, a prompt token): it must change nothing
    poisoned[2, 7] = float("nan")
    poisoned.requires_grad_(True)
    fused = kernels.chunked_cross_entropy(poisoned, targets, -100, chunk_rows=16)
    plain = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(fused, plain)
    fused.backward()
    plain.backward()
    assert torch.equal(poisoned.grad[:5], torch.zeros(5, 97))
    torch.testing.assert_close(poisoned.grad, logits.grad)


def test_a_fused_kernels_value_set_after_construction_is_named(model):
    from modeling_deepseek_v3 import kernels

    with pytest.raises(ValueError, match=r"Config field `fused_kernels` must be 'auto', 'on' or 'off', got 'bogus'"):
        kernels.use_fused("bogus", IDS)


def test_plugins_that_cannot_be_called_are_named_at_registration():
    from modeling_deepseek_v3 import register_plugin
    from modeling_deepseek_v3.registry import QuantizerPlugin, RouterPlugin

    class NoConfig(RouterPlugin):
        def __init__(self):
            super().__init__()

        def forward(self, hidden_states):
            return hidden_states

    class NoForward(RouterPlugin):
        pass

    class NoApply(QuantizerPlugin):
        pass

    with pytest.raises(TypeError, match=r"router plugin 'r' is called as .*NoConfig\(config\), but its constructor takes \(\)"):
        register_plugin("router", "r")(NoConfig)
    with pytest.raises(TypeError, match=r"router plugin 'r' \(.*NoForward\) must define forward\(\) itself"):
        register_plugin("router", "r")(NoForward)
    with pytest.raises(TypeError, match=r"quantizer plugin 'q' \(.*NoApply\) must define apply\(\) itself"):
        register_plugin("quantizer", "q")(NoApply)
    with pytest.raises(TypeError, match=r"experts plugin 'e' is called as .*\(module, hidden_states, top_k_index, top_k_weights\)"):
        register_plugin("experts", "e")(lambda module, hidden: hidden)
