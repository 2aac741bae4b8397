"""Big-model loading as a transformers/accelerate user does it: a `device_map` that offloads layers (MTP included) to
disk, FP8 folders under it, saving such a model, bias steps on it; token-embedding resizes with MTP modules and
gradient checkpointing over them, against a plain load and transformers' own DeepseekV3ForCausalLM (fp32)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import build_model, edit_tensors, tiny_config
from modeling_deepseek_v3 import DeepseekV3FP8Config
from modeling_deepseek_v3.checkpoint import CheckpointError
from modeling_deepseek_v3.quantization.converter import DeepseekV3FP8Converter

Auto = transformers.AutoModelForCausalLM

# MoE layer 1, the MTP module (layer 3), the embedding and the head on disk, the rest in memory
DISK_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
            "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
FP8_KEEP = dict(quantization_config=DeepseekV3FP8Config(dequantize=False))
# an offloaded kv_b_proj runs expanded MLA; over FP8 weights the absorbed path (dequantized halves, no activation
# quantization) differs from it by FP8 rounding, so the plain loads compared with offloaded ones run expanded too
EXPANDED = dict(mla_mode="expanded")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch9")
    config = tiny_config(num_nextn_predict_layers=1)
    build_model(config).save_pretrained(root / "fp32")
    build_model(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    DeepseekV3FP8Converter.from_pretrained(root / "bf16").quantize(root / "fp8", progress=False)
    return root


@pytest.fixture
def ids():
    return torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def saved(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def test_bias_steps_on_a_model_with_offloaded_routers_are_one_process_steps(folders, ids, tmp_path):
    # the step ran on the first router's weight device, meta for an offloaded router: "Cannot copy out of meta tensor"
    plain = Auto.from_pretrained(folders / "fp32")
    offloaded = Auto.from_pretrained(folders / "fp32", device_map=DISK_MAP, offload_folder=tmp_path / "a")
    assert offloaded.model.layers[1].mlp.gate.weight.is_meta
    for model in (plain, offloaded):
        model.train()
        model(ids, labels=ids).loss.backward()
    assert plain.update_expert_bias().max_vio == offloaded.update_expert_bias().max_vio
    biases = {n: b for n, b in offloaded.named_buffers() if n.endswith("e_score_correction_bias")}
    assert len(biases) == 3  # layers 1, 2 and the MTP module's router
    for name, bias in biases.items():
        assert torch.equal(bias, plain.get_buffer(name)), name
    # with offload_buffers=True the biases live in accelerate's store: a step would be lost, so it is refused by name
    stored = Auto.from_pretrained(folders / "fp32", device_map=DISK_MAP, offload_folder=tmp_path / "b", offload_buffers=True)
    stored.train()
    stored(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate, model\.layers\.3\.mlp\.gate is on the meta device .*offload_buffers=False"):
        stored.update_expert_bias()


def test_an_fp8_folder_kept_in_fp8_loads_offloaded_and_generates_as_a_plain_load(folders, ids, tmp_path):
    # the scale check after loading read the offloaded (meta) scale grids: "Cannot copy out of meta tensor"; and
    # generate, seeing the model on a device other than the CPU (the offloaded embedding's meta, as a GPU would be),
    # switched the experts to `batched_mm`, which experts stored in FP8 refuse
    plain = Auto.from_pretrained(folders / "fp8", dtype=torch.float32, **FP8_KEEP, **EXPANDED).eval()
    model = Auto.from_pretrained(folders / "fp8", dtype=torch.float32, device_map=DISK_MAP, offload_folder=tmp_path / "a",
                                 **FP8_KEEP, **EXPANDED).eval()
    kv_b = model.model.layers[1].self_attn.kv_b_proj
    assert kv_b.weight.is_meta and kv_b.weight.dtype == torch.float8_e4m3fn  # offloaded FP8 storage
    assert model.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        assert torch.equal(model(ids, labels=ids, return_mtp_loss=True).mtp_loss,
                           plain(ids, labels=ids, return_mtp_loss=True).mtp_loss)
        for options in ({}, {"num_beams": 2}):
            expected = plain.generate(ids, max_new_tokens=5, do_sample=False, **options)
            assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, **options), expected), options
        # MTP drafts (transformers' assisted loop moves them to `model.device`: the embedding must not be offloaded)
        model = Auto.from_pretrained(folders / "fp8", dtype=torch.float32, device_map=dict(DISK_MAP, **{
            "model.embed_tokens": "cpu"}), offload_folder=tmp_path / "b", **FP8_KEEP, **EXPANDED).eval()
        greedy = plain.generate(ids[:1], max_new_tokens=5, do_sample=False)
        for options in ({"use_mtp": True}, {"use_mtp": True, "cache_implementation": "static"}):
            assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False, **options), greedy), options
    # dequantizing offloaded FP8 layers left layers of meta weights without their hook: nan logits, silently
    with pytest.raises(ValueError, match=r"Cannot dequantize 'model\.layers\.1\.self_attn\.q_a_proj': its FP8 weights are "
                                         r"on the meta device \(offloaded by a `device_map`"):
        model.dequantize()


def test_the_scales_of_offloaded_fp8_layers_are_checked(folders, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(folders / "fp8", folder)
    name = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    edit_tensors(folder / "model.safetensors", lambda t: t[name].zero_())
    with pytest.raises(CheckpointError, match=rf"Scale grid '{name}' in the checkpoint has 1 of its 1 block scales"):
        Auto.from_pretrained(folder, device_map=DISK_MAP, offload_folder=tmp_path / "off", **FP8_KEEP)


def test_an_fp8_folder_dequantized_at_load_cannot_be_offloaded(folders, tmp_path):
    # the dequantization after loading replaced the offloaded layers by layers of meta tensors: the forward failed
    # inside a GEMM ("Expected inputs of BF16 type")
    with pytest.raises(ValueError, match=r"dequantized at load .* offloads \('model\.embed_tokens', 'model\.layers\.1', "
                                         r"'model\.layers\.3', \.\.\.\)\. Keep the FP8 weights"):
        Auto.from_pretrained(folders / "fp8", device_map=DISK_MAP, offload_folder=tmp_path,
                             quantization_config=DeepseekV3FP8Config(dequantize=True))


@pytest.mark.parametrize("source, options", [("fp32", {}), ("fp8", FP8_KEEP)])
def test_an_offloaded_model_saves_its_folder_bit_exact(folders, tmp_path, source, options):
    # the MTP layers' copies of an offloaded embedding and head were meta tensors, which transformers' save looked up
    # as parameters: "SequentialMTPModule has no attribute `embed_tokens`"
    model = Auto.from_pretrained(folders / source, device_map=DISK_MAP, offload_folder=tmp_path / "off", **options)
    model.save_pretrained(tmp_path / "out", max_shard_size="60KB")
    want, got = saved(folders / source), saved(tmp_path / "out")
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(raw(got[name]), raw(want[name])), name


@pytest.mark.parametrize("size, multiple", [(120, None), (90, None), (100, 64)])
def test_resized_embeddings_reach_the_mtp_modules_and_the_saved_copies(folders, ids, tmp_path, size, multiple):
    model = Auto.from_pretrained(folders / "fp32")
    model.resize_token_embeddings(size, pad_to_multiple_of=multiple)
    vocab = model.config.vocab_size
    assert vocab == (size if multiple is None else 128) and model.lm_head.weight.shape[0] == vocab
    model.eval()
    top = torch.full((1, 4), vocab - 1)  # an id only the resized vocabulary holds
    with torch.no_grad():
        assert model(top, labels=top, return_mtp_loss=True).logits.shape == (1, 4, vocab)
        out = model(ids, labels=ids, return_mtp_loss=True)
        # the MTP module's loss through the resized embedding and head (its shared ones), by hand
        mtp = model.model.layers[3]
        hidden = model.model(ids).last_hidden_state
        cos_sin = model.model.rotary_emb(hidden, torch.arange(9)[None])
        mask = torch.full((8, 8), float("-inf")).triu(1)[None, None]
        _, normed, _ = mtp(hidden[:, :8], model.model.embed_tokens(ids[:, 1:]), (cos_sin[0][:, :8], cos_sin[1][:, :8]),
                           mask, position_ids=torch.arange(8)[None], return_normed=True)
        logits = model.lm_head(normed)
        expected = torch.nn.functional.cross_entropy(logits[:, :7].reshape(-1, vocab), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(out.mtp_loss, expected)
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vocab
    tensors = saved(tmp_path / "out")
    for name in ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
        assert tensors[name].shape == (vocab, 64), name
    reloaded = Auto.from_pretrained(tmp_path / "out").eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, labels=ids, return_mtp_loss=True).mtp_loss, out.mtp_loss)
        assert torch.equal(theirs(ids).logits, out.logits)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_over_mtp_modules_gives_the_plain_gradients(folders, use_reentrant):
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    results = []
    for kwargs in (None, {"use_reentrant": use_reentrant}):
        model = Auto.from_pretrained(folders / "fp32", aux_loss_alpha=0.01)
        if kwargs is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        loads = {n: r.tokens_per_expert for n, r in model.named_modules() if hasattr(r, "tokens_per_expert")}
        results.append((grads, loads))
    (grads, loads), (checkpointed, checkpointed_loads) = results
    assert any(n.startswith("model.layers.3.") for n in grads) and set(checkpointed) == set(grads)
    for name in grads:
        torch.testing.assert_close(checkpointed[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    for name in loads:  # the recomputed forwards count no token twice
        assert torch.equal(checkpointed_loads[name], loads[name]), name
