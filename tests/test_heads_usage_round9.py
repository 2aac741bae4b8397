"""The classification heads as a transformers user trains them: transformers' own DeepseekV3 heads on the same folder
give the eval-mode logits and loss; in training our loss adds the routers' balance loss as the causal LM's does; the
Trainer's gradient accumulation, `config.return_dict=False`, `output_router_logits` and bad labels."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import Trainer, TrainingArguments

import modeling_deepseek_v3
from conftest import build_model, tiny_config

HEADS = {
    "seq": (modeling_deepseek_v3.DeepseekV3ForSequenceClassification, transformers.DeepseekV3ForSequenceClassification),
    "token": (modeling_deepseek_v3.DeepseekV3ForTokenClassification, transformers.DeepseekV3ForTokenClassification),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "base"
    build_model(tiny_config(num_hidden_layers=2, num_nextn_predict_layers=1)).save_pretrained(path)
    return path


def ids_batch(batch=3, length=7, seed=1):
    ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[0, :2] = 0  # left padding (pad_token_id 0): the sequence head reads the last non-padding token
    return ids


def labels_for(kind, ids):
    if kind == "seq":
        return torch.arange(ids.shape[0]) % 3
    return torch.arange(ids.numel()).reshape(ids.shape) % 3


def load_pair(folder, kind, **kwargs):
    ours_cls, theirs_cls = HEADS[kind]
    ours = ours_cls.from_pretrained(folder, num_labels=3, dtype=torch.float32, **kwargs)
    theirs = theirs_cls.from_pretrained(folder, num_labels=3, dtype=torch.float32, **kwargs)
    theirs.score.load_state_dict(ours.score.state_dict())  # the same fresh head
    return ours, theirs


@pytest.mark.parametrize("kind", list(HEADS))
def test_training_loss_adds_the_balance_loss_and_eval_is_transformers_head(folder, kind):
    # the generic heads read the backbone's last hidden state only: a Trainer fine-tuning a classifier optimised it
    # without the routers' balance loss (`aux_loss_alpha`), which the causal LM adds
    ours, theirs = load_pair(folder, kind)
    for head in (ours, theirs):
        if kind == "token":
            head.dropout.p = 0.0  # the token head's dropout, so that the two training forwards compare
    ids = ids_batch()
    labels, mask = labels_for(kind, ids), (ids != 0).long()
    with torch.no_grad():
        expected = theirs.eval()(ids, attention_mask=mask, labels=labels)
        got = ours.eval()(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    assert got.aux_loss is None  # routers compute no balance loss in inference

    got = ours.train()(ids, attention_mask=mask, labels=labels)
    expected = theirs.train()(ids, attention_mask=mask, labels=labels)
    assert got.aux_loss is not None and got.aux_loss.item() > 0
    torch.testing.assert_close(got.loss, expected.loss + got.aux_loss)
    got.loss.backward()
    assert ours.model.layers[1].mlp.gate.weight.grad is not None


@pytest.mark.parametrize("kind", list(HEADS))
def test_router_logits_and_config_return_dict_false(folder, kind):
    # `output_router_logits=True` was dropped by the generic heads; with `config.return_dict=False` the backbone gave a
    # tuple and the head failed reading `.last_hidden_state` (transformers' head fails the same)
    ours, _ = load_pair(folder, kind)
    ids, causal = ids_batch(), transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    labels = labels_for(kind, ids)
    with torch.no_grad():
        out = ours.eval()(ids, labels=labels, output_router_logits=True)
        reference = causal(ids, output_router_logits=True).router_logits
        assert len(out.router_logits) == len(reference) == 1  # one MoE layer
        torch.testing.assert_close(out.router_logits[0], reference[0])
        ours.config.return_dict = False
        loss, logits = ours(ids, labels=labels)[:2]
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)


def test_trainer_gradient_accumulation_keeps_the_loss_of_one_batch(folder, tmp_path):
    # the generic heads take **kwargs, so the Trainer handed them `num_items_in_batch` and left their loss undivided,
    # taking it for one already normalised by the accumulated batch: it is a micro-batch mean, and the loss (and
    # gradients) came out gradient_accumulation_steps times larger
    rows = [{"input_ids": row, "labels": i % 3} for i, row in enumerate(ids_batch(batch=4, length=6, seed=2))]
    logs = []
    for batch, steps in ((4, 1), (2, 2)):
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3, dtype=torch.float32)
        args = TrainingArguments(output_dir=str(tmp_path / str(steps)), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=steps, max_steps=1, logging_steps=1, report_to="none",
                                 use_cpu=True, disable_tqdm=True, save_strategy="no")
        trainer = Trainer(model=model, args=args, train_dataset=rows,
                          callbacks=[modeling_deepseek_v3.ExpertBiasUpdateCallback()])
        trainer.train()
        logs.append(trainer.state.log_history[0])
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-4)
    assert logs[1]["grad_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-4)
    assert "max_vio_mean" in logs[1]  # the bias callback stepped the routers of the head model


@pytest.mark.parametrize(
    "kind, labels, message",
    [
        ("seq", torch.tensor([0, 3, 1]), r"-100 or class ids in \[0, num_labels=3\), got 1 value\(s\) outside, e\.g\. \[3\]"),
        ("seq", torch.tensor([0, 1]), r"one class id per sequence, \[3\], got shape \[2\]"),
        ("token", torch.full((3, 7), -1), r"-100 or class ids in \[0, num_labels=3\), got 21 value\(s\)"),
        ("token", torch.zeros(3, 6, dtype=torch.long), r"one class id per token, \[3, 7\], got shape \[3, 6\]"),
        ("token", torch.zeros(3, 7), r"class ids .* got dtype torch\.float32"),
    ],
)
def test_bad_class_labels_are_named(folder, kind, labels, message):
    # transformers' heads fail inside the cross-entropy ("Target 3 is out of bounds", on a GPU a device-side assert)
    model = HEADS[kind][0].from_pretrained(folder, num_labels=3, dtype=torch.float32).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        model(ids_batch(), labels=labels)
    ignored = torch.full_like(labels_for(kind, ids_batch()), -100)  # -100 is ignored, as by transformers' loss
    ignored.view(-1)[0] = 2
    with torch.no_grad():
        assert torch.isfinite(model(ids_batch(), labels=ignored).loss)


def test_a_saved_head_reloads_in_both_classes_with_its_labels(folder, tmp_path):
    id2label = {0: "neg", 1: "neu", 2: "pos"}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()}, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        model.score.weight.normal_()
        expected = model(ids_batch()).logits
    model.save_pretrained(tmp_path / "head")
    for cls in (transformers.AutoModelForSequenceClassification, transformers.DeepseekV3ForSequenceClassification):
        reloaded = cls.from_pretrained(tmp_path / "head", dtype=torch.float32).eval()
        assert reloaded.config.id2label == id2label and reloaded.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids_batch()).logits, expected)
