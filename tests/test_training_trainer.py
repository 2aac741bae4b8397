"""transformers.Trainer integration: one bias update per optimizer step under gradient accumulation, MaxVio in
the Trainer's log history, exact resume from a checkpoint, gradient checkpointing and bf16 autocast."""

from __future__ import annotations

import torch
from conftest import build_model, tiny_config
from transformers import Trainer, TrainingArguments

from modeling_deepseek_v3 import DeepseekV3ForCausalLM, ExpertBiasUpdateCallback
from modeling_deepseek_v3.training import routers

SEQ_LEN = 12


def dataset(n: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 97, (SEQ_LEN,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return rows


def arguments(folder, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(folder),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        learning_rate=1e-3,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


class RecordingCallback(ExpertBiasUpdateCallback):
    """Also records the statistics of every update and the biases right after it."""

    def __init__(self):
        super().__init__()
        self.updates = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        before = len(self._pending)
        control = super().on_step_end(args, state, control, model=model, **kwargs)
        assert len(self._pending) == before + 1
        biases = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
        self.updates.append((self._pending[-1], biases))
        return control


def test_gradient_accumulation_gives_one_update_per_optimizer_step(tmp_path):
    config = tiny_config(num_nextn_predict_layers=1, router_bias_update_speed=0.01)
    model = build_model(config)
    for router in routers(model).values():
        router.e_score_correction_bias.zero_()
    callback = RecordingCallback()
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(), callbacks=[callback])
    trainer.train()

    assert len(callback.updates) == 2  # max_steps optimizer steps, not 2 × 3 micro-batches
    previous = {n: torch.zeros(8) for n in routers(model)}
    for stats, biases in callback.updates:
        for name, load in stats.load.items():
            # all 3 micro-batches of 2 sequences were counted, once: K=3 experts per token, the MTP layer
            # (model.layers.3) sees the SEQ_LEN-1 positions that have a next token
            tokens = SEQ_LEN - 1 if name.startswith("model.layers.3.") else SEQ_LEN
            assert load.sum() == 3 * 2 * tokens * 3, name
            step = biases[name] - previous[name]
            assert torch.allclose(step.abs()[load != load.mean()], torch.tensor(0.01)), name
            previous[name] = biases[name]

    # the MaxVio statistics reach the Trainer's log history, at every logged training step
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry, (stats, _) in zip(logged, callback.updates):
        assert entry["max_vio_mean"] == stats.mean_max_vio
        assert entry["max_vio_max"] == stats.max_max_vio
    assert len(callback.history) == 2 and set(callback.history[0]) == {"step", *routers(model)}


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    config = tiny_config(num_nextn_predict_layers=1, router_bias_update_speed=0.01, aux_loss_alpha=0.001)
    args = arguments(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2)
    full = build_model(config)
    Trainer(model=full, args=args, train_dataset=dataset(), callbacks=[ExpertBiasUpdateCallback()]).train()

    resumed = build_model(config, seed=123)  # different weights and biases: everything must come from the checkpoint
    trainer = Trainer(model=resumed, args=args, train_dataset=dataset(), callbacks=[ExpertBiasUpdateCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))

    assert trainer.state.global_step == 4
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert any(name.endswith("e_score_correction_bias") for name in full_state)
    for name, tensor in full_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    # the biases really moved during the run (so the comparison above is not between untouched buffers)
    fresh = build_model(config)
    assert any(
        not torch.equal(full_state[n], fresh.state_dict()[n]) for n in full_state if n.endswith("e_score_correction_bias")
    )


def test_gradient_checkpointing_and_bf16_autocast_train(tmp_path):
    config = tiny_config(num_nextn_predict_layers=1, router_bias_update_speed=0.01, aux_loss_alpha=0.001)
    model = build_model(config)
    before = {n: r.e_score_correction_bias.clone() for n, r in routers(model).items()}
    args = arguments(tmp_path, gradient_checkpointing=True, bf16=True, max_steps=2, gradient_accumulation_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[ExpertBiasUpdateCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for name, router in routers(model).items():
        assert router.e_score_correction_bias.dtype == torch.float32  # ±γ steps need fp32, whatever autocast does
        assert not torch.equal(router.e_score_correction_bias, before[name])
    assert isinstance(model, DeepseekV3ForCausalLM) and model.model.layers[1].gradient_checkpointing
