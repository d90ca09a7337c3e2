"""Activation checkpointing: the same gradients as without it, with and without the plug-in (whose auxiliary pass must
be recomputed through its own norms), and an exact resume."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.models import checkpointing
from advmim_pl.models.branch_norm import BranchNorm
from tests.helpers.micro import bundled_sample, loader, micro_module, trainer


class FirstGradients(L.Callback):
    """The gradients of the first optimizer step, by parameter name."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def first_gradients(checkpointed: bool, plugin: bool, method: str = "mae") -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = micro_module(
        method,
        plugin=AEMIM(attack=Attacker(steps=2)) if plugin else None,
        activation_checkpointing=checkpointed,
        drop_path_rate=0.1,  # the recompute must draw the forward's stochastic-depth masks
    )
    with torch.no_grad():  # aux norms unlike the clean ones (they start as copies), as after some training
        for norm in (m for m in module.modules() if isinstance(m, BranchNorm)):
            norm.aux.weight.mul_(1 + 0.5 * torch.rand_like(norm.aux.weight))
            norm.aux.bias.add_(0.1 * torch.randn_like(norm.aux.bias))
    capture = FirstGradients()
    trainer(1, [capture]).fit(module, loader(n=8))
    return capture.grads


@pytest.mark.parametrize("plugin", [False, True], ids=["MAE", "MAE+AEMIM"])
def test_checkpointed_gradients_equal_the_plain_ones(plugin):
    plain, checkpointed = first_gradients(False, plugin), first_gradients(True, plugin)
    assert plain.keys() == checkpointed.keys()
    if plugin:  # the auxiliary norms got gradient: the test covers the branch switch
        assert any(".aux." in name and grad.abs().sum() > 0 for name, grad in plain.items())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_simmim_with_the_plugin_is_checkpointed_exactly_too():
    plain, checkpointed = first_gradients(False, True, "simmim"), first_gradients(True, True, "simmim")
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_recompute_without_the_pass_branch_gives_wrong_gradients(monkeypatch):
    """What the routing prevents: recomputing every block through whatever norms are active at backward time (the
    clean ones) changes the auxiliary norms' gradients. This shows that the equality test above can fail."""
    plain = first_gradients(False, True)
    monkeypatch.setattr(checkpointing, "routed", lambda block, x, route: block(x))
    naive = first_gradients(True, True)
    wrong = [n for n, g in plain.items() if not torch.allclose(naive[n], g, rtol=1e-4, atol=1e-6)]
    assert any(".aux." in name for name in wrong), wrong


def test_checkpointing_is_on_in_every_block_stack_and_off_by_default():
    module = micro_module(plugin=AEMIM(), activation_checkpointing=True)
    assert module.encoder.vit.grad_checkpointing and module.decoder.grad_checkpointing
    assert module.aux_decoder.grad_checkpointing
    assert any(isinstance(m, BranchNorm) for m in module.encoder.vit.blocks.modules())
    default = micro_module(plugin=AEMIM())
    assert not default.encoder.vit.grad_checkpointing and not default.aux_decoder.grad_checkpointing


def test_a_checkpointed_run_resumes_exactly(tmp_path):
    def fit(ckpt_path=None) -> L.LightningModule:
        L.seed_everything(0)
        module = micro_module(plugin=AEMIM(), activation_checkpointing=True)
        every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)
        trainer(4, [every_step], enable_checkpointing=True).fit(module, bundled_sample(8), ckpt_path=ckpt_path)
        return module

    straight = fit()
    resumed = fit(tmp_path / "step=2.ckpt")  # mid-epoch, on the resumable data path
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
