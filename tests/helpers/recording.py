"""Recorders: an attacker that records what it crafted, and a module that records the images it trained on."""

import inspect

import lightning as L
import torch

from advmim_pl.adversarial import AEMIM, Attacker


class RecordingAttacker(Attacker):
    """An ``Attacker`` that keeps every crafted x_a (``crafted``), the autocast dtype the attack ran under
    (``autocast``), and per call (x, x_a, objective(x), objective(x_a)) (``calls``)."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.crafted, self.autocast, self.calls = [], [], []

    # Attacker's named settings, so that config() and checkpoints record them as the plain Attacker's
    __init__.__signature__ = inspect.signature(Attacker.__init__)

    def generate(self, model, x, objective, epoch=None, rank=0):
        device = x.device.type
        self.autocast.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        result = super().generate(model, x, objective, epoch, rank)
        self.crafted.append(result.x_adv.clone())
        with torch.no_grad():
            self.calls.append(
                (x.clone(), result.x_adv.clone(), objective(x).detach(), objective(result.x_adv).detach())
            )
        return result


def recording_plugin(**settings) -> AEMIM:
    """``AEMIM(**settings)`` whose attacker is a ``RecordingAttacker`` with the same attack settings (swapped in
    before the plug-in reaches a module, which puts ``plugin.attacker`` on the trainer)."""
    plugin = AEMIM(**settings)
    plugin.attacker = RecordingAttacker(**plugin.attacker.settings())
    return plugin


class RecordBatches(L.LightningModule):
    """Records the images of its training steps (``seen``), with one parameter so that the optimiser steps."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0])
        return (self.weight * batch[0].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
