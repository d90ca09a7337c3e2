"""LinearProbeModule: a linear classifier on a frozen pre-trained encoder (the MAE protocol)."""

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeFloat, PositiveInt
from lightning.pytorch.cli import OptimizerCallable
from timm.optim import Lars
from torch import Tensor, nn

from advmim_pl.checks import require_non_negative
from advmim_pl.models.pooling import GlobalPool
from advmim_pl.modules.classifier import ClassifierModule
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.schedule import weight_decay_groups


def probe_lars(params: Iterable) -> torch.optim.Optimizer:
    """timm LARS with the MAE linear-probe settings (momentum 0.9, trust coefficient 0.001); lr, weight
    decay and whether a group is LARS-adapted are set per parameter group."""
    return Lars(params, momentum=0.9, trust_coeff=0.001)


class Whitening(nn.Module):
    """ZCA whitening of features (B, D) with running statistics: the decorrelating counterpart of
    ``BatchNorm1d(affine=False)``.

    forward(x) = (x - mean) @ W with W = U diag((lambda + eps * lambda_max)^(-1/2)) U^T from the eigenvectors U and
    eigenvalues lambda of the covariance. In training each batch first adds to the cumulative mean and covariance
    of all features seen so far (a frozen encoder's features are a stationary distribution, so the cumulative
    average is the estimate to use), then W is recomputed; no gradient reaches the statistics. In eval mode the
    statistics are used as they are. Standardising alone leaves the few dominant directions of ViT features
    (the top eigenvalue of a 192-d feature correlation can be 130) to limit the step size, so SGD barely moves
    along the rest; whitened, the linear probe is a well-conditioned problem with the same optimum.
    """

    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("outer", torch.zeros(dim, dim, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        x = x.detach().double()
        self.count += len(x)
        self.total += x.sum(dim=0)
        self.outer += x.T @ x
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)
        values = values.clamp_min(0) + self.eps * values.max().clamp_min(1e-12)
        self.mean.copy_(mean)
        self.matrix.copy_((vectors * values.rsqrt()) @ vectors.T)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._update(x)
        return (x.float() - self.mean) @ self.matrix


class LinearProbeModule(ClassifierModule):
    """Linear probe of a frozen pre-trained encoder (MAE protocol).

    The encoder is frozen (no gradients) and stays in eval mode during training, so dropout, drop-path and
    any normalisation statistics never change; features are computed under ``torch.no_grad``. Head:
    ``BatchNorm1d(D, affine=False, eps=1e-6)`` (MAE's) or ``Whitening(D)`` + ``Linear(D, num_classes)`` (weights
    normal(0.01), bias 0), trained with cross-entropy, by default LARS (weight decay and trust-ratio adaptation
    on the weight matrix only), lr = base_lr * total batch / 256, warm-up then cosine.

    LARS does not adapt 1-d parameters: the bias takes plain SGD steps at lr * ``bias_lr_scale``. MAE's lr 6.4
    (ImageNet, 1000 classes) suits the weight's trust-ratio steps; the bias needs far less, and a short schedule
    that raises lr to move the weights (lr 25 for 10 classes) blows it up. The short recipes therefore whiten the
    features and train with plain SGD, which reaches the converged logistic regression (``advmim_pl.eval.features``)
    in a few hundred steps.

    Args:
        num_classes: classes (linked from the DataModule's ``num_classes`` by the ``advmim`` CLI).
        encoder: timm ViT name, e.g. ``vit_base_patch16_224`` (must match ``init_from``).
        img_size: input side in pixels (linked from the DataModule).
        patch_size: patch side in pixels.
        in_chans: image channels (linked from the DataModule).
        mean: per-channel mean of the pixel-space Normalize inside the model (linked from the data).
        std: per-channel std of that Normalize (linked from the data).
        encoder_kwargs: extra timm ``create_model`` arguments, e.g. ``{depth: 6}`` (must match ``init_from``).
        sincos_pos_embed: fixed 2-D sin-cos positions; the table is loaded from ``init_from`` either way.
        global_pool: features: ``token`` (cls token after the final norm, MAE's probe), ``avg`` (mean patch
            token through a fresh, frozen fc_norm), or null: ``avg`` for a SimMIM encoder, else ``token``.
        init_from: ``PretrainModule`` checkpoint (.ckpt, clean branch) or exported encoder (.safetensors);
            None probes a randomly initialised encoder (a baseline).
        batch_size: per-device batch size (linked from the data), for the lr scaling rule.
        optimizer: optimizer factory (default timm LARS, momentum 0.9, trust 0.001).
        base_lr: lr per ``lr_reference_batch`` images.
        lr_reference_batch: the 256 of the scaling rule.
        weight_decay: on the head's weight matrix only (0 in the MAE protocol).
        warmup_epochs: linear lr warm-up length; then half-cycle cosine per step.
        min_lr: final lr of the cosine.
        head_norm: ``batchnorm`` (MAE's ``BatchNorm1d(affine=False)``) or ``whiten`` (``Whitening``).
        bias_lr_scale: the bias's lr is lr * bias_lr_scale (LARS leaves it unadapted).
    """

    default_pool: GlobalPool = "token"

    def __init__(
        self,
        num_classes: PositiveInt,
        encoder: str = "vit_base_patch16_224",
        img_size: PositiveInt = 224,
        patch_size: PositiveInt = 16,
        in_chans: PositiveInt = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        encoder_kwargs: dict[str, Any] | None = None,
        sincos_pos_embed: bool = True,
        global_pool: GlobalPool | None = None,
        init_from: str | None = None,
        batch_size: PositiveInt = 64,
        optimizer: OptimizerCallable = probe_lars,
        base_lr: NonNegativeFloat = 0.1,
        lr_reference_batch: PositiveInt = 256,
        weight_decay: NonNegativeFloat = 0.0,
        warmup_epochs: NonNegativeFloat = 10.0,
        min_lr: NonNegativeFloat = 0.0,
        head_norm: Literal["batchnorm", "whiten"] = "batchnorm",
        bias_lr_scale: NonNegativeFloat = 1.0,
    ) -> None:
        if head_norm not in ("batchnorm", "whiten"):
            raise ValueError(f"head_norm must be batchnorm or whiten, got {head_norm!r}")
        require_non_negative(bias_lr_scale=bias_lr_scale)
        super().__init__(
            encoder=encoder,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            mean=mean,
            std=std,
            encoder_kwargs=encoder_kwargs,
            sincos_pos_embed=sincos_pos_embed,
            global_pool=global_pool,
            drop_path_rate=0.0,
            num_classes=num_classes,
            init_from=init_from,
            batch_size=batch_size,
            optimizer=optimizer,
            base_lr=base_lr,
            lr_reference_batch=lr_reference_batch,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
        )
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        linear = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        dim = self.encoder.embed_dim
        norm = Whitening(dim) if head_norm == "whiten" else nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Sequential(norm, linear)

    def train(self, mode: bool = True) -> "LinearProbeModule":
        """Train mode for the head only: the frozen encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        with torch.no_grad():
            features = self.features(x)
        loss = F.cross_entropy(self.head(features).float(), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def param_groups(self) -> list[dict]:
        """LARS groups as in MAE: the weight matrix with weight decay and trust-ratio adaptation; 1-d
        parameters (the bias) with neither, at lr * ``bias_lr_scale``. Other optimizers ignore ``always_adapt``."""
        decay, no_decay = weight_decay_groups(self, self.hparams.weight_decay)
        bias = {**no_decay, "always_adapt": False, "lr_scale": self.hparams.bias_lr_scale}
        return [{**decay, "always_adapt": True}, bias]
