"""Training like the paper (docs/equations.md): aux-loss-free bias updates, the padding-aware balance losses, the MTP
objective and the composition of the training loss. Single process; Trainer and multi-process tests live in
test_training_trainer.py and test_training_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, tiny_config
from host_reads import HostReads
from transformers.masking_utils import create_causal_mask

from modeling_deepseek_v3 import DeepseekV3Config, update_expert_bias
from modeling_deepseek_v3.layers import DeepseekV3MoE
from modeling_deepseek_v3.plugins.routing import NoAuxTCRouter
from modeling_deepseek_v3.training import routers


def moe_routers(model):
    return [m.gate for m in model.model.decoder_layers.modules() if isinstance(m, DeepseekV3MoE)]


def zero_biases(model):
    with torch.no_grad():
        for router in routers(model).values():
            router.e_score_correction_bias.zero_()


# --- bias updates -----------------------------------------------------------------------------------------------


def test_the_bias_step_reads_the_host_once_for_all_layers():
    # TorchTitan-style: the step itself stays on the device; one copy of every layer's counts gives the statistics
    model = build_model(tiny_config(num_nextn_predict_layers=1)).train()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    assert len(routers(model)) >= 3  # two MoE layers and the MTP module's router
    with HostReads() as reads:
        stats = model.update_expert_bias(update_speed=0.001)
    assert reads.total == 1, reads.where
    assert set(stats.max_vio) == set(routers(model)) and any(v > 0 for v in stats.max_vio.values())


def test_one_update_moves_each_bias_by_exactly_gamma_and_resets_counts():
    model = build_model(tiny_config()).train()
    zero_biases(model)
    ids = torch.randint(1, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids[:2])
        first = {n: r.tokens_per_expert.clone() for n, r in routers(model).items()}
        model(ids[2:])  # a second micro-batch adds to the counts of the first
    loads = {n: r.tokens_per_expert.clone() for n, r in routers(model).items()}
    for name, load in loads.items():
        assert load.sum() == 4 * 12 * 3  # every token counted once per selected expert (K = 3)
        assert (load - first[name]).sum() == 2 * 12 * 3

    stats = model.update_expert_bias(update_speed=0.001)
    moved_any = False
    for name, router in routers(model).items():
        load = loads[name]
        mean = load.mean()
        expected = torch.where(load > mean, -0.001, torch.where(load < mean, 0.001, 0.0)).float()
        assert torch.equal(router.e_score_correction_bias, expected), name  # exactly ±γ (0 at the mean)
        moved_any |= bool((expected != 0).any())
        assert torch.equal(stats.load[name], load)
        assert stats.max_vio[name] == pytest.approx(float(load.max() / mean - 1))
        assert router.tokens_per_expert.sum() == 0  # reset for the next optimizer step
    assert moved_any
    # the next update sees only what came after the reset: nothing, so nothing moves
    before = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
    model.update_expert_bias(update_speed=0.001)
    assert all(torch.equal(r.e_score_correction_bias, before[n]) for n, r in routers(model).items())


def test_inference_and_backward_recomputation_do_not_count():
    model = build_model(tiny_config())
    ids = torch.randint(1, 97, (2, 9))
    with torch.no_grad():
        model.eval()(ids)
    assert all(r.tokens_per_expert.sum() == 0 for r in routers(model).values())
    # activation checkpointing re-runs every layer's forward during backward: the loads must not double
    model.train()
    model.gradient_checkpointing_enable()  # the name both transformers 5.17 and 5.23 have
    model(ids, labels=ids).loss.backward()
    assert all(r.tokens_per_expert.sum() == 2 * 9 * 3 for r in routers(model).values())


def _skewed_model(gamma: float):
    """A model whose routers send nearly every token to experts 0-2 (their weights lean on the tokens' mean)."""
    model = build_model(tiny_config(router_bias_update_speed=gamma), seed=3).train()  # 2 groups, top-1 group, K=3
    zero_biases(model)
    ids = torch.randint(1, 97, (8, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for router, hidden in _router_inputs(model, ids).items():
            direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
            router.weight[:3] += 8 * direction / direction.norm() ** 2
            router.reset_counts()
    return model, ids


@pytest.mark.parametrize("gamma", [0.0, 0.005])
def test_unbalanced_router_is_balanced_by_bias_updates_only_when_gamma_positive(gamma):
    model, ids = _skewed_model(gamma)
    history = []
    for _ in range(80 if gamma else 5):  # γ = 0: nothing moves, so a few steps show it
        with torch.no_grad():
            model(ids)
        history.append(model.update_expert_bias())
    assert history[0].max_max_vio > 1.2  # experts 0-2 take most tokens (MaxVio 8/3 - 1 if they took all)
    if gamma == 0:
        assert history[-1].max_max_vio > 1.0
        assert all(r.e_score_correction_bias.abs().sum() == 0 for r in routers(model).values())
    else:
        # sign steps of a fixed batch end in a small limit cycle around the balance, not at MaxVio 0
        assert max(s.max_max_vio for s in history[-10:]) < 0.75  # from > 1.2, and > 1.0 with γ = 0
        # the overloaded experts were pushed down, the idle ones up
        for router in moe_routers(model):
            assert router.e_score_correction_bias[:3].max() < router.e_score_correction_bias[3:].min()


def test_warns_once_when_bias_is_never_updated(monkeypatch):
    monkeypatch.setattr(NoAuxTCRouter, "warn_after_forwards", 3)
    model = build_model(tiny_config()).train()
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        with pytest.warns(UserWarning, match="update_expert_bias") as record:
            for _ in range(8):
                model(ids)
        assert len(record) == len(moe_routers(model))  # one per router, once, all in the same forward
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):  # updated every step: no warning, however long it trains
                model(ids)
                model(ids)
                model.update_expert_bias()
            frozen = build_model(tiny_config(router_bias_update_speed=0.0)).train()
            for _ in range(8):  # γ = 0: a frozen bias is a choice, not a mistake
                frozen(ids)


def test_bad_training_config_is_rejected():
    for field in ("router_bias_update_speed", "mtp_loss_weight", "aux_loss_alpha"):
        with pytest.raises(ValueError, match=field):
            tiny_config(**{field: -0.1})
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="non-negative"):
        update_expert_bias(model, update_speed=-0.001)


# --- balance losses exclude padding -----------------------------------------------------------------------------


def _padded_batch(pad_id: int):
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = pad_id
    return ids, mask


@pytest.mark.parametrize("topk_method", ["noaux_tc", "greedy"])
def test_balance_loss_and_loads_ignore_padding(topk_method):
    model = build_model(tiny_config(topk_method=topk_method, aux_loss_alpha=0.01)).train()
    results = []
    for pad_id in (0, 42):  # what the padding holds must not matter
        ids, mask = _padded_batch(pad_id)
        out = model(ids, attention_mask=mask)
        results.append((out.aux_loss.detach(), [r.tokens_per_expert.clone() for r in moe_routers(model)]))
        for router in moe_routers(model):
            assert router.tokens_per_expert.sum() == (10 + 6) * 3  # real tokens only
            router.reset_counts()
    assert torch.allclose(results[0][0], results[1][0], rtol=0, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_noaux_balance_loss_is_sequence_wise():
    # Sequence-wise: the batch's loss is the mean of what each sequence gives alone (right padding is causal-safe).
    model = build_model(tiny_config(aux_loss_alpha=0.01)).train()
    ids, mask = _padded_batch(0)
    batch = model(ids, attention_mask=mask).aux_loss
    alone = [model(ids[:1]).aux_loss, model(ids[1:, :6]).aux_loss]
    assert torch.allclose(batch, (alone[0] + alone[1]) / 2, rtol=1e-5)


def _router_inputs(model, ids):
    inputs = {}
    hooks = [r.register_forward_pre_hook(lambda m, a, kw: inputs.__setitem__(m, a[0]), with_kwargs=True) for r in moe_routers(model)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def test_noaux_balance_loss_matches_the_paper_formula():
    # L = α Σ_i f_i P_i per sequence, f_i = E/(K T) Σ_t 1[i selected], P_i = mean_t s_i,t / Σ_j s_j,t (docs/equations.md)
    model = build_model(tiny_config(aux_loss_alpha=0.01)).train()
    ids = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(6))
    inputs = _router_inputs(model, ids)
    expected = 0.0
    for router, hidden in inputs.items():
        with torch.no_grad():
            _, _, idx, loss = router(hidden)
        per_sequence = []
        for b in range(3):
            s = router.router_logits(hidden[b]).sigmoid()
            p = (s / s.sum(-1, keepdim=True)).mean(0)
            chosen = torch.zeros(7, 8).scatter_(1, idx.view(3, 7, 3)[b], 1.0)
            f = chosen.sum(0) * 8 / (3 * 7)
            per_sequence.append(0.01 * (f * p).sum())
        assert torch.allclose(loss, torch.stack(per_sequence).mean(), rtol=1e-5)
        expected = expected + loss
    model.update_expert_bias(update_speed=0.0)
    assert torch.allclose(model(ids).aux_loss, expected, rtol=1e-5)


# --- the MTP objective ------------------------------------------------------------------------------------------


def mtp_reference_logits(model, ids):
    """Logits of every MTP depth computed independently of ``DeepseekV3ForCausalLM.forward``: full-length inputs
    whose tail (no token k ahead) holds zeros; the recurrence is that of docs/equations.md, MTP."""
    embed = model.model.embed_tokens
    with torch.no_grad():
        h = model.model(ids).last_hidden_state  # h^0: after model.norm
    seq_len = ids.shape[1]
    position_ids = torch.arange(seq_len).unsqueeze(0)
    cos_sin = model.model.rotary_emb(h, position_ids)
    causal = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=position_ids)
    logits = []
    for k, module in enumerate(model.model.mtp_layers, start=1):
        ahead = torch.zeros_like(h)
        ahead[:, : seq_len - k] = embed(ids[:, k:])  # position i gets the embedding of t_{i+k}
        h, _ = module(h, ahead, cos_sin, causal, position_ids=position_ids)
        logits.append(model.lm_head(module.shared_head.norm(h)))
    return logits


def test_total_loss_is_the_documented_sum():
    config = tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.01, mtp_loss_weight=0.3)
    model = build_model(config).train()
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(7))
    labels = ids.clone()
    labels[0, 4] = -100
    labels[1, 9:] = -100
    returned = {}  # each MoE block's balance loss, as its forward returned it
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: returned.__setitem__(name, out[1]))
        for name, m in model.named_modules() if isinstance(m, DeepseekV3MoE)
    ]
    out = model(ids, labels=labels)
    for hook in hooks:
        hook.remove()

    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ce + 0.3 * out.mtp_loss + out.aux_loss, rtol=1e-6)
    assert out.aux_loss > 0 and out.mtp_loss > 0

    # aux_loss covers every router that ran: the main layers' and the MTP modules'
    assert any(".layers.3." in n for n in returned) and any(".layers.4." in n for n in returned)
    assert torch.allclose(out.aux_loss, sum(returned.values()), rtol=1e-6)

    # mtp_loss = (1/D) Σ_k CE_k, CE_k over the targets t_{i+k+1}, checked against an independent computation
    reference = mtp_reference_logits(model, ids)
    per_depth = [
        F.cross_entropy(logits[:, : 11 - k - 1].reshape(-1, 97), labels[:, k + 1 :].reshape(-1), ignore_index=-100)
        for k, logits in enumerate(reference, start=1)
    ]
    assert torch.allclose(out.mtp_loss, torch.stack(per_depth).mean(), rtol=1e-5)


def test_num_items_in_batch_weights_every_term_by_the_micro_batch_share():
    # What Trainer passes under gradient accumulation: CE is summed and divided by the batch-wide target count;
    # the mean-type terms are weighted by this micro-batch's share so that the accumulated sum is a mean.
    model = build_model(tiny_config(num_nextn_predict_layers=1, aux_loss_alpha=0.01)).train()
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(8))
    plain = model(ids, labels=ids)
    scaled = model(ids, labels=ids, num_items_in_batch=torch.tensor(3 * 14))
    ce = F.cross_entropy(plain.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1), reduction="sum")
    share = 14 / 42
    assert torch.allclose(scaled.loss, ce / 42 + share * (0.3 * plain.mtp_loss + plain.aux_loss), rtol=1e-5)


def test_mtp_runs_only_when_training_with_labels_or_asked():
    model = build_model(tiny_config(num_nextn_predict_layers=1))
    calls = []
    model.model.mtp_layers[0].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(1, 97, (1, 6))
    with torch.no_grad():
        assert model.eval()(ids, labels=ids).mtp_loss is None
        assert model.train()(ids).mtp_loss is None
        assert not calls
        assert model.eval()(ids, labels=ids, return_mtp_loss=True).mtp_loss is not None
        assert model.train()(ids, labels=ids).mtp_loss is not None
        assert model(ids, labels=ids, return_mtp_loss=False).mtp_loss is None
    assert len(calls) == 2


def test_mtp_depth_needs_long_enough_sequences():
    model = build_model(tiny_config(num_nextn_predict_layers=2)).train()
    with pytest.raises(ValueError, match="at least 4 tokens"):
        model(torch.randint(1, 97, (1, 3)), labels=torch.randint(1, 97, (1, 3)))
    model(torch.randint(1, 97, (1, 4)), labels=torch.randint(1, 97, (1, 4)))  # 4 = D + 2 is enough


def test_all_ignored_labels_give_a_zero_loss_not_nan():
    model = build_model(tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.0)).train()
    ids = torch.randint(1, 97, (2, 6))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss == 0 and out.mtp_loss == 0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    out = model(ids, labels=torch.full_like(ids, -100), num_items_in_batch=torch.tensor(0))
    assert out.loss == 0


def test_padding_is_ignored_at_every_depth():
    model = build_model(tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.01)).train()
    losses = []
    for pad_id, pad_label in ((0, -100), (42, 42)):  # neither pad content nor unmasked pad labels matter
        ids, mask = _padded_batch(pad_id)
        labels = ids.clone()
        labels[1, 6:] = pad_label
        out = model(ids, attention_mask=mask, labels=labels)
        losses.append(torch.stack([out.loss, out.mtp_loss, out.aux_loss]).detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-6)
    # The padded sequence contributes exactly the targets inside its 6 real tokens: compare with an independent
    # computation on each sequence alone (right padding cannot change the real positions: attention is causal).
    ids, mask = _padded_batch(0)
    model.update_expert_bias(update_speed=0.0)
    model.eval()
    batch = model(ids, attention_mask=mask, labels=ids, return_mtp_loss=True)
    full, padded = mtp_reference_logits(model, ids[:1]), mtp_reference_logits(model, ids[1:, :6])
    per_depth = []
    for k in (1, 2):
        total = F.cross_entropy(full[k - 1][0, : 10 - k - 1], ids[0, k + 1 :], reduction="sum") + F.cross_entropy(
            padded[k - 1][0, : 6 - k - 1], ids[1, k + 1 : 6], reduction="sum"
        )
        per_depth.append(total / ((10 - k - 1) + (6 - k - 1)))
    assert torch.allclose(batch.mtp_loss, torch.stack(per_depth).mean(), rtol=1e-5)


def test_mtp_learns_the_token_k_plus_one_ahead():
    # Sequences follow a 16-cycle permutation π: t_{j+1} = π(t_j). Trained on the MTP loss alone, module k must map
    # the embedding of t_{i+k} it is given to t_{i+k+1} = π(t_{i+k}). Had the forward fed it another token or
    # scored it against another target, it would have learned the identity or π∘π instead; the check below feeds
    # the module itself (not through the forward) and so would see that.
    torch.manual_seed(0)
    vocab_used = 16
    cycle = torch.randperm(vocab_used) + 1
    successor = torch.zeros(98, dtype=torch.long)
    successor[cycle] = cycle.roll(-1)
    starts = cycle[torch.randint(0, vocab_used, (16,))]
    sequences = [starts]
    for _ in range(9):
        sequences.append(successor[sequences[-1]])
    ids = torch.stack(sequences, dim=1)  # [16, 10]
    seq_len = ids.shape[1]

    model = build_model(tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.0, num_hidden_layers=2)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        model(ids, labels=ids).mtp_loss.backward()
        optimizer.step()
    model.eval()
    for k, logits in enumerate(mtp_reference_logits(model, ids), start=1):
        count = seq_len - k - 1  # positions that have a token k+1 ahead
        predicted = logits[:, :count].argmax(-1)
        right = (predicted == ids[:, k + 1 : k + 1 + count]).float().mean()
        own_input = (predicted == ids[:, k : k + count]).float().mean()
        one_further = (predicted[:, :-1] == ids[:, k + 2 :]).float().mean()
        assert right > 0.95, k
        assert own_input < 0.1 and one_further < 0.1, k


def test_mtp_and_balance_loss_train_under_gradient_checkpointing():
    config = tiny_config(num_nextn_predict_layers=1, aux_loss_alpha=0.01)
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(9))
    grads = []
    for checkpointing in (False, True):
        model = build_model(config).train()
        if checkpointing:
            model.gradient_checkpointing_enable()  # the name both transformers 5.17 and 5.23 have
        out = model(ids, labels=ids)
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert torch.allclose(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], atol=1e-6, rtol=1e-4), name
    # the MTP module and the routers (through the balance loss) do receive gradients
    assert grads[1][1]["model.layers.3.eh_proj.weight"].abs().sum() > 0
    assert grads[1][1]["model.layers.1.mlp.gate.weight"].abs().sum() > 0


def test_config_roundtrip_keeps_training_fields(tmp_path):
    config = tiny_config(router_bias_update_speed=0.002, aux_loss_alpha=0.0003, mtp_loss_weight=0.1)
    config.save_pretrained(tmp_path)
    loaded = DeepseekV3Config.from_pretrained(tmp_path)
    assert (loaded.router_bias_update_speed, loaded.aux_loss_alpha, loaded.mtp_loss_weight) == (0.002, 0.0003, 0.1)
