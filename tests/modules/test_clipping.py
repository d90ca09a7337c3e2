"""Gradient clipping with the fused AdamW the configs use (Lightning alone refuses it under bf16-mixed)."""

import lightning as L
import pytest
import torch

from tests.helpers.micro import loader, micro_module, trainer


def _grads(module: L.LightningModule) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


class GradSizes(L.Callback):
    """Total norm and largest entry of the gradients before clipping (on_before_optimizer_step) and as the
    optimizer used them (on_before_zero_grad of the next step)."""

    def __init__(self) -> None:
        self.before, self.after = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(float(torch.nn.utils.get_total_norm(_grads(pl_module))))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        grads = _grads(pl_module)
        if grads:
            self.after.append((float(torch.nn.utils.get_total_norm(grads)), max(float(g.abs().max()) for g in grads)))


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_gradients_are_clipped_to_the_norm(precision):
    sizes = GradSizes()
    module = micro_module("simmim")
    trainer(3, [sizes], precision=precision, gradient_clip_val=1e-3).fit(module, loader())
    assert module.optimizers().optimizer.defaults["fused"]
    assert len(sizes.after) == 2 and min(sizes.before) > 1e-2  # the clip is active ...
    assert [norm for norm, _ in sizes.after] == pytest.approx([1e-3, 1e-3], rel=1e-3)  # ... and sets the norm


def test_clipping_by_value_bounds_every_gradient_entry():
    sizes = GradSizes()
    trainer(3, [sizes], precision="bf16-mixed", gradient_clip_val=1e-4, gradient_clip_algorithm="value").fit(
        micro_module("mae"), loader()
    )
    assert len(sizes.after) == 2 and all(largest == pytest.approx(1e-4) for _, largest in sizes.after)
