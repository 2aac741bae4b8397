"""Multi-token prediction as a user trains and decodes with it: the MTP loss against a from-scratch fp32 reading of
the paper's equations (transformers' own decoder layer as the block), λ = 0, the MTP routers' loads, every MLA mode
and experts implementation, and speculative sampling keeping the main model's distribution."""

from __future__ import annotations

import glob

import pytest
import torch
import transformers
from conftest import build_model, relative_error, tiny_config
from safetensors.torch import load_file
from test_foundation_parity import set_mla_mode

N = 3  # tiny_config's num_hidden_layers: MTP module k is stored as layer N + k - 1
IDS = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(5))


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


class PaperMTP:
    """The MTP objective of arXiv 2412.19437 (eqs. 21-25), written from the checkpoint folder alone: ``h^0`` from
    transformers' own class (after its final norm, the convention the released weights are served with), module k's
    block from transformers' class built with ``N + D`` layers (its layer N + k - 1 reads the MTP module's tensors),
    and the projections, norms and shared head read from the saved tensors."""

    def __init__(self, folder, depth):
        self.depth = depth
        self.tensors = {}
        for path in glob.glob(f"{folder}/*.safetensors"):
            self.tensors.update(load_file(path))
        kwargs = dict(dtype=torch.float32, attn_implementation="eager")
        self.main = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, **kwargs).eval()
        self.blocks = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, num_hidden_layers=N + depth, **kwargs).eval()
        self.eps = self.main.config.rms_norm_eps

    def loss(self, rows, targets):
        """L_MTP / λ = (1/D) Σ_k CE_k, each CE_k the mean over all rows' targets. ``rows``: 1-D tensors of real tokens
        (each run alone, no padding); ``targets(r, k)``: row r's depth-k targets [T - k], -100 ignored."""
        sums, counts = [torch.zeros(())] * self.depth, [0] * self.depth
        for r, row in enumerate(rows):
            ids, length = row[None], row.shape[0]
            h = self.main.model(ids).last_hidden_state
            positions = torch.arange(length)[None]
            cos, sin = self.main.model.rotary_emb(h, positions)
            for k in range(1, self.depth + 1):
                t, p, size = self.tensors, f"model.layers.{N + k - 1}.", length - k
                emb = t[p + "embed_tokens.weight"][ids[0, k:]][None]  # Emb(t_{i+k})
                # eq. 21: h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})] (the released column order)
                joined = torch.cat([rms_norm(emb, t[p + "enorm.weight"], self.eps),
                                    rms_norm(h[:, :size], t[p + "hnorm.weight"], self.eps)], dim=-1)
                causal = torch.full((size, size), float("-inf")).triu(1)[None, None]
                # eq. 22: the transformer block, over positions 1 .. T - k
                h = self.blocks.model.layers[N + k - 1](
                    joined @ t[p + "eh_proj.weight"].T, attention_mask=causal, position_ids=positions[:, :size],
                    position_embeddings=(cos[:, :size], sin[:, :size]),
                )
                # eq. 23: the shared output head; eq. 24: cross-entropy against t_{i+k+1}
                logits = rms_norm(h, t[p + "shared_head.norm.weight"], self.eps) @ t[p + "shared_head.head.weight"].T
                target = targets(r, k)
                keep = (target != -100).nonzero()[:, 0]
                sums[k - 1] = sums[k - 1] - logits[0].log_softmax(-1)[keep, target[keep]].sum()
                counts[k - 1] += keep.numel()
        return sum(s / max(c, 1) for s, c in zip(sums, counts)) / self.depth  # eq. 25 without λ

    def value(self, rows, targets) -> float:
        with torch.no_grad():
            return self.loss(rows, targets).item()


@pytest.fixture(scope="module", params=[1, 2], ids=["D1", "D2"])
def saved(request, tmp_path_factory):
    depth = request.param
    folder = tmp_path_factory.mktemp(f"mtp{depth}")
    build_model(tiny_config(num_nextn_predict_layers=depth), seed=depth).save_pretrained(folder)
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return ours.eval(), PaperMTP(folder, depth)


def test_mtp_loss_is_the_papers_with_ignored_labels_and_shift_labels(saved):
    ours, paper = saved
    labels = IDS.clone()
    labels[0, 5] = -100  # one ignored target in the middle of a row: depth k skips source 5 - k - 1 only
    labels[1, 2] = -100
    with torch.no_grad():
        out = ours(IDS, labels=labels, return_mtp_loss=True)
        without = ours(IDS, labels=labels, return_mtp_loss=False)
    # the target of depth k at position i is t_{i+k+1} = labels[i + k + 1]
    expected = paper.value([IDS[0], IDS[1]], lambda r, k: labels[r, k + 1:])
    assert out.mtp_loss.item() == pytest.approx(expected, rel=1e-5)
    # the main head's logits and CE are those of transformers' class, whether or not the MTP modules ran
    with torch.no_grad():
        theirs = paper.main(IDS, labels=labels)
    assert torch.equal(out.logits, without.logits) and without.mtp_loss is None
    assert relative_error(out.logits, theirs.logits) < 1e-5
    assert without.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(theirs.loss.item() + 0.3 * expected, rel=1e-5)  # CE + λ·L_MTP/λ

    # shift_labels (already aligned with the positions): depth k at position i predicts shift_labels[i + k]
    shift = torch.randint(1, 97, IDS.shape, generator=torch.Generator().manual_seed(6))
    shift[0, 3] = -100
    with torch.no_grad():
        out = ours(IDS, shift_labels=shift, return_mtp_loss=True)
    assert out.mtp_loss.item() == pytest.approx(paper.value([IDS[0], IDS[1]], lambda r, k: shift[r, k:]), rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mtp_loss_of_a_padded_batch_is_the_papers_on_each_row_alone(saved, side):
    ours, paper = saved
    lengths = (10, 6)
    labels = IDS.clone()
    labels[0, 4] = -100
    padded, mask, padded_labels = torch.zeros_like(IDS), torch.zeros_like(IDS), torch.full_like(IDS, -100)
    for r, n in enumerate(lengths):
        where = slice(0, n) if side == "right" else slice(IDS.shape[1] - n, None)
        padded[r, where], mask[r, where], padded_labels[r, where] = IDS[r, :n], 1, labels[r, :n]
    rows = [IDS[r, :n] for r, n in enumerate(lengths)]
    expected = paper.value(rows, lambda r, k: labels[r, k + 1 : lengths[r]])
    with torch.no_grad():
        out = ours(padded, attention_mask=mask, labels=padded_labels, return_mtp_loss=True)
        # labels left on the padding (pad ids, not -100) are ignored too: the mask decides
        on_padding = ours(padded, attention_mask=mask, labels=padded, return_mtp_loss=True)
    assert out.mtp_loss.item() == pytest.approx(expected, rel=1e-5)
    expected = paper.value(rows, lambda r, k: IDS[r, k + 1 : lengths[r]])
    assert on_padding.mtp_loss.item() == pytest.approx(expected, rel=1e-5)


def test_mtp_loss_gradients_are_the_papers_through_the_shared_embedding_head_and_trunk(saved):
    # the MTP objective trains the main model too: through h^0 (the trunk and its final norm), the shared embedding
    # (Emb(t_{i+k}) and the trunk's input) and the shared output head
    ours, paper = saved
    ours.zero_grad()
    ours(IDS, labels=IDS, return_mtp_loss=True).mtp_loss.backward()
    tensors = paper.tensors
    for tensor in tensors.values():
        tensor.requires_grad_(True)
    paper.main.zero_grad()
    paper.blocks.zero_grad()
    paper.loss([IDS[0], IDS[1]], lambda r, k: IDS[r, k + 1:]).backward()
    expected = {f"model.{n}": p.grad for n, p in paper.main.model.named_parameters() if p.grad is not None}
    copies = [f"model.layers.{N + k}." for k in range(paper.depth)]
    expected["model.embed_tokens.weight"] = expected["model.embed_tokens.weight"] + sum(
        tensors[p + "embed_tokens.weight"].grad for p in copies)
    expected["lm_head.weight"] = sum(tensors[p + "shared_head.head.weight"].grad for p in copies)
    for p in copies:
        for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            expected[p + name] = tensors[p + name].grad
        for name, parameter in paper.blocks.model.layers[int(p.split(".")[2])].named_parameters():
            if parameter.grad is not None:
                expected[p + name] = parameter.grad
    got = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    assert expected["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].norm() > 0  # the trunk does learn
    for name, grad in expected.items():
        assert relative_error(got[name], grad) < 1e-4, name


# --- training -------------------------------------------------------------------------------------------------------


def grads(model, ids, labels, **kwargs):
    model.zero_grad()
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mtp_loss_weight_zero_trains_like_a_model_without_mtp_modules():
    # λ = 0 is how a user turns the MTP objective off: the modules still ran, and their routers' balance loss (α > 0)
    # reached the main model through hnorm(h^0), so the main model trained differently from one without MTP modules
    fields = dict(aux_loss_alpha=0.01, mtp_loss_weight=0.0)
    model = build_model(tiny_config(num_nextn_predict_layers=1, **fields)).train()
    plain = build_model(tiny_config(num_nextn_predict_layers=0, **fields)).train()
    plain.load_state_dict({n: t for n, t in model.state_dict().items() if ".layers.3." not in n})
    calls = []
    model.model.mtp_layers[0].register_forward_hook(lambda *args: calls.append(1))
    out, got = grads(model, IDS, IDS)
    reference, expected = grads(plain, IDS, IDS)
    assert not calls and out.mtp_loss is None  # the modules did not run at all
    assert torch.equal(out.loss, reference.loss) and torch.equal(out.aux_loss, reference.aux_loss)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name
    assert model.model.mtp_layers[0].mlp.gate.tokens_per_expert.sum() == 0  # no load counted for the bias step

    # asked for by name, the MTP loss is reported but adds nothing to the loss (nor does its routers' balance loss)
    out, got = grads(model, IDS, IDS, return_mtp_loss=True)
    assert calls and out.mtp_loss > 0
    assert torch.allclose(out.loss, reference.loss) and torch.allclose(out.aux_loss, reference.aux_loss)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-7), name
    # and with λ > 0 both enter it
    model.config.mtp_loss_weight = 0.3
    out, _ = grads(model, IDS, IDS)
    assert out.aux_loss > reference.aux_loss
    assert torch.allclose(out.loss, reference.loss - reference.aux_loss + out.aux_loss + 0.3 * out.mtp_loss)


def test_the_mtp_routers_count_their_real_source_positions_and_move_their_bias():
    # depth 1 routes positions 0 .. T-2 whose t_i and t_{i+1} are real: a right-padded row of 6 real tokens gives 5
    model = build_model(tiny_config(num_nextn_predict_layers=2)).train()
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0
    for layer in model.model.layers[1:]:  # (layer 0 is dense)
        layer.mlp.gate.e_score_correction_bias.zero_()
    model(IDS, attention_mask=mask, labels=IDS)
    gates = {f"model.layers.{N + k - 1}.mlp.gate": layer.mlp.gate for k, layer in enumerate(model.model.mtp_layers, 1)}
    loads = {name: gate.tokens_per_expert.clone() for name, gate in gates.items()}
    for depth, load in enumerate(loads.values(), start=1):
        assert load.sum() == ((10 - depth) + (6 - depth)) * model.config.num_experts_per_tok, depth
    stats = model.update_expert_bias(update_speed=0.01)
    for name, load in loads.items():
        mean = load.mean()
        expected = torch.where(load > mean, -0.01, torch.where(load < mean, 0.01, 0.0))
        assert torch.equal(gates[name].e_score_correction_bias, expected) and (expected != 0).any(), name
        assert stats.max_vio[name] == pytest.approx(float(load.max() / mean - 1))


def test_mtp_loss_and_gradients_agree_over_mla_modes_and_experts_implementations():
    model = build_model(tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.01)).train()
    labels = IDS.clone()
    labels[0, 6] = -100
    results = {}
    for mode in ("expanded", "absorbed"):
        for implementation in ("eager", "batched_mm", "grouped_mm"):
            set_mla_mode(model, mode)
            model.set_experts_implementation(implementation)
            results[mode, implementation] = grads(model, IDS, labels)
            model.update_expert_bias(update_speed=0.0)  # reset the counts
    (reference, expected) = results["expanded", "eager"]
    for key, (out, got) in results.items():
        assert out.mtp_loss.item() == pytest.approx(reference.mtp_loss.item(), rel=1e-6), key
        assert got.keys() == expected.keys(), key
        for name, grad in expected.items():
            if grad.norm() > 0:
                assert relative_error(got[name], grad) < 1e-5, (key, name)
    assert expected["model.layers.4.eh_proj.weight"].norm() > 0


# --- decoding -------------------------------------------------------------------------------------------------------


def test_speculative_sampling_keeps_the_main_models_distribution():
    """MTP module 1 is made to draft one token v with certainty (q = one-hot): speculative sampling must keep v with
    probability p(v) and otherwise sample p without v (the residual max(0, p - q) has no mass at v), so every emitted
    token follows the main model's p. Each generated token's one-hot minus its p (read back from the main model on
    the output) sums to a martingale: z-scores stay small (always keeping the draft gives z > 20 at v). And a draft
    is emitted exactly when it was accepted (resampling from p itself after a rejection would emit v again)."""
    vocab, v, temperature = 12, 2, 0.8
    model = build_model(tiny_config(vocab_size=vocab, num_nextn_predict_layers=1, initializer_range=0.3,
                                    num_hidden_layers=2), seed=4)
    direction = model.lm_head.weight[v] / model.lm_head.weight[v].norm()
    module = model.model.layers[2]
    module.shared_head.norm.register_forward_hook(lambda mod, args, out: (60 * direction).expand_as(out))
    prompt = torch.tensor([[3, 5, 7]])
    for cache in ({}, {"cache_implementation": "static"}):
        torch.manual_seed(0)
        deviation, variance, accepted, emitted = torch.zeros(vocab), torch.zeros(vocab), 0, 0
        for _ in range(2):
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=80, do_sample=True, top_k=0, temperature=temperature,
                                     use_mtp=True, pad_token_id=0, **cache)
                p = (model(out).logits[0, 2:-1] / temperature).softmax(-1)
            stats = model.mtp_draft_stats
            assert stats.drafted > 30 and {int(d) for _, d in stats.drafts} == {v}
            # (a draft for the last position is never counted: no verified token follows it)
            emitted += sum(int(out[0, at]) == v for at, _ in stats.drafts if at < out.shape[1] - 1)
            accepted += stats.accepted
            deviation += (torch.nn.functional.one_hot(out[0, 3:], vocab) - p).sum(0)
            variance += (p * (1 - p)).sum(0)
        z = deviation / variance.sqrt()
        assert z.abs().max() < 4, (cache, z)
        assert emitted == accepted > 5, cache


@pytest.fixture(scope="module")
def trained():
    from test_speculative import train_mtp_model

    return train_mtp_model()


def test_speculative_decoding_edge_cases_give_plain_greedy(trained):
    from test_speculative import SEQUENCE

    prompt = SEQUENCE[:, 3:10]

    def generate(**kwargs):
        with torch.no_grad():
            return trained.generate(prompt, **(dict(max_new_tokens=8, do_sample=False, pad_token_id=0) | kwargs))

    plain = generate()
    for cache in ({}, {"cache_implementation": "static"}):
        assert torch.equal(generate(max_new_tokens=1, use_mtp=True, **cache), plain[:, :8])
        assert trained.mtp_draft_stats.drafted == 0 and trained.mtp_draft_stats.verify_steps == 1
        # EOS as the first drafted token (accepted: the round must stop there), and as the first token of a round
        for j in (0, 1, 2):
            eos = int(plain[0, 7 + j])
            assert torch.equal(generate(eos_token_id=eos, use_mtp=True, **cache), generate(eos_token_id=eos)), (cache, j)
        # scores and logits of every step, as plain decoding gives them
        ours = generate(use_mtp=True, return_dict_in_generate=True, output_scores=True, output_logits=True, **cache)
        theirs = generate(return_dict_in_generate=True, output_scores=True, output_logits=True)
        assert torch.equal(ours.sequences, plain) and len(ours.scores) == len(ours.logits) == 8
        for a, b in zip(ours.scores + ours.logits, theirs.scores + theirs.logits):
            assert relative_error(a, b) < 1e-5
        assert trained.mtp_draft_stats.accepted > 0
    # what transformers' assisted loop refuses is named
    with pytest.raises(ValueError, match="num_return_sequences has to be 1"):
        generate(use_mtp=True, do_sample=True, num_return_sequences=2)
    with torch.no_grad(), pytest.raises(ValueError, match="batch_size = 1"):
        trained.generate(prompt.expand(2, -1), max_new_tokens=3, do_sample=False, use_mtp=True, pad_token_id=0)


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_a_left_padded_prompt_drafts_what_module_1_computes_on_the_unpadded_one(cache):
    # two MTP modules: module 1 drafts. Over a left-padded prompt (batch 1), each draft must be what the module gives
    # without a cache on the unpadded output, and the tokens plain greedy's
    from test_speculative import reference_drafts

    model = build_model(tiny_config(num_nextn_predict_layers=2, initializer_range=0.3), seed=2)
    prompt, pads = IDS[:1, :4], 8
    padded = torch.cat([torch.zeros(1, pads, dtype=torch.long), prompt], dim=-1)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, **cache)
    with torch.no_grad():
        plain = model.generate(prompt, **kwargs)
        out = model.generate(padded, attention_mask=(padded != 0).long(), use_mtp=True, **kwargs)
    assert torch.equal(out[:, pads:], plain)
    reference = reference_drafts(model, plain)
    drafts = model.mtp_draft_stats.drafts
    assert len(drafts) > 5
    for target, draft in drafts:
        assert int(draft) == int(reference[target - pads - 2]), f"draft for position {target}"
