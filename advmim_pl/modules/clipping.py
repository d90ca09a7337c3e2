"""Gradient clipping that also works with fused optimizers when gradients are not loss-scaled."""

import torch
from lightning.pytorch.strategies import FSDPStrategy


class UnscaledClipping:
    """LightningModule mixin: ``trainer.gradient_clip_val`` with a fused optimizer under bf16 or fp32.

    Lightning refuses to clip for any optimizer that unscales gradients itself (``fused: true``), because under
    ``16-mixed`` the gradients are still multiplied by the loss scale when clipping runs. Without a
    ``GradScaler`` (``bf16-mixed``, ``32-true``) they are the true gradients, so this mixin clips them
    directly (by norm, or by value). fp16 with a fused optimizer and FSDP (sharded gradients) keep
    Lightning's own handling.
    """

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        trainer = self.trainer
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if (
            not gradient_clip_val
            or scaled
            or isinstance(trainer.strategy, FSDPStrategy)
            or not getattr(optimizer, "_step_supports_amp_scaling", False)
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
