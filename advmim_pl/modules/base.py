"""BaseModule: what pre-training and classification modules share.

Subclasses build their networks and supply ``param_groups()``; the base owns the hyperparameters (kept as plain
numbers, so checkpoints load with ``torch.load(weights_only=True)``), the optimiser with the scaled learning rate
and its schedule, and the training progress that attack warm-ups read.
"""

import inspect
import math

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.adversarial.callback import AdversarialTargetCallback
from advmim_pl.checks import plain
from advmim_pl.modules.clipping import UnscaledClipping
from advmim_pl.schedule import scaled_lr, steps_per_epoch, warmup_cosine


class BaseModule(UnscaledClipping, L.LightningModule):
    """Shared skeleton. The learning rate of a parameter group is
    ``base_lr * total batch / lr_reference_batch * lr_scale * schedule``, the total batch being ``batch_size``
    times the world size and ``accumulate_grad_batches``, and the schedule a linear warm-up over
    ``warmup_epochs`` followed by a half-cycle cosine per step to ``min_lr``. A group's ``lr_scale`` defaults to 1.

    A subclass calls ``store_hparams()`` in its ``__init__`` (its constructor arguments must include
    ``batch_size``, ``base_lr``, ``lr_reference_batch``, ``warmup_epochs`` and ``min_lr``), sets
    and implements ``param_groups()``. A subclass with an attack sets ``attack_callback``, which the base puts on the
    trainer.
    """

    def __init__(self, optimizer: OptimizerCallable) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.attack_callback: AdversarialTargetCallback | None = None

    def configure_callbacks(self) -> list:
        """The module's attack on the trainer (its checkpoint state, warnings and image grids), if it has one."""
        return [] if self.attack_callback is None else [self.attack_callback]

    def store_hparams(self, ignore: tuple[str, ...] = (), **replaced) -> None:
        """Save the calling ``__init__``'s arguments (less ``optimizer`` and ``ignore``) as hyperparameters, with
        ``replaced`` values put in, all as plain numbers."""
        self.save_hyperparameters(ignore=["optimizer", *ignore], frame=inspect.currentframe().f_back)
        self.hparams.update(replaced)
        self.hparams.update(plain(dict(self.hparams)))

    def attack_epoch(self, attacker: Attacker) -> float | None:
        """The fractional training epoch that ``attacker``'s warm-up reads (optimizer steps / steps per epoch; host
        arithmetic, no sync), or None when it has no warm-up (which then needs no loader length) or no trainer."""
        trainer = self._trainer
        if not attacker.warmup_epochs or trainer is None:
            return None
        return trainer.global_step / steps_per_epoch(trainer)

    # ---- optimisation -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups with their ``weight_decay`` and optional ``lr_scale``."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict:
        trainer, hp = self.trainer, self.hparams
        total_batch = hp.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        lr = scaled_lr(hp.base_lr, total_batch, hp.lr_reference_batch)
        groups = [g for g in self.param_groups() if g["params"]]
        for group in groups:
            group["lr"] = lr * group.setdefault("lr_scale", 1.0)
        optimizer = self.optimizer_factory(groups)
        total_steps = max(int(trainer.estimated_stepping_batches), 1)  # also sets num_training_batches
        warmup_steps = math.ceil(hp.warmup_epochs * steps_per_epoch(trainer)) if hp.warmup_epochs else 0
        min_ratio = hp.min_lr / lr if lr > 0 else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
