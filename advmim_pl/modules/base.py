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
from advmim_pl.schedule import EpochSteps, epoch_steps, limited, scaled_lr, scales_batch, total_steps, warmup_cosine


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
        self._epoch_steps: EpochSteps | None = None  # the fit's optimizer steps per epoch, once asked for

    def configure_callbacks(self) -> list:
        """The module's attack on the trainer (its checkpoint state, warnings and image grids), if it has one."""
        return [] if self.attack_callback is None else [self.attack_callback]

    def store_hparams(self, ignore: tuple[str, ...] = (), **replaced) -> None:
        """Save the calling ``__init__``'s arguments (less ``optimizer`` and ``ignore``) as hyperparameters, with
        ``replaced`` values put in, all as plain numbers."""
        self.save_hyperparameters(ignore=["optimizer", *ignore], frame=inspect.currentframe().f_back)
        self.hparams.update(replaced)
        self.hparams.update(plain(dict(self.hparams)))

    def epoch_steps(self) -> EpochSteps:
        """The fit's optimizer steps per epoch (``advmim_pl.schedule.epoch_steps``), worked out once per fit."""
        if self._epoch_steps is None:
            self._epoch_steps = epoch_steps(self.trainer)
        return self._epoch_steps

    def attack_epoch(self, attacker: Attacker) -> float | None:
        """The fractional training epoch that ``attacker``'s warm-up reads (the trainer's optimizer steps placed in
        the fit's steps per epoch; host arithmetic, no sync), or None when it has no warm-up (which then needs no
        loader length)."""
        if not attacker.warmup_epochs:
            return None
        return self.epoch_steps().epoch_at(self.trainer.global_step)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse (one line) a resume that Lightning would get wrong: a checkpoint written at the last batch of an
        epoch, before its end, where a batch scaled with the resolution changes the next epoch's length (Lightning
        2.6 then counts the finished epoch's batches as done in the next one)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # loaded outside a fit (load_from_checkpoint): nothing resumes
            return
        data = trainer.datamodule
        if not scales_batch(data):
            return
        fit = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = fit.get("epoch_progress", {}).get("current", {}), fit.get("epoch_loop.batch_progress", {})
        if not batches.get("is_last_batch") or epochs.get("processed", 0) >= epochs.get("started", 0):
            return  # mid-epoch, or written at the epoch's end: both resume exactly
        epoch = epochs["started"] - 1
        lengths = [limited(data.batches_per_epoch(e), trainer.limit_train_batches) for e in (epoch, epoch + 1)]
        if lengths[0] != lengths[1]:
            raise ValueError(
                f"this checkpoint was written at the last batch of epoch {epoch}, before the epoch's end, and the "
                f"scaled batch changes the next epoch from {lengths[0]} to {lengths[1]} batches: Lightning would "
                "resume that epoch short. Resume from the checkpoint written at the end of the epoch "
                "(ModelCheckpoint(save_on_train_epoch_end=True)) or from one written mid-epoch"
            )

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
        self._epoch_steps = None  # a new fit: its loader may differ from the last one's
        total = total_steps(trainer, self.epoch_steps() if scales_batch(trainer.datamodule) else None)
        min_ratio = hp.min_lr / lr if lr > 0 else 0.0

        def factor(step: int) -> float:
            if not hp.warmup_epochs:
                return warmup_cosine(step, 0, total, min_ratio)
            if step == 0:  # the warm-up's start, whatever its length
                return 0.0
            # the warm-up's length, read from step 1 on: the fit loop has set up its training loader by then (a
            # DataLoader given to fit has no length before)
            return warmup_cosine(step, math.ceil(self.epoch_steps().before(hp.warmup_epochs)), total, min_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
