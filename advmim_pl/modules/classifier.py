"""ClassifierModule: the shared part of linear probing and fine-tuning of a pre-trained encoder (the MAE
protocols, docs/method.md#evaluation-protocols).

Both build the encoder as a ``MaskedViT`` (pixel-space ``Normalize`` inside, so attack budgets stay in pixel
units), load it from ``init_from`` (a ``PretrainModule`` checkpoint or an exported safetensors file), and report
top-1 / top-5 accuracy. ``logits(x)`` and ``cross_entropy_objective(labels)`` are the hooks that adversarial
fine-tuning and robust-accuracy evaluation share.
"""

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from advmim_pl.adversarial.attack import Objective
from advmim_pl.checks import require_non_negative, require_positive
from advmim_pl.models.branch_norm import Branch, branch
from advmim_pl.models.pooling import GlobalPool, resolve_pooling
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules.base import BaseModule
from advmim_pl.weights import load_encoder, read_weights


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy in float32: logits (B, K); target (B,) class indices or (B, K) probabilities."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if target.ndim == 1:
        return -log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -(target.float() * log_probs).sum(dim=-1)


class ClassifierModule(BaseModule):
    """Shared part of ``LinearProbeModule`` and ``FinetuneModule``: encoder, ``init_from``, metrics and the
    evaluation steps. The optimiser and its schedule come from ``BaseModule``.

    ``global_pool: null`` picks the pooling the method that pre-trained ``init_from`` declares (its ``pooling``
    attribute, read by ``advmim_pl.models.pooling.method_pooling``; ``avg`` for SimMIM), else the subclass's
    ``default_pool``; the resolved value is what the hyperparameters
    (and so checkpoints) keep. Subclasses set ``default_pool``, ``self.head`` (features (B, D) -> logits
    (B, num_classes)) and ``param_groups()``.
    """

    head: nn.Module
    default_pool: GlobalPool

    def __init__(
        self,
        encoder: str,
        img_size: int,
        patch_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        encoder_kwargs: dict[str, Any] | None,
        sincos_pos_embed: bool,
        global_pool: GlobalPool | None,
        drop_path_rate: float,
        num_classes: int,
        init_from: str | None,
        batch_size: int,
        optimizer: OptimizerCallable,
        base_lr: float,
        lr_reference_batch: int,
        weight_decay: float,
        warmup_epochs: float,
        min_lr: float,
    ) -> None:
        super().__init__(optimizer)
        require_positive(num_classes=num_classes, batch_size=batch_size, lr_reference_batch=lr_reference_batch)
        require_non_negative(base_lr=base_lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr)
        if encoder_kwargs and "global_pool" in encoder_kwargs:
            raise ValueError("set the pooling with model.init_args.global_pool, not in encoder_kwargs")
        weights = read_weights(init_from) if init_from is not None else None
        global_pool = resolve_pooling(global_pool, weights and weights.method, self.default_pool, str(init_from))
        self.store_hparams(global_pool=global_pool)
        self.encoder = MaskedViT.from_settings(self.hparams, drop_path_rate, global_pool=global_pool)
        if weights is not None:
            load_encoder(self.encoder.vit, weights, str(init_from))
            weights.check_statistics(str(init_from), mean, std)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for stage in ("val", "test")
                for k in ((1, 5) if num_classes >= 5 else (1,))
            }
        )

    # ---- the hooks a robustness evaluation reuses ---------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Pooled encoder features (B, D) of images x (B, C, H, W) in [0, 1]: the cls token after the final
        norm (``global_pool: token``) or the mean patch token through ``fc_norm`` (``avg``)."""
        return self.encoder.vit.forward_head(self.encoder.forward_features(x), pre_logits=True)

    def logits(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of images x (B, C, H, W) in [0, 1]; differentiable in x."""
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)

    def cross_entropy_objective(self, labels: Tensor, branch_name: Branch = "clean") -> Objective:
        """The attack objective: objective(x_adv) -> per-sample cross-entropy (B,) of ``logits(x_adv)``
        against ``labels`` ((B,) class indices or (B, K) soft targets), to be maximised. ``branch_name``
        selects the normalisation branch the logits go through (``aux`` for AdvProp-style training)."""
        labels = labels.detach()

        def objective(x_adv: Tensor) -> Tensor:
            with branch(self.encoder, branch_name):
                return soft_cross_entropy(self.logits(x_adv), labels)

        return objective

    # ---- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self.logits(x)
        loss = F.cross_entropy(logits.float(), y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        for name, metric in self.metrics.items():
            if name.startswith(f"{stage}_"):
                metric(logits, y)
                key = name.split("_", 1)[1]
                self.log(f"{stage}/{key}", metric, on_step=False, on_epoch=True, prog_bar=key == "acc1")
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: tuple[Tensor, Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Logits (B, num_classes) of the batch's images."""
        return self.logits(batch[0] if isinstance(batch, list | tuple) else batch)
