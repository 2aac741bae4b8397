"""Training as a careful user runs it with transformers.Trainer, accelerate and TRL, against a reference: the same
documents unpacked, a plain PyTorch loop, or transformers' own class on the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, tiny_config
from transformers import DataCollatorWithFlattening

from modeling_deepseek_v3.training import routers


def documents(lengths=(8, 10, 9), seed=2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 97, (n,), generator=generator) for n in lengths]


def loads(model) -> dict[str, float]:
    counts = {name: router.tokens_per_expert.sum().item() for name, router in routers(model).items()}
    for router in routers(model).values():
        router.reset_counts()
    return counts


def test_packed_documents_give_the_mtp_loss_and_loads_of_the_documents_alone():
    # DataCollatorWithFlattening packs documents into one row, each one's positions counting from 0 (transformers'
    # mask builder keeps attention inside each document from them). The MTP modules trained on the targets that
    # cross a document's end: the last position of a document, fed the next document's first token, predicted its
    # second one; and those positions counted into the MTP routers' loads.
    docs = documents()
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist()} for d in docs])
    assert packed["input_ids"].shape[0] == 1 and (packed["position_ids"] == 0).sum() == len(docs)
    for depth in (1, 2):
        model = build_model(tiny_config(num_nextn_predict_layers=depth, aux_loss_alpha=0.0)).train()
        out = model(**packed, use_cache=False)  # transformers.Trainer sets use_cache=False
        packed_loads = loads(model)
        alone = [model(input_ids=d[None], labels=d[None], use_cache=False) for d in docs]
        assert packed_loads == loads(model)
        if depth == 1:
            # the reference: each cross-entropy summed over every document's targets, over their number
            ce = sum((o.loss - 0.3 * o.mtp_loss) * (len(d) - 1) for o, d in zip(alone, docs)) / sum(len(d) - 1 for d in docs)
            mtp = sum(o.mtp_loss * (len(d) - 2) for o, d in zip(alone, docs)) / sum(len(d) - 2 for d in docs)
            torch.testing.assert_close(out.mtp_loss, mtp)
            torch.testing.assert_close(out.loss, ce + 0.3 * mtp)
    # shift_labels (the pre-shifted targets) gives the same
    model = build_model(tiny_config(num_nextn_predict_layers=2, aux_loss_alpha=0.0)).train()
    shift = torch.nn.functional.pad(packed["labels"][:, 1:], (0, 1), value=-100)
    by_labels = model(**packed, use_cache=False).mtp_loss
    torch.testing.assert_close(
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], shift_labels=shift, use_cache=False).mtp_loss,
        by_labels,
    )


def rows_of(lengths, seed=0):
    return [{"input_ids": ids, "labels": ids.clone()} for ids in documents(lengths, seed)]


def pad_right(batch):
    """Right-padded batch; padding is 0 in the ids, -100 in the labels and 0 in the attention mask."""
    length = max(len(row["input_ids"]) for row in batch)
    out = {"input_ids": torch.zeros(len(batch), length, dtype=torch.long),
           "labels": torch.full((len(batch), length), -100), "attention_mask": torch.zeros(len(batch), length, dtype=torch.long)}
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        out["input_ids"][i, :n], out["labels"][i, :n], out["attention_mask"][i, :n] = row["input_ids"], row["labels"], 1
    return out


def trained(config, data, tmp_path, **arguments):
    from transformers import Trainer, TrainingArguments

    from modeling_deepseek_v3 import ExpertBiasUpdateCallback

    model = build_model(config)
    fields = dict(output_dir=str(tmp_path), learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", max_steps=2,
                  save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                  logging_steps=1)
    fields.update(arguments)
    callback = ExpertBiasUpdateCallback()
    Trainer(model=model, args=TrainingArguments(**fields), train_dataset=data, data_collator=pad_right,
            callbacks=[callback]).train()
    return model, callback


@pytest.mark.parametrize("padded", [False, True])
def test_gradient_accumulation_ends_with_the_parameters_of_the_larger_batch(tmp_path, padded):
    # equal rows: CE, the MTP loss and the balance loss all accumulate exactly; padded rows: CE does (the padding
    # is out of the loss and of num_items_in_batch), the per-micro-batch means do not (docs/equations.md)
    fields = dict(router_bias_update_speed=0.01)
    fields.update(dict(aux_loss_alpha=0.0) if padded else dict(num_nextn_predict_layers=1, aux_loss_alpha=0.01))
    config = tiny_config(**fields)
    data = rows_of((7, 12, 9, 5, 12, 6, 10, 8) if padded else (12,) * 8)
    large, large_steps = trained(config, data, tmp_path / "large", per_device_train_batch_size=4)
    small, small_steps = trained(config, data, tmp_path / "small", per_device_train_batch_size=1,
                                 gradient_accumulation_steps=4)
    assert len(large_steps.history) == len(small_steps.history) == 2  # one bias step per optimizer step
    mine = small.state_dict()
    for name, tensor in large.state_dict().items():
        torch.testing.assert_close(mine[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(large.lm_head.weight, build_model(config).lm_head.weight)


def test_trainer_losses_of_left_padded_batches_are_the_model_s_mean(tmp_path):
    # transformers.Trainer passes num_items_in_batch, its count of the labels other than -100, to training and
    # evaluation forwards alike. In a left-padded row the first real token is predicted from padding, no target of
    # this model's: divided by the Trainer's count, eval_loss and the training loss came out below the loss of the
    # same batch by the share of those labels (about 8% here)
    from datasets import Dataset
    from transformers import ByT5Tokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = ByT5Tokenizer(padding_side="left")
    texts = ["hello world", "ab", "the quick brown fox", "abc def", "xyz", "lorem ipsum dolor"]
    data = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    batch = collator([data[i] for i in range(len(texts))])
    assert (batch["attention_mask"][:, 0] == 0).sum() > 2 and (batch["labels"][:, 1:] != -100).sum() > 0
    model = build_model(tiny_config(vocab_size=384, pad_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
                                    aux_loss_alpha=0.01))
    with torch.no_grad():
        evaluated = model.eval()(**batch).loss.item()
        trained = model.train()(**batch).loss.item()
    for router in routers(model).values():
        router.reset_counts()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, per_device_eval_batch_size=6,
                             max_steps=1, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, data_collator=collator)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(evaluated, rel=1e-6)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(trained, rel=1e-6)
