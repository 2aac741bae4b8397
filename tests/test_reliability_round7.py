"""Bad or unusual input to the features added last: `num_items_in_batch` given by hand, tensor `logits_to_keep`
positions, `use_mtp` flags, packed rows under the default cache, the TRL trainers' models and datasets,
`set_experts_implementation` on FP8 experts, configs too large to build. Each gets a clear error naming the
argument, or (packed rows) the result of the documents run one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_model, tiny_config

IDS = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mtp_model():
    return build_model(tiny_config(num_nextn_predict_layers=1))


def test_num_items_in_batch_of_nan_inf_or_several_numbers_is_named(mtp_model):
    model = mtp_model.train()
    # a nan tensor made the loss nan, an inf one made it 0, a tensor of two counts failed on an ambiguous bool
    for count in (torch.tensor(float("nan")), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match=r"`num_items_in_batch` must be the number of targets in the whole batch, got"):
            model(IDS, labels=IDS, num_items_in_batch=count)
    with pytest.raises(ValueError, match=r"a tensor of one number, got dtype torch.int64 of shape \[2\]"):
        model(IDS, labels=IDS, num_items_in_batch=torch.tensor([16, 16]))
    # a count read from a NumPy array is a count (it was refused as not "an int ≥ 0"), in any integer or float dtype
    expected = model(IDS, labels=IDS, num_items_in_batch=16).loss
    for count in (np.int64(16), np.float32(16.0), torch.tensor(16, dtype=torch.int32), torch.tensor(16.0, dtype=torch.bfloat16)):
        torch.testing.assert_close(model(IDS, labels=IDS, num_items_in_batch=count).loss, expected)
    with pytest.raises(ValueError, match=r"\(0\) is fewer than the 16 targets"):
        model(IDS, labels=IDS, num_items_in_batch=np.int64(0))
    model.eval()


@torch.no_grad()
def test_logits_to_keep_positions_outside_the_input_are_named(mtp_model):
    # they failed inside the indexing with "index 9 is out of bounds for dimension 0 with size 9", naming nothing
    for positions in ([9], [0, 12], [-10]):
        with pytest.raises(ValueError, match=r"`logits_to_keep` holds positions in \[.*\], outside the input's 9 positions"):
            mtp_model(IDS, logits_to_keep=torch.tensor(positions))
    full = mtp_model(IDS).logits
    torch.testing.assert_close(mtp_model(IDS, logits_to_keep=torch.tensor([0, -1, 8])).logits, full[:, [0, 8, 8]])
    assert mtp_model(IDS, logits_to_keep=100).logits.shape == full.shape  # an int past the length keeps all, as transformers


def test_use_mtp_must_be_a_bool(mtp_model):
    # a string switched MTP decoding on: "no" as much as "yes"
    for flag in ("no", 1):
        with pytest.raises(TypeError, match=r"`use_mtp` must be True or False, got"):
            mtp_model.generate(IDS[:1], max_new_tokens=2, use_mtp=flag)
    plain = mtp_model.generate(IDS[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(mtp_model.generate(IDS[:1], max_new_tokens=3, do_sample=False, use_mtp=False), plain)


def test_packed_rows_attend_within_documents_under_the_default_cache(mtp_model):
    # transformers' mask builder reads packed documents from position_ids only when it gets no cache; `use_cache`
    # defaults to True, so a packed row run outside Trainer (which sets use_cache=False) attended across documents in
    # the main model (transformers' class does the same) while the MTP modules kept to each document
    ids = IDS[:1]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    with torch.no_grad():
        alone = torch.cat([mtp_model(ids[:, a:b]).logits for a, b in ((0, 4), (4, 7), (7, 9))], dim=1)
        for use_cache in ({}, {"use_cache": True}, {"use_cache": False}):
            torch.testing.assert_close(mtp_model(ids, position_ids=positions, **use_cache).logits, alone)
        # an unpacked row keeps its cache for decoding
        out = mtp_model(ids, position_ids=torch.arange(9)[None])
        assert out.past_key_values.get_seq_length() == 9
    model = mtp_model.train()
    labels = ids.masked_fill(positions == 0, -100)
    default = model(ids, labels=labels, position_ids=positions)
    without = model(ids, labels=labels, position_ids=positions, use_cache=False)
    torch.testing.assert_close(default.loss, without.loss)
    torch.testing.assert_close(default.mtp_loss, without.mtp_loss)
    model.eval()


def _preference_rows(columns=("prompt", "chosen", "rejected")):
    from datasets import Dataset

    return Dataset.from_list([{c: f"{c} {i}" for c in columns} for i in range(4)])


def test_trl_trainers_name_a_model_with_the_wrong_head_and_missing_preference_columns():
    pytest.importorskip("trl")
    from modeling_deepseek_v3 import DeepseekV3ForSequenceClassification
    from modeling_deepseek_v3.trl_trainers import (DeepseekV3DPOTrainer, DeepseekV3GRPOTrainer, DeepseekV3RewardTrainer,
                                                   DeepseekV3SFTTrainer)

    causal = build_model(tiny_config(num_hidden_layers=2))
    scorer = DeepseekV3ForSequenceClassification(tiny_config(num_hidden_layers=2, num_labels=1))
    # TRL's reward trainer said "The model has `num_labels=2`" of a causal LM; the others failed on an AttributeError
    with pytest.raises(ValueError, match=r"DeepseekV3RewardTrainer needs a DeepseekV3ForSequenceClassification as its "
                                         r"`model`, got a DeepseekV3ForCausalLM: load it with AutoModelForSequenceClassification"):
        DeepseekV3RewardTrainer(causal, train_dataset=_preference_rows())
    for trainer in (DeepseekV3SFTTrainer, DeepseekV3DPOTrainer, DeepseekV3GRPOTrainer):
        with pytest.raises(ValueError, match=rf"{trainer.__name__} needs a DeepseekV3ForCausalLM as its `model`, got a "
                                             r"DeepseekV3ForSequenceClassification"):
            trainer(scorer)
    with pytest.raises(ValueError, match=r"as its `ref_model`, got a DeepseekV3ForSequenceClassification"):
        DeepseekV3DPOTrainer(causal, scorer, train_dataset=_preference_rows())
    # a bare KeyError: 'rejected' inside datasets.map, positional or keyword, train or eval
    with pytest.raises(ValueError, match=r"DeepseekV3RewardTrainer: `train_dataset` has no `rejected` column \(its "
                                         r"columns: prompt, chosen\)"):
        DeepseekV3RewardTrainer(scorer, None, None, _preference_rows(("prompt", "chosen")))
    with pytest.raises(ValueError, match=r"`eval_dataset\['dev'\]` has no `chosen` and no `rejected` column \(its columns: text\)"):
        DeepseekV3DPOTrainer(causal, train_dataset=_preference_rows(), eval_dataset={"dev": _preference_rows(("text",))})


@pytest.mark.parametrize("fields, part", [
    (dict(n_routed_experts=10**9, n_group=1, topk_group=1), r"the experts: \(n_routed_experts=1000000000 \+ n_shared_experts=1\)"),
    (dict(vocab_size=10**12), r"the embedding: vocab_size=1000000000000 × hidden_size=64"),
    (dict(num_hidden_layers=10**7), r"the experts: .* in each of the 9999999 MoE layers \(num_hidden_layers=10000000"),
])
def test_a_config_too_large_for_the_device_is_named_before_anything_is_allocated(fields, part):
    # the build failed in the allocator ("you tried to allocate 256000000000 bytes", no field named) or, where memory
    # is overcommitted, filled it; on the meta device (transformers' loading) nothing is allocated and it builds
    from modeling_deepseek_v3 import DeepseekV3ForCausalLM

    config = tiny_config(**fields)
    with pytest.raises(ValueError, match=r"This config's weights take at least [\d,]+ GiB in torch.float32, more than the "
                                         r"[\d,]+ GiB of the cpu device they would be built on; most of it is " + part):
        DeepseekV3ForCausalLM(config)
    if "num_hidden_layers" not in fields:  # ten million layers take long to build even on the meta device
        with torch.device("meta"):
            assert DeepseekV3ForCausalLM(config).model.embed_tokens.weight.is_meta


def test_config_integers_from_numpy_and_fp8_expert_switches_say_what_to_do():
    from modeling_deepseek_v3 import DeepseekV3Config

    with pytest.raises(ValueError, match=r"`n_group` must be a positive integer, got np.int64\(2\) \(a NumPy integer: pass int\(value\)\)"):
        DeepseekV3Config(n_group=np.int64(2))
    with pytest.raises(ValueError, match=r"`n_group` must be a positive integer, got True\.$"):  # a bool gets no hint
        DeepseekV3Config(n_group=True)
    # a model the fp8_block plugin quantized in memory has no FP8 load config to change: model.dequantize() is the way
    model = build_model(tiny_config(quantizer="fp8_block", fp8_mode="inference"))
    with pytest.raises(ValueError, match=r"stored in FP8 .* \(`model\.dequantize\(\)`, or DeepseekV3FP8Config"):
        model.set_experts_implementation("eager")
    model.dequantize()
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
