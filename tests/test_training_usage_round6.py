"""Training as a careful user runs it with transformers.Trainer, accelerate and TRL, against a reference: the same
documents unpacked, a plain PyTorch loop, or transformers' own class on the same weights."""

from __future__ import annotations

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
