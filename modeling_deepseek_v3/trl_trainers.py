"""TRL's SFT, DPO, GRPO and reward trainers with DeepSeek-V3's balancing: drop-in subclasses.

Needs the ``finetune`` extra. Each trainer is TRL's, plus what TRL does not know about this architecture:

* the routers' sequence-wise balance loss (``aux_loss_alpha``) is added to the loss TRL optimises. TRL computes its
  loss from the backbone through its own LM head (the reward trainer: from the classification head's logits), which
  drops the backbone's ``aux_loss``; its own MoE term
  (``router_aux_loss_coef``) is Mixtral's softmax load-balancing loss over the router logits, not DeepSeek-V3's, so a
  non-zero ``router_aux_loss_coef`` is refused. The balance loss is scaled for gradient accumulation exactly as each
  TRL trainer scales its own MoE term, and logged as ``balance_loss``;
* forwards made without autograd in training mode (the DPO/GRPO reference, GRPO's old-policy scores and generation)
  run as inference: they neither count tokens into the routers' loads nor compute a balance loss
  (``balance_hooks.BalanceLossTap``);
* ``ExpertBiasUpdateCallback`` is added unless one is passed: one aux-loss-free bias step of ±γ per optimizer step,
  MaxVio in the logs;
* ``peft_config`` goes through ``lora.prepare_lora_config`` (target names checked, LoRA over kept-FP8 layers);
* a policy given by its path is loaded with this package's class (TRL would load the class its config's
  ``architectures`` names in ``transformers``), with ``args.model_init_kwargs`` and ``quantization_config`` as TRL;
* the reference, as TRL documents it: with ``peft_config`` (or a ``PeftModel``), the policy with its adapters
  disabled; otherwise ``ref_model=AutoModelForCausalLM.from_pretrained(folder)``, or nothing at all for a policy
  loaded from a folder. TRL would rebuild that one with the class its config names in ``transformers`` (theirs, not
  ours), so the DPO trainer reloads the folder with the policy's class instead; GRPO (``beta`` > 0) needs adapters.
  A DPO reference must be the policy's architecture (a ``ValueError`` names the first config field that differs), and
  a policy built in memory, with neither a reference nor adapters to disable, is refused up front.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTTrainer
from trl.data_utils import get_dataset_column_names
from trl.trainer.utils import create_model_from_path, is_async_callable

from .balance_hooks import BalanceLossTap
from .lora import prepare_lora_config
from .modeling_deepseek_v3 import DeepseekV3ForCausalLM, DeepseekV3ForSequenceClassification, DeepseekV3PreTrainedModel
from .quantization.lora import register_fp8_lora_layers
from .training import ExpertBiasUpdateCallback

# Config fields that change what the network computes. The others may differ between policy and reference: dtype,
# quantization, kernels and experts implementation, training knobs (γ, α, λ) and the MTP depth (a reference never runs
# the MTP modules).
ARCHITECTURE_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
    "qk_nope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "n_group", "topk_group",
    "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "routed_scaling_factor", "topk_method",
    "scoring_func", "hidden_act", "rms_norm_eps", "attention_backend", "rope_parameters", "rope_interleave",
    "max_position_embeddings", "tie_word_embeddings",
)


def _base_config(model):
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(getattr(model, "module", model), "config", None)


def check_reference_model(model, ref_model) -> None:
    """``ValueError`` naming the first architecture field (``ARCHITECTURE_FIELDS``) whose value differs."""
    policy, reference = _base_config(model), _base_config(ref_model)
    if policy is None or reference is None:
        return
    for field in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(policy, field, None), getattr(reference, field, None)
        if mine != theirs:
            raise ValueError(
                f"The reference model differs from the policy in config field `{field}`: policy {mine!r}, reference "
                f"{theirs!r}. The reference must be the policy's starting point (the same architecture), e.g. "
                "AutoModelForCausalLM.from_pretrained(<the folder the policy was loaded from>)."
            )


def _reference_from_folder(model, ref_model, peft_config, needed: bool):
    """The DPO reference to pass to TRL. Where TRL would rebuild one from the policy's folder, it is built here with
    the policy's own class: TRL picks ``getattr(transformers, config.architectures[0])``, which for a DeepSeek-V3
    folder is transformers' class, not this one (plugins, FP8 kept or not). A policy built in memory has no folder."""
    if not needed or ref_model is not None or peft_config is not None or not isinstance(model, PreTrainedModel):
        return ref_model
    folder = getattr(model.config, "_name_or_path", "")
    if not folder:
        raise ValueError(
            "No reference model: the policy was built in memory, so there is no folder to reload it from. Pass "
            "`ref_model=AutoModelForCausalLM.from_pretrained(folder)` (a saved copy of the starting weights), or a "
            "`peft_config` (the reference is then the policy with its adapters disabled)."
        )
    quantization = getattr(model.config, "quantization_config", None)
    kwargs = {"quantization_config": quantization} if quantization is not None else {}
    return type(model).from_pretrained(folder, dtype=model.dtype, **kwargs).eval()


def _refuse_rebuilt_reference(model, peft_config, beta: float) -> None:
    if beta != 0.0 and peft_config is None and not isinstance(model, PeftModel):
        raise ValueError(
            f"GRPO with `beta`={beta} and no adapters: TRL would rebuild the reference from the policy's folder with "
            "transformers' own DeepseekV3ForCausalLM, not this class. Pass a `peft_config` (the reference is then the "
            "policy with its adapters disabled) or keep `beta=0.0`."
        )


def _policy_from_path(model, args, kwargs: dict):
    """The policy, loaded here when it is given by its path. TRL would load it with the class that its config's
    ``architectures`` names in ``transformers``: for a DeepSeek-V3 folder transformers' own class, which has none of
    this package's routers (nothing to balance) nor its plugins and FP8 loading. It is loaded with TRL's own loader and
    the arguments TRL would give it (``args.model_init_kwargs``, the trainer's ``quantization_config``), through
    ``AutoModelForCausalLM``, which gives this package's class."""
    if not isinstance(model, str):
        return model
    init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    quantization_config = kwargs.pop("quantization_config", None)
    if quantization_config is not None:
        if "quantization_config" in init_kwargs:
            raise ValueError(
                "`quantization_config` is set both as a trainer argument and in `args.model_init_kwargs`: set it once."
            )
        init_kwargs["quantization_config"] = quantization_config
    distributed = getattr(getattr(args, "distributed_state", None), "distributed_type", None)
    if distributed in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None  # as TRL: every process holds its whole copy
    policy = create_model_from_path(model, architecture=AutoModelForCausalLM, **init_kwargs)
    if args is not None:
        args.model_init_kwargs = None  # used here: TRL would warn that they are ignored for a model already loaded
    return policy


def check_model_head(model, head: type, trainer: str, role: str = "model") -> None:
    """A model of this package whose head is not the one the trainer scores through: TRL failed on it with an
    AttributeError (a classification model has no `generation_config`, a reference's missing LM head was None) or, for
    a causal LM given to the reward trainer, said `num_labels=2` of a model that has no score head at all."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    base = getattr(base, "module", base)
    if not isinstance(base, DeepseekV3PreTrainedModel) or isinstance(base, head):
        return  # a path, or another architecture: TRL's own checks
    way_out = (
        "load it with AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1) (a causal LM's folder "
        "gives it a new score head)" if head is DeepseekV3ForSequenceClassification
        else "load it with AutoModelForCausalLM.from_pretrained(folder)"
    )
    raise ValueError(f"{trainer} needs a {head.__name__} as its `{role}`, got a {type(base).__name__}: {way_out}.")


_PREFERENCE_COLUMNS = ("chosen", "rejected")


def check_preference_columns(trainer: str, bound: dict, tokenized=()) -> None:
    """The preference datasets hold `chosen` and `rejected` (TRL's format; `prompt` may be implicit in both), or the
    columns ``tokenized`` of an already tokenized one: TRL failed on another with a bare KeyError inside
    `datasets.map`."""
    for role in ("train_dataset", "eval_dataset"):
        datasets = bound.get(role)
        for split, dataset in (datasets.items() if isinstance(datasets, Mapping) else [(None, datasets)]):
            if dataset is None or not hasattr(dataset, "column_names"):
                continue  # not a `datasets` dataset: TRL reads it as it is
            columns = get_dataset_column_names(dataset)
            if any(all(c in columns for c in names) for names in tokenized):
                continue
            missing = [c for c in _PREFERENCE_COLUMNS if c not in columns]
            if missing:
                which = role if split is None else f"{role}[{split!r}]"
                raise ValueError(
                    f"{trainer}: `{which}` has no {' and no '.join(f'`{c}`' for c in missing)} column (its columns: "
                    f"{', '.join(map(str, columns))}). Preference data holds `chosen` and `rejected`, and optionally "
                    "`prompt`, as TRL documents."
                )


def _bound(init, args: tuple, kwargs: dict) -> dict:
    """The arguments of a trainer's ``__init__`` by name, however they were passed."""
    return inspect.signature(init).bind_partial(None, *args, **kwargs).arguments


def _prepare_peft(model, peft_config):
    if not isinstance(peft_config, LoraConfig):
        return peft_config
    if isinstance(model, PreTrainedModel):
        return prepare_lora_config(model, peft_config)
    return register_fp8_lora_layers(peft_config)  # a path TRL loads itself (the reward model): PEFT checks the names


class _DeepseekV3Balancing:
    """What the three trainers share (see the module doc)."""

    def _tap_model(self, model) -> None:
        # before TRL's setup, which may already run reference forwards (precomputed reference log-probabilities)
        self._tap = BalanceLossTap(model) if isinstance(model, nn.Module) else None

    def _finish_setup(self) -> None:
        coef = getattr(self, "router_aux_loss_coef", 0.0)  # the reward trainer has no MoE term of its own
        if coef:
            raise ValueError(
                f"`router_aux_loss_coef`={coef}: TRL's MoE term is Mixtral's load-balancing loss, "
                "not DeepSeek-V3's. These trainers add the model's own sequence-wise balance loss (config field "
                "`aux_loss_alpha`); leave `router_aux_loss_coef` unset."
            )
        if self._tap is None:
            self._tap = BalanceLossTap(self.model)
        if not any(isinstance(cb, ExpertBiasUpdateCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(ExpertBiasUpdateCallback())

    def _with_balance_loss(self, result, scale: float):
        balance = self._tap.pop()
        if balance is None:
            return result
        loss, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["balance_loss"].append(self.accelerator.gather_for_metrics(balance.detach()).mean().item())
        loss = loss + balance.to(loss.device) * scale
        return (loss, *rest) if rest is not None else loss


class DeepseekV3SFTTrainer(_DeepseekV3Balancing, SFTTrainer):
    """``trl.SFTTrainer`` with DeepSeek-V3's balancing (see the module doc)."""

    def __init__(self, model, args=None, *rest, peft_config=None, **kwargs):
        check_model_head(model, DeepseekV3ForCausalLM, type(self).__name__)
        model = _policy_from_path(model, args, kwargs)
        self._tap_model(model)
        super().__init__(model, args, *rest, peft_config=_prepare_peft(model, peft_config), **kwargs)
        self._finish_setup()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._tap.pop()  # only this loss's forwards count
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # as SFTTrainer scales its MoE term: with `num_items_in_batch`, gradient accumulation is left to the loss
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if num_items_in_batch is not None else 1
        return self._with_balance_loss(result, 1.0 / steps)


class DeepseekV3DPOTrainer(_DeepseekV3Balancing, DPOTrainer):
    """``trl.DPOTrainer`` with DeepSeek-V3's balancing and reference checks (see the module doc)."""

    def __init__(self, model, ref_model=None, args=None, *rest, peft_config=None, **kwargs):
        if ref_model is not None and not isinstance(ref_model, nn.Module):
            # TRL takes a model here, not a folder: a path would fail deep inside its setup
            raise TypeError(
                f"`ref_model` must be a model, got {type(ref_model).__name__} {ref_model!r}: load it with "
                "AutoModelForCausalLM.from_pretrained(...) (after `import modeling_deepseek_v3`), or leave it out."
            )
        if isinstance(ref_model, PeftModel):
            # TRL scores the reference through its backbone, which a PeftModel does not expose: it would fail inside
            # TRL's forward on the model's output
            raise TypeError(
                "`ref_model` is a PeftModel: pass its merged weights (modeling_deepseek_v3.lora.merge_and_unload(ref)) "
                "or, when the reference is the policy's own base, the policy with a `peft_config` and no `ref_model` "
                "(the reference is then the policy with its adapters disabled)."
            )
        check_model_head(model, DeepseekV3ForCausalLM, type(self).__name__)
        if ref_model is not None:
            check_model_head(ref_model, DeepseekV3ForCausalLM, type(self).__name__, "ref_model")
        check_preference_columns(type(self).__name__, _bound(DPOTrainer.__init__, (model, ref_model, args, *rest), kwargs))
        model = _policy_from_path(model, args, kwargs)
        ref_model = _reference_from_folder(model, ref_model, peft_config,
                                           needed=not getattr(args, "precompute_ref_log_probs", False))
        if ref_model is not None:
            check_reference_model(model, ref_model)
            # a reference never trains: in training mode its routers would count every reference token as load
            ref_model.eval()
        self._tap_model(model)
        super().__init__(model, ref_model, args, *rest, peft_config=_prepare_peft(model, peft_config), **kwargs)
        self._finish_setup()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._tap.pop()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return self._with_balance_loss(result, 1.0)  # as DPOTrainer adds its MoE term: Trainer scales the sum


def _check_rewards(name: str, rewards, count: int | None) -> None:
    """What a reward function returned: one real number (or None, which TRL reads as "no reward here") per completion.
    TRL turns it into a tensor without looking, so a scalar, a string or a [N, 2] tensor failed there with an error
    that names no function, and an infinite reward made every advantage of its group nan or ±inf."""
    if isinstance(rewards, torch.Tensor):
        if rewards.dim() != 1:
            raise ValueError(f"The reward function {name!r} returned a tensor of shape {list(rewards.shape)}; it must "
                             f"return one reward per completion ({count}).")
        rewards = rewards.tolist()
    if isinstance(rewards, (str, bytes, Mapping)) or not isinstance(rewards, Sequence) and not hasattr(rewards, "__len__"):
        how_many = f"{count} rewards" if count is not None else "rewards"
        raise ValueError(f"The reward function {name!r} returned {type(rewards).__name__} {rewards!r}; it must return "
                         f"a list of {how_many}, one per completion.")
    if count is not None and len(rewards) != count:
        raise ValueError(f"The reward function {name!r} returned {len(rewards)} rewards for {count} completions; it "
                         "must return one per completion.")
    for index, reward in enumerate(rewards):
        if isinstance(reward, torch.Tensor) and reward.numel() == 1:
            reward = reward.item()
        if reward is None:
            continue
        if not isinstance(reward, numbers.Real):  # bool included: True/False read as 1/0
            raise ValueError(f"The reward function {name!r} returned {reward!r} ({type(reward).__name__}) for "
                             f"completion {index}; a reward is a real number or None.")
        if math.isinf(reward):
            raise ValueError(f"The reward function {name!r} returned {reward} for completion {index}: an infinite "
                             "reward makes the advantages of its whole group nan or infinite. Return a finite reward, "
                             "or None (nan) where none applies.")


def _checked_reward(func, name: str):
    """``func`` with its return value checked (``_check_rewards``); TRL calls reward functions by keyword."""
    def checked(*args, **kwargs):
        rewards = func(*args, **kwargs)
        completions = kwargs["completions"] if "completions" in kwargs else args[1] if len(args) > 1 else None
        _check_rewards(name, rewards, None if completions is None else len(completions))
        return rewards

    checked.__name__ = getattr(func, "__name__", name)
    checked.__wrapped__ = func
    return checked


class DeepseekV3GRPOTrainer(_DeepseekV3Balancing, GRPOTrainer):
    """``trl.GRPOTrainer`` with DeepSeek-V3's balancing (see the module doc); what a reward function returns is
    checked, naming the function (one real number or None per completion, none infinite)."""

    def __init__(self, model, reward_funcs=None, args=None, *rest, peft_config=None, **kwargs):
        check_model_head(model, DeepseekV3ForCausalLM, type(self).__name__)
        model = _policy_from_path(model, args, kwargs)
        _refuse_rebuilt_reference(model, peft_config, getattr(args, "beta", 0.0))
        self._tap_model(model)
        super().__init__(model, reward_funcs, args, *rest, peft_config=_prepare_peft(model, peft_config), **kwargs)
        self._finish_setup()
        # TRL awaits an async reward function and calls a model: those are left as they are
        self.reward_funcs = [
            func if isinstance(func, nn.Module) or is_async_callable(func) else _checked_reward(func, name)
            for func, name in zip(self.reward_funcs, self.reward_func_names)
        ]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._tap.pop()
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # as GRPOTrainer scales its MoE term: its loss is already divided by the accumulation steps in training
        steps = getattr(self, "current_gradient_accumulation_steps", 1) if self.model.training else 1
        return self._with_balance_loss(loss, 1.0 / steps)


class DeepseekV3RewardTrainer(_DeepseekV3Balancing, RewardTrainer):
    """``trl.RewardTrainer`` with DeepSeek-V3's balancing (see the module doc), for a reward model
    (``DeepseekV3ForSequenceClassification`` with ``num_labels=1``; a path loads through
    ``AutoModelForSequenceClassification``, which gives this package's class). TRL scores the chosen and rejected
    sequences from the head's logits, which drops the backbone's balance loss."""

    def __init__(self, model, args=None, *rest, peft_config=None, **kwargs):
        check_model_head(model, DeepseekV3ForSequenceClassification, type(self).__name__)
        check_preference_columns(type(self).__name__, _bound(RewardTrainer.__init__, (model, args, *rest), kwargs),
                                 tokenized=(("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")))
        self._tap_model(model)
        super().__init__(model, args, *rest, peft_config=_prepare_peft(model, peft_config), **kwargs)
        self._finish_setup()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._tap.pop()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return self._with_balance_loss(result, 1.0)  # a mean per micro-batch, as TRL's loss: Trainer scales the sum


__all__ = ["ARCHITECTURE_FIELDS", "DeepseekV3DPOTrainer", "DeepseekV3GRPOTrainer", "DeepseekV3RewardTrainer",
           "DeepseekV3SFTTrainer", "check_model_head", "check_preference_columns", "check_reference_model"]
