"""The model's own balance loss for training loops that compute their loss from the backbone, and inference semantics
for the forwards that cannot train it.

TRL's trainers (SFT, DPO, GRPO) never call ``DeepseekV3ForCausalLM.forward`` with labels: they run the backbone
(``DeepseekV3Model``) and score the tokens with their own LM head. The routers' sequence-wise balance loss
(``aux_loss_alpha``, returned by the backbone as ``aux_loss``) would so never reach the optimised loss, and every
auxiliary forward they make without autograd (the DPO or GRPO reference, GRPO's old-policy log-probabilities and its
generation) would, with the model in training mode, count its tokens into the routers' loads — the aux-loss-free bias
step would then balance the reference's routing as well as the policy's — and compute a balance loss for nothing.

``BalanceLossTap`` hooks every ``DeepseekV3Model`` inside a model:

* a forward with autograd on keeps the backbone's ``aux_loss``; ``pop()`` returns their sum since the last call;
* a forward with autograd off, while the model is in training mode, runs the backbone in eval mode: no token counts,
  no balance loss. The outputs are the same (the model has no dropout and routes identically in both modes).

The MTP modules run only when ``DeepseekV3ForCausalLM.forward`` gets labels in training mode, which TRL's fused LM
head never does: under TRL neither the policy nor the reference runs them (fine-tuning leaves them as they are).

Gradient checkpointing is unaffected: its recomputation happens inside a backward, under a forward that had
autograd on.
"""

from __future__ import annotations

import torch
from torch import nn

from .modeling_deepseek_v3 import DeepseekV3Model


class BalanceLossTap:
    """Hooks on the DeepSeek-V3 backbones of ``model`` (see the module doc); ``remove()`` takes them off."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"BalanceLossTap hooks a model (an nn.Module), got {type(model).__name__}.")
        backbones = [m for m in model.modules() if isinstance(m, DeepseekV3Model)]
        if not backbones:
            raise ValueError(f"{type(model).__name__} holds no DeepseekV3Model: there is no DeepSeek-V3 balance loss to tap.")
        self._losses: list[torch.Tensor] = []
        self._frames: list[tuple[bool, bool]] = []  # (grad enabled, switched to eval) per forward in flight
        self._handles = []
        for backbone in backbones:
            self._handles.append(backbone.register_forward_pre_hook(self._before))
            self._handles.append(backbone.register_forward_hook(self._after, always_call=True))

    def _before(self, module: nn.Module, args) -> None:
        grad = torch.is_grad_enabled()
        inference = module.training and not grad
        if inference:
            module.eval()
        self._frames.append((grad, inference))

    def _after(self, module: nn.Module, args, output) -> None:
        grad, inference = self._frames.pop()
        if inference:
            module.train()
        aux_loss = getattr(output, "aux_loss", None)
        if grad and aux_loss is not None:
            self._losses.append(aux_loss)

    def pop(self) -> torch.Tensor | None:
        """The summed balance loss of the autograd forwards since the last call (None if there was none)."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["BalanceLossTap"]
