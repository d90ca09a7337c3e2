"""Learning-rate rules of the reference recipes, as pure functions."""

import math

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


def steps_per_epoch(trainer) -> int:
    """Optimizer steps in one epoch of ``trainer`` (Lightning steps on the last batch of a short accumulation)."""
    if trainer.num_training_batches == math.inf and trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what trainer.estimated_stepping_batches does when it needs the length
    if trainer.num_training_batches == math.inf:
        raise ValueError("warm-up in epochs needs a training DataLoader with a length; set warmup_epochs: 0")
    return max(math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches), 1)


NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token")


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: decayed weights, and biases/norms (ndim <= 1), positions and tokens with 0.

    Frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
