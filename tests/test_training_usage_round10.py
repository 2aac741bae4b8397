"""Single-process training loops in depth, against references outside our code: the paper's rules written in plain
PyTorch (the bias step over every micro-batch of an optimizer step, the MTP loss), one large batch, an uninterrupted
run, fp32 training, and transformers' own DeepseekV3ForCausalLM trained by the same Trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import build_model, save_checkpoint, tiny_config
from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments
from transformers.masking_utils import create_causal_mask

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, ExpertBiasUpdateCallback
from modeling_deepseek_v3.training import routers

VOCAB = 97


def rows(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(1, VOCAB, (n,), generator=generator)), "labels": ids.clone()} for n in lengths]


def pad_right(batch):
    length = max(len(row["input_ids"]) for row in batch)
    out = {"input_ids": torch.zeros(len(batch), length, dtype=torch.long), "labels": torch.full((len(batch), length), -100),
           "attention_mask": torch.zeros(len(batch), length, dtype=torch.long)}
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        out["input_ids"][i, :n], out["labels"][i, :n], out["attention_mask"][i, :n] = row["input_ids"], row["labels"], 1
    return out


def arguments(folder, **overrides) -> TrainingArguments:
    fields = dict(output_dir=str(folder), per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3, logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    fields.update(overrides)
    return TrainingArguments(**fields)


def biases(model) -> dict[str, torch.Tensor]:
    return {name: router.e_score_correction_bias.clone() for name, router in routers(model).items()}


def losses(trainer, key="loss"):
    return [entry[key] for entry in trainer.state.log_history if "loss" in entry]


# --- the bias step of the paper over every micro-batch, with evaluation in between --------------------------------


class PaperBiasStep(TrainerCallback):
    """The reference: records what every training forward routed (hooks on the routers) and, at each optimizer step
    before the bias callback runs, computes ``b_i + γ·sign(mean_load − load_i)`` from all of the step's micro-batches,
    the real tokens read from the batch's own attention mask (an MTP depth-k position is real when t_i..t_{i+k} are)."""

    def __init__(self, model, gamma):
        self.gamma, self.expected, self.masks, self.picks = gamma, [], [], {name: [] for name in routers(model)}
        model.register_forward_pre_hook(self._batch, with_kwargs=True)
        for name, router in routers(model).items():
            router.register_forward_hook(lambda module, args, out, name=name: self._routed(module, name, out))

    def _routed(self, router, name, out):
        if router.training:
            self.picks[name].append(out[2])

    def _batch(self, module, args, kwargs):
        if module.training:
            self.masks.append(kwargs["attention_mask"].bool())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        expected = {}
        for name, bias in biases(model).items():
            depth = max(int(name.split(".")[2]) - model.config.num_hidden_layers + 1, 0)  # 0: a decoder layer
            load = torch.zeros_like(bias)
            assert len(self.picks[name]) == len(self.masks)  # one routing per micro-batch, none from evaluation
            for mask, picks in zip(self.masks, self.picks[name]):
                real = mask[:, : mask.shape[1] - depth].clone()
                for j in range(1, depth + 1):
                    real &= mask[:, j : j + real.shape[1]]
                load += torch.bincount(picks[real.reshape(-1)].reshape(-1), minlength=load.numel()).float()
            expected[name] = bias + self.gamma * torch.sign(load.mean() - load)
            self.picks[name].clear()
        self.masks.clear()
        self.expected.append(expected)


class Observed(TrainerCallback):
    def __init__(self):
        self.after_step, self.counts_at_eval = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(biases(model))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.counts_at_eval.append(sum(r.tokens_per_expert.sum().item() for r in routers(model).values()))


def test_trainer_bias_steps_are_the_paper_s_over_every_micro_batch_and_never_count_evaluation(tmp_path):
    config = tiny_config(num_nextn_predict_layers=2, router_bias_update_speed=0.01, aux_loss_alpha=0.01)
    # right-padded rows, each optimizer step's two micro-batches holding the same lengths: every micro-batch then has
    # the same share of the rows and of the targets at every depth, and accumulation is exact (docs/equations.md)
    data = rows((12, 9, 9, 12, 7, 12, 12, 7, 10, 12, 12, 10))
    common = dict(data_collator=pad_right, train_dataset=data)
    train = dict(max_grad_norm=0.05, warmup_steps=1, lr_scheduler_type="linear", optim="sgd", learning_rate=0.5,
                 train_sampling_strategy="sequential")

    model = build_model(config)
    reference, observed = PaperBiasStep(model, 0.01), Observed()
    args = arguments(tmp_path / "eval", gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=1,
                     per_device_eval_batch_size=4, **train)
    # the reference runs before the bias callback, the observer after it
    trainer = Trainer(model=model, args=args, eval_dataset=rows((12, 10, 5, 12), seed=1),
                      callbacks=[reference, ExpertBiasUpdateCallback(), observed], **common)
    trainer.train()
    assert len(reference.expected) == len(observed.after_step) == 3  # one step per optimizer step, not per micro-batch
    assert len(observed.counts_at_eval) == 3 and observed.counts_at_eval == [0, 0, 0]  # eval forwards count nothing
    for step, (expected, actual) in enumerate(zip(reference.expected, observed.after_step)):
        for name in expected:
            assert torch.equal(actual[name], expected[name]), (step, name)
    assert {name.split(".")[2] for name in expected} == {"1", "2", "3", "4"}  # MTP depths 1 and 2 included

    # the same steps in one batch of 4 and no evaluation end with the same parameters and biases, grad clipping and
    # the warmup (a first step at lr 0: the biases move anyway, γ does not follow the lr) included
    large = build_model(config)
    Trainer(model=large, args=arguments(tmp_path / "large", per_device_train_batch_size=4, **train),
            callbacks=[ExpertBiasUpdateCallback()], **common).train()
    mine = model.state_dict()
    for name, tensor in large.state_dict().items():
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert trainer.state.log_history[0]["learning_rate"] == 0
    assert not torch.equal(observed.after_step[0]["model.layers.1.mlp.gate"], biases(build_model(config))["model.layers.1.mlp.gate"])


# --- a hand-written loop ---------------------------------------------------------------------------------------------


def hand_loop(config, ids, micro_batches, steps=3, num_items=False):
    """SGD over ``ids`` split into ``micro_batches``, a LambdaLR warmup from 0, a validation forward in eval mode after
    every step, and one ``update_expert_bias`` per optimizer step."""
    model = build_model(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 1))
    total_losses, targets = [], (ids[:, 1:] != -100).sum()
    for _ in range(steps):
        total = 0.0
        for chunk in ids.chunk(micro_batches):
            if num_items:  # as transformers.Trainer calls it: the loss is already the batch's share
                loss = model(chunk, labels=chunk, num_items_in_batch=targets).loss
            else:  # the usual loop: each micro-batch's mean over the number of micro-batches
                loss = model(chunk, labels=chunk).loss / micro_batches
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        model.update_expert_bias()
        model.eval()
        model(ids[:2], labels=ids[:2])  # validation: inference, no counts
        model.train()
        total_losses.append(total)
    return model, total_losses


def accumulation_config():
    return tiny_config(num_nextn_predict_layers=2, router_bias_update_speed=0.01, aux_loss_alpha=0.01)


@pytest.fixture(scope="module")
def one_large_batch():
    """The hand loop over the whole batch at once: the reference of both accumulation cases (only read by them)."""
    ids = torch.randint(1, VOCAB, (8, 12), generator=torch.Generator().manual_seed(1))
    return ids, *hand_loop(accumulation_config(), ids, 1)


@pytest.mark.parametrize("micro_batches,num_items", [(2, False), (4, True)])
def test_a_hand_loop_with_accumulation_ends_like_one_large_batch(one_large_batch, micro_batches, num_items):
    ids, large, large_losses = one_large_batch
    small, small_losses = hand_loop(accumulation_config(), ids, micro_batches, num_items=num_items)
    assert small_losses == pytest.approx(large_losses, abs=1e-6)
    mine = small.state_dict()
    for name, tensor in large.state_dict().items():
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert all(r.tokens_per_expert.sum() == 0 for r in routers(small).values())  # the validation forwards counted nothing


# --- resuming a Trainer run from its own checkpoint ------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resume_from_the_last_checkpoint_continues_the_uninterrupted_run_bit_for_bit(tmp_path):
    # attention dropout (the RNG states), a warmup and linear decay (the scheduler), AdamW (its moments), clipping,
    # the biases and two MTP depths with a balance loss
    config = tiny_config(num_nextn_predict_layers=2, router_bias_update_speed=0.01, aux_loss_alpha=0.01,
                         attention_dropout=0.2)
    train = dict(max_steps=6, gradient_accumulation_steps=2, warmup_steps=2, lr_scheduler_type="linear",
                 max_grad_norm=0.5, save_strategy="steps", save_steps=3)
    data = rows((12,) * 24)
    full = build_model(config)
    uninterrupted = Trainer(model=full, args=arguments(tmp_path / "full", **train), train_dataset=data,
                            callbacks=[ExpertBiasUpdateCallback()])
    uninterrupted.train()

    first = build_model(config)
    Trainer(model=first, args=arguments(tmp_path / "cut", **train), train_dataset=data,
            callbacks=[ExpertBiasUpdateCallback(), StopAt(3)]).train()
    resumed = build_model(config, seed=7)  # other weights and biases: everything must come from the checkpoint
    trainer = Trainer(model=resumed, args=arguments(tmp_path / "cut", **train), train_dataset=data,
                      callbacks=[ExpertBiasUpdateCallback()])
    trainer.train(resume_from_checkpoint=True)

    assert trainer.state.global_step == 6 and len(losses(trainer)) == 6
    for key in ("loss", "grad_norm", "learning_rate", "max_vio_mean", "max_vio_max"):
        assert losses(trainer, key) == losses(uninterrupted, key), key
    ours = resumed.state_dict()
    for name, tensor in full.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    moments = [(uninterrupted.optimizer.state[p], trainer.optimizer.state[q]) for p, q in zip(full.parameters(), resumed.parameters())]
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in moments)
    assert trainer.lr_scheduler.state_dict() == uninterrupted.lr_scheduler.state_dict()
    assert all(r.tokens_per_expert.sum() == 0 for r in routers(resumed).values())


# --- FP8 training ----------------------------------------------------------------------------------------------------


def test_fp8_block_trains_with_the_trainer_close_to_fp32_and_its_save_loads_back(tmp_path):
    from modeling_deepseek_v3.quantization import FP8TrainingLinear

    data = rows((12,) * 8)
    train = dict(per_device_train_batch_size=4, optim="sgd", learning_rate=0.2, max_steps=2)
    runs = {}
    for quantizer in (None, "fp8_block"):
        config = tiny_config(num_nextn_predict_layers=1, router_bias_update_speed=0.01, aux_loss_alpha=0.01, quantizer=quantizer)
        model = build_model(config)
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        trainer = Trainer(model=model, args=arguments(tmp_path / str(quantizer), **train), train_dataset=data,
                          callbacks=[ExpertBiasUpdateCallback()])
        trainer.train()
        moved = {name for name, p in model.named_parameters() if not torch.equal(p, start[name])}
        runs[quantizer] = model, losses(trainer), moved
    (plain, plain_losses, plain_moved), (fp8, fp8_losses, fp8_moved) = runs[None], runs["fp8_block"]
    assert isinstance(fp8.model.layers[1].self_attn.o_proj, FP8TrainingLinear)
    assert fp8_losses == pytest.approx(plain_losses, abs=2e-3)  # FP8 rounding only
    assert fp8_moved == plain_moved and len(fp8_moved) > 40  # every parameter fp32 trains gets a gradient in FP8 too
    for name, bias in biases(fp8).items():
        assert (bias - biases(plain)[name]).abs().max() <= 0.02 + 1e-6  # 2 steps of ±γ, one routing flip at most

    fp8.save_pretrained(tmp_path / "saved")
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert back.config.quantizer == "fp8_block" and isinstance(back.model.layers[1].self_attn.o_proj, FP8TrainingLinear)
    saved = fp8.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in back.state_dict().items())

    # γ = 0 and α = 0: the biases stay, there is no balance loss, and the FP8 step still trains
    frozen = build_model(tiny_config(num_nextn_predict_layers=1, router_bias_update_speed=0.0, aux_loss_alpha=0.0,
                                     quantizer="fp8_block")).train()
    before = biases(frozen)
    ids = torch.stack([row["input_ids"] for row in data[:4]])
    out = frozen(ids, labels=ids)
    assert out.aux_loss is None and out.mtp_loss is not None
    out.loss.backward()
    assert frozen.model.layers[1].mlp.experts.gate_up_proj.grad.abs().sum() > 0
    frozen.update_expert_bias()
    assert all(torch.equal(bias, before[name]) for name, bias in biases(frozen).items())


# --- transformers' own class under the same Trainer ------------------------------------------------------------------


def test_trainer_with_accumulation_trains_like_transformers_own_class(tmp_path):
    # with no bias step, no balance loss and no MTP module the math is transformers': same folder, same Trainer
    # (num_items_in_batch, clipping, schedule), same parameters at the end
    config = tiny_config(router_bias_update_speed=0.0, aux_loss_alpha=0.0)
    folder = save_checkpoint(config, tmp_path / "start")
    data = rows((12, 7, 12, 9, 12, 12, 10, 12))
    trained = {}
    for name, cls in (("ours", transformers.AutoModelForCausalLM), ("theirs", transformers.DeepseekV3ForCausalLM)):
        model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        args = arguments(tmp_path / name, gradient_accumulation_steps=2, optim="sgd", learning_rate=0.3, max_grad_norm=1.0)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=pad_right)
        trainer.train()
        trained[name] = model, losses(trainer)
    (ours, our_losses), (theirs, their_losses) = trained["ours"], trained["theirs"]
    assert isinstance(ours, DeepseekV3ForCausalLM) and type(theirs).__module__.startswith("transformers.")
    assert our_losses == pytest.approx(their_losses, abs=1e-6)
    their_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, their_state[name], rtol=0, atol=1e-6, msg=name)


# --- MTP with D = 2 over packed documents ------------------------------------------------------------------------------


def depth_sums(model, ids, labels):
    """[(summed cross-entropy, targets)] of the main head and every MTP depth of one unpacked sequence, from the
    modules in plain PyTorch: module k runs the full length with t_{i+k} zero past the end (causal: the tail is ignored)."""
    length = ids.shape[1]
    hidden = model.model(ids, use_cache=False).last_hidden_state  # h^0: after model.norm
    positions = torch.arange(length)[None]
    cos, sin = model.model.rotary_emb(hidden, positions)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                              position_ids=positions)
    embeds = model.model.embed_tokens(ids)
    logits, sums = model.lm_head(hidden), []
    for k in range(len(model.model.mtp_layers) + 1):
        if k:
            ahead = torch.cat([embeds[:, k:], torch.zeros_like(embeds[:, :k])], dim=1)
            hidden, normed, _ = model.model.mtp_layers[k - 1](hidden, ahead, (cos, sin), mask, position_ids=positions,
                                                              return_normed=True)
            logits = model.lm_head(normed)
        targets = labels[:, k + 1 :]
        ce = F.cross_entropy(logits[:, : length - k - 1].float().reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100,
                             reduction="sum")
        sums.append((ce, (targets != -100).sum()))
    return sums


def test_two_mtp_depths_over_packed_documents_give_the_paper_loss_of_the_documents_alone():
    generator = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, VOCAB, (n,), generator=generator) for n in (8, 10, 9)]
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist()} for d in docs])
    labels = packed["labels"].clone()
    labels[0, 4] = labels[0, 12] = -100  # ignored targets inside the documents too
    model = build_model(tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.0, mtp_loss_weight=0.3)).train()
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=labels, use_cache=False)
    per_doc, start = [], 0
    for doc in docs:
        per_doc.append(depth_sums(model, doc[None], labels[:, start : start + len(doc)]))
        start += len(doc)
    ce = [sum(d[k][0] for d in per_doc) / sum(d[k][1] for d in per_doc) for k in range(3)]
    mtp = (ce[1] + ce[2]) / 2  # (1/D) Σ_k CE_k
    torch.testing.assert_close(out.mtp_loss, mtp)
    torch.testing.assert_close(out.loss, ce[0] + 0.3 * mtp)  # CE + (λ/D) Σ_k CE_k
