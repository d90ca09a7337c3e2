"""Recorders: an attacker that records what it crafted, and a module that records the images it trained on."""

import lightning as L
import torch

from advmim_pl.adversarial import AEMIM, Attacker


class RecordingAttacker(Attacker):
    """An ``Attacker`` that keeps every crafted x_a (``crafted``), the autocast dtype the attack ran under
    (``autocast``), and per call (x, x_a, objective(x), objective(x_a)) (``calls``). It has ``Attacker``'s constructor,
    so configs and checkpoints record its settings as a plain one's, and it pickles (``ddp_spawn``)."""

    def __getattr__(self, name: str) -> list:
        if name not in ("crafted", "autocast", "calls"):
            raise AttributeError(name)
        return self.__dict__.setdefault(name, [])

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


def recording_plugin(attack: dict | None = None, **options) -> AEMIM:
    """``AEMIM(attack=RecordingAttacker(**attack), **options)``: the plug-in whose attack records what it crafts."""
    return AEMIM(attack=RecordingAttacker(**(attack or {})), **options)


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
