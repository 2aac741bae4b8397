"""What would make the paper's training silently wrong is refused by name: label smoothing that drops the MTP and
balance losses, a non-finite routing bias, a second bias callback in one Trainer; γ accepts any real number."""

from __future__ import annotations

import re

import numpy
import pytest
import torch
from conftest import build_model, tiny_config
from host_reads import HostReads
from test_training_trainer import arguments, dataset
from transformers import Trainer

from modeling_deepseek_v3 import ExpertBiasUpdateCallback, update_expert_bias
from modeling_deepseek_v3.training import routers

IDS = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(3))


def counted(model):
    """``model`` in training mode after one forward, so its routers hold counts."""
    model.train()
    with torch.no_grad():
        model(IDS)
    return model


# --- label smoothing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, lost", [
    (dict(num_nextn_predict_layers=1, aux_loss_alpha=0.0), r"leaves the MTP loss \(`mtp_loss_weight` · mtp_loss: the MTP "
                                                           r"modules would never train\) out of the optimised loss"),
    (dict(aux_loss_alpha=0.01), r"leaves the routers' balance loss \(`aux_loss_alpha`\) out of the optimised loss"),
    (dict(num_nextn_predict_layers=1, aux_loss_alpha=0.01), r"the MTP loss .* and the routers' balance loss"),
])
def test_label_smoothing_that_drops_our_losses_is_refused(tmp_path, fields, lost):
    model = build_model(tiny_config(**fields))
    mtp = model.model.layers[3].state_dict() if fields.get("num_nextn_predict_layers") else None
    trainer = Trainer(model=model, args=arguments(tmp_path, label_smoothing_factor=0.1), train_dataset=dataset(),
                      callbacks=[ExpertBiasUpdateCallback()])
    with pytest.raises(ValueError, match=r"`label_smoothing_factor`=0.1: transformers.Trainer then takes `labels` out") as error:
        trainer.train()
    message = str(error.value)
    assert re.search(lost, message), message
    assert "Set `label_smoothing_factor=0`" in message
    if fields.get("aux_loss_alpha"):  # the TRL trainers keep the balance loss, not the MTP one
        assert "DeepseekV3SFTTrainer, which adds the balance loss" in message
        assert ("never runs the MTP modules" in message) == bool(mtp)
    else:
        assert "DeepseekV3SFTTrainer" not in message and "no trainer of this package trains the MTP modules" in message
    if mtp is not None:  # refused before any step
        for name, tensor in model.model.layers[3].state_dict().items():
            assert torch.equal(tensor, mtp[name]), name


def test_label_smoothing_that_loses_nothing_stays_allowed(tmp_path):
    # no MTP module, no balance loss: the smoothed cross-entropy is the whole loss anyway
    model = build_model(tiny_config(aux_loss_alpha=0.0))
    args = arguments(tmp_path, label_smoothing_factor=0.1, max_steps=1, gradient_accumulation_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[ExpertBiasUpdateCallback()])
    trainer.train()
    assert [entry["max_vio_mean"] for entry in trainer.state.log_history if "loss" in entry]
    # an MTP module with weight 0 trains nothing either
    model = build_model(tiny_config(num_nextn_predict_layers=1, mtp_loss_weight=0.0, aux_loss_alpha=0.0))
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[ExpertBiasUpdateCallback()]).train()


def test_label_smoothing_under_our_sft_trainer_keeps_the_balance_loss(tmp_path):
    pytest.importorskip("trl")
    from test_finetune_trl import common, dataset as trl_dataset, policy
    from transformers import ByT5Tokenizer
    from trl import SFTConfig

    from modeling_deepseek_v3.trl_trainers import DeepseekV3SFTTrainer

    args = SFTConfig(**common(tmp_path, max_steps=1, label_smoothing_factor=0.1), max_length=48)
    with pytest.warns(FutureWarning, match="label_smoothing_factor"):  # TRL's own deprecation
        trainer = DeepseekV3SFTTrainer(policy(), args=args, train_dataset=trl_dataset("sft", 4),
                                       processing_class=ByT5Tokenizer())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and logged[0]["balance_loss"] > 0 and "max_vio_mean" in logged[0]


# --- a non-finite routing bias ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_bias_is_named_within_the_one_host_read(value):
    model = counted(build_model(tiny_config(num_nextn_predict_layers=1)))
    broken = ["model.layers.2.mlp.gate", "model.layers.3.mlp.gate"]  # a decoder layer and the MTP module's router
    assert set(broken) < set(routers(model))
    with torch.no_grad():
        routers(model)[broken[0]].e_score_correction_bias.fill_(value)
        routers(model)[broken[1]].e_score_correction_bias[5] = value
    with HostReads() as reads, pytest.raises(RuntimeError) as error:
        model.update_expert_bias(update_speed=0.001)
    assert reads.total == 1, reads.where
    message = str(error.value)
    assert f"`e_score_correction_bias`) of {', '.join(broken)} is not finite" in message, message
    assert "model.layers.1.mlp.gate" not in message  # the finite one is not named
    # and at every later step too: no step repairs it
    counted(model)
    with pytest.raises(RuntimeError, match=r"of model\.layers\.2\.mlp\.gate, model\.layers\.3\.mlp\.gate is not finite"):
        update_expert_bias(model, 0.0)


def test_greedy_routers_have_no_bias_to_check():
    model = counted(build_model(tiny_config(topk_method="greedy", n_group=1, topk_group=1)))
    with HostReads() as reads:
        stats = update_expert_bias(model, 0.001)
    assert reads.total == 1 and set(stats.max_vio) == set(routers(model))


# --- one bias callback per Trainer ------------------------------------------------------------------------------


def test_a_second_bias_callback_is_refused(tmp_path):
    for callbacks in ([ExpertBiasUpdateCallback(), ExpertBiasUpdateCallback()], [ExpertBiasUpdateCallback()] * 2):
        model = build_model(tiny_config())
        before = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
        trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(), callbacks=callbacks)
        with pytest.raises(ValueError, match=r"This Trainer has ExpertBiasUpdateCallback twice .* log `max_vio_mean` 0"):
            trainer.train()
        for name, router in routers(model).items():  # refused before the first step
            assert torch.equal(router.e_score_correction_bias, before[name]), name

        # with one of them removed, the logged MaxVio is the real one (not 0), and a second train() is fine
        trainer.pop_callback(ExpertBiasUpdateCallback)
        for _ in range(2):
            trainer.train()
            logged = [entry["max_vio_max"] for entry in trainer.state.log_history if "loss" in entry]
            assert len(logged) == 2 and all(value > 0 for value in logged), logged


# --- γ ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [numpy.float32(0.001), numpy.float64(0.001), 1, numpy.int64(0)])
def test_any_real_gamma_is_accepted(gamma):
    model = counted(build_model(tiny_config()))
    before = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
    stats = update_expert_bias(model, gamma)
    assert stats.max_vio
    for name, router in routers(model).items():
        step = (router.e_score_correction_bias - before[name]).abs()
        assert torch.allclose(step[step > 0], torch.tensor(float(gamma))), name
        assert bool((step > 0).any()) == (float(gamma) > 0), name
    model.config.router_bias_update_speed = numpy.float32(0.002)  # the config's value goes through the same check
    counted(model)
    model.update_expert_bias()


@pytest.mark.parametrize("gamma, message", [
    (numpy.float32("nan"), r"`update_speed` \(γ of the router bias step\) must be finite and non-negative, got nan"),
    (numpy.float32(-0.001), r"`update_speed` .* must be finite and non-negative, got -0.001"),
    (-1, r"`update_speed` .* must be finite and non-negative, got -1"),
    (numpy.True_, r"`update_speed` \(γ of the router bias step\) must be a real number, got np.True_ \(bool"),
    (False, r"`update_speed` .* must be a real number, got False \(bool\)"),
])
def test_bad_gamma_is_refused_by_name(gamma, message):
    model = counted(build_model(tiny_config()))
    with pytest.raises(ValueError, match=message):
        update_expert_bias(model, gamma)
    model.config.router_bias_update_speed = gamma
    with pytest.raises(ValueError, match=r"`config.router_bias_update_speed` \(γ of the router bias step\) must be"):
        update_expert_bias(model)
