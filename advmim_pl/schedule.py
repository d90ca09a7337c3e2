"""Learning-rate rules of the reference recipes, as pure functions."""

import math
from dataclasses import dataclass

from timm.optim import param_groups_weight_decay
from torch import nn


def scaled_lr(base_lr: float, total_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``base_lr * total_batch / reference_batch``."""
    return base_lr * total_batch / reference_batch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """lr factor at optimizer ``step``: linear warm-up from 0, then half-cycle cosine to ``min_ratio``."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class EpochSteps:
    """Optimizer steps per epoch: ``varying[e]`` in each of the first ``len(varying)`` epochs, ``steady`` in every
    later one (progressive resolution with a scaled batch changes the steps per epoch; otherwise ``varying`` is
    empty)."""

    varying: tuple[int, ...]
    steady: int

    def of(self, epoch: int) -> int:
        """Optimizer steps in ``epoch``."""
        return self.varying[epoch] if epoch < len(self.varying) else self.steady

    def before(self, epoch: float) -> float:
        """Optimizer steps before the fractional ``epoch`` (2.5: epochs 0 and 1, and half of epoch 2)."""
        if not self.varying:
            return epoch * self.steady
        whole = int(epoch)
        head = sum(self.varying[:whole]) + max(whole - len(self.varying), 0) * self.steady
        return head + (epoch - whole) * self.of(whole)

    def epoch_at(self, step: int) -> float:
        """The fractional epoch at optimizer ``step``, the inverse of ``before``."""
        for epoch, steps in enumerate(self.varying):
            if step < steps:
                return epoch + step / steps
            step -= steps
        return len(self.varying) + step / self.steady


def limited(batches: int, limit: int | float) -> int:
    """Training batches of an epoch of ``batches`` under the trainer's ``limit_train_batches`` (a count, or a
    fraction of the epoch), as Lightning applies it."""
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def scales_batch(data) -> bool:
    """Whether the data module ``data`` has a resolution schedule that scales the batch with the side (its epochs
    then differ in length)."""
    return getattr(getattr(data, "resolution", None), "scale_batch", False)


def epoch_steps(trainer) -> EpochSteps:
    """Optimizer steps per epoch of ``trainer``'s fit (Lightning steps on the last batch of a short accumulation).
    A map-style data module gives each epoch's batches itself (``batches_per_epoch``, which a resolution schedule
    that scales the batch varies); any other training loader has one length for every epoch."""

    def steps_of(batches: int) -> int:
        return max(math.ceil(batches / trainer.accumulate_grad_batches), 1)

    data = trainer.datamodule
    if hasattr(data, "batches_per_epoch"):
        horizon = data.resolution.horizon if scales_batch(data) else 0
        # from the horizon on, every epoch has the last one's steps
        steps = [steps_of(limited(data.batches_per_epoch(e), trainer.limit_train_batches)) for e in range(horizon + 1)]
        return EpochSteps(tuple(steps[:-1]), steps[-1])
    if trainer.num_training_batches == math.inf:
        trainer.estimated_stepping_batches  # noqa: B018  (sets up the training loader when max_epochs is set)
    if trainer.num_training_batches == math.inf:
        raise ValueError(
            "warm-up in epochs needs the length of an epoch: train from a map-style data module, or give a "
            "training DataLoader with a length and max_epochs; or set warmup_epochs: 0"
        )
    return EpochSteps((), steps_of(trainer.num_training_batches))


def total_steps(trainer, steps: EpochSteps | None) -> int:
    """Optimizer steps of the whole fit: ``max_steps``, or ``max_epochs`` epochs of ``steps``, whichever ends first
    (Lightning's ``estimated_stepping_batches`` where every epoch has the same steps, or ``steps`` is None)."""
    if steps is None or not steps.varying:
        return max(int(trainer.estimated_stepping_batches), 1)
    limits = [trainer.max_steps] if trainer.max_steps not in (None, -1) else []
    if trainer.max_epochs not in (None, -1):
        limits.append(math.ceil(steps.before(trainer.max_epochs)))
    if not limits:
        raise ValueError("a batch scaled with the resolution needs max_epochs or max_steps for its schedule")
    return max(min(limits), 1)


# full parameter names without weight decay besides 1-d ones (fnmatch, as timm matches them): positions and tokens;
# pre-training and fine-tuning share them
NO_DECAY_PATTERNS = ("*pos_embed", "*cls_token", "*reg_token", "*dist_token", "*mask_token")


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: decayed weights, then biases/norms (ndim <= 1), positions and tokens
    (``NO_DECAY_PATTERNS``) with 0, split by timm's ``param_groups_weight_decay``.

    Frozen parameters (``requires_grad=False``) are left out.
    """
    # a unit decay: timm puts every parameter in one no-decay group when the decay is 0, and the groups stay two
    groups = param_groups_weight_decay(module, 1.0, no_weight_decay_list=NO_DECAY_PATTERNS)
    params = {group["weight_decay"]: group["params"] for group in groups}
    return [
        {"params": params.get(1.0, []), "weight_decay": weight_decay},
        {"params": params.get(0.0, []), "weight_decay": 0.0},
    ]
