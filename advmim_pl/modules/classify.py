"""Downstream evaluation of a pre-trained encoder: linear probing and fine-tuning (MAE protocols, SPEC §4).

Both modules build the encoder as a ``MaskedViT`` (pixel-space ``Normalize`` inside, so attack budgets stay
in pixel units), load it from ``init_from`` (a ``PretrainModule`` checkpoint or an exported safetensors
file), and report top-1 / top-5 accuracy. ``logits(x)`` and ``cross_entropy_objective(labels)`` are the
hooks that adversarial fine-tuning and robust-accuracy evaluation share.
"""

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.optim import Lars, param_groups_layer_decay
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from advmim_pl.adversarial.attack import Objective
from advmim_pl.adversarial.callback import AdversarialTargetCallback
from advmim_pl.checks import plain, require_non_negative, require_positive
from advmim_pl.export import encoder_state_dict
from advmim_pl.models.branch_norm import Branch, add_branch_norms, branch
from advmim_pl.models.vit import IMAGENET_MEAN, IMAGENET_STD, MaskedViT
from advmim_pl.modules.clipping import UnscaledClipping
from advmim_pl.reliability import read_checkpoint
from advmim_pl.schedule import scaled_lr, steps_per_epoch, warmup_cosine, weight_decay_groups

GlobalPool = Literal["avg", "token"]
POOL_DESCRIPTIONS = {"token": "the cls token after the final norm", "avg": "the mean patch token through fc_norm"}


def method_pooling(method: str | None, default: GlobalPool) -> GlobalPool:
    """The pooling a classifier of an encoder pre-trained by ``method`` (e.g. "MAE", "SimMIM"; None if unknown)
    defaults to: ``avg`` for SimMIM, whose decoder drops the cls token's output so that no loss reads it (SimMIM's
    own protocol pools the patch tokens), else ``default``."""
    return "avg" if method == "SimMIM" else default


def resolve_pooling(global_pool: GlobalPool | None, method: str | None, default: GlobalPool, source: str) -> GlobalPool:
    """``global_pool``, or the per-method default when it is None; warns when a token classifier reads a SimMIM
    encoder's untrained cls token."""
    if global_pool not in (None, *POOL_DESCRIPTIONS):
        raise ValueError(f"unknown pooling {global_pool!r}: choose token, avg, or null (the per-method default)")
    if global_pool is None:
        return method_pooling(method, default)
    if global_pool == "token" and method == "SimMIM":
        rank_zero_warn(
            f"init_from {source!r} was pre-trained with SimMIM, whose loss never reads the cls token's output: "
            "global_pool token classifies from a token that was not trained to summarise the image. Set "
            "model.init_args.global_pool: avg (or null, the per-method default)."
        )
    return global_pool


def probe_lars(params: Iterable) -> torch.optim.Optimizer:
    """timm LARS with the MAE linear-probe settings (momentum 0.9, trust coefficient 0.001); lr, weight
    decay and whether a group is LARS-adapted are set per parameter group."""
    return Lars(params, momentum=0.9, trust_coeff=0.001)


def finetune_adamw(params: Iterable) -> torch.optim.Optimizer:
    """Fused AdamW with the MAE fine-tuning betas (0.9, 0.999); lr and weight decay are set per group."""
    return torch.optim.AdamW(params, betas=(0.9, 0.999), fused=True)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy in float32: logits (B, K); target (B,) class indices or (B, K) probabilities."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if target.ndim == 1:
        return -log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    return -(target.float() * log_probs).sum(dim=-1)


# ---- init_from ---------------------------------------------------------------------------------------
@dataclass
class EncoderWeights:
    """A timm encoder state dict read from ``init_from``, with what is known about the model that made it."""

    state: dict[str, Tensor]
    made_by: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    method: str | None = None  # the pre-training method's class name ("MAE", "SimMIM"), when the file says

    def check_statistics(self, source: str, mean: Sequence[float], std: Sequence[float]) -> None:
        """Warn when the pixel mean/std the encoder was pre-trained with differ from ``mean`` / ``std``."""
        for name, saved, now in (("mean", self.mean, mean), ("std", self.std, std)):
            if saved is not None and not torch.allclose(torch.tensor(saved), torch.tensor(tuple(now))):
                rank_zero_warn(
                    f"init_from {source!r} was pre-trained with pixel {name} {saved}, this model "
                    f"normalises with {tuple(now)}: the encoder sees differently scaled inputs"
                )


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    """The timm encoder state dict stored in ``path``.

    Accepts a ``PretrainModule`` Lightning checkpoint (clean branch only: aux norms and decoders dropped),
    a file written by ``advmim export`` (``.safetensors``), or a plain ``torch.save``-d timm / reference-MAE
    state dict (``{"model": {...}}`` or the dict itself; ``decoder*`` and ``mask_token`` entries dropped).
    A missing file is FileNotFoundError, an unreadable one CheckpointError or ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from {str(path)!r} does not exist (expected a .ckpt or .safetensors file)")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"init_from {str(path)!r} is not a readable safetensors file: {err}") from None
        stats = [tuple(json.loads(meta[k])) if k in meta else None for k in ("mean", "std")]
        return EncoderWeights(
            state, f"timm_kwargs={meta.get('timm_kwargs', 'unknown')}", *stats, meta.get("method") or None
        )
    checkpoint = read_checkpoint(path)
    if "state_dict" in checkpoint:  # Lightning checkpoint
        hp = checkpoint.get("hyper_parameters", {})
        made_by = ", ".join(
            f"{k}={hp[k]!r}" for k in ("encoder", "patch_size", "img_size", "encoder_kwargs") if k in hp
        )
        stats = [tuple(hp[k]) if hp.get(k) is not None else None for k in ("mean", "std")]
        method = hp.get("method", {}).get("class_path", "").rpartition(".")[2] or None
        return EncoderWeights(
            encoder_state_dict(checkpoint["state_dict"]), made_by or "a Lightning checkpoint", *stats, method
        )
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init_from {str(path)!r} holds neither a Lightning checkpoint nor a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    return EncoderWeights(state, "a plain state dict")


def _listing(items: list[str], limit: int = 12) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def load_encoder_weights(vit: nn.Module, state: dict[str, Tensor], source: str, made_by: str = "") -> None:
    """Load ``state`` into the timm ViT ``vit``, refusing any mismatch except the MAE pooling swap.

    Allowed difference: with average pooling the model has a fresh ``fc_norm`` and no final ``norm``, so the
    checkpoint's ``norm.*`` is dropped and ``fc_norm.*`` keeps its initialisation (as MAE fine-tuning does).
    Anything else (missing or unexpected keys, different shapes) raises ValueError listing the keys, with
    the shapes of both sides.
    """
    target = vit.state_dict()
    fresh = {k for k in target if k.startswith("fc_norm.") and k not in state}
    dropped = {k for k in state if k.startswith("norm.") and k not in target and fresh}
    missing = [k for k in target if k not in state and k not in fresh]  # in model order: embeddings first
    unexpected = [k for k in state if k not in target and k not in dropped]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs model): {_listing(shapes)}")
        if missing:
            problems.append(
                f"missing from the checkpoint: {_listing([f'{k} {tuple(target[k].shape)}' for k in missing])}"
            )
        if unexpected:
            problems.append(f"not in the model: {_listing([f'{k} {tuple(state[k].shape)}' for k in unexpected])}")
        made = f" The checkpoint was made with {made_by}." if made_by else ""
        raise ValueError(
            f"init_from {source!r} does not fit this encoder: {' | '.join(problems)}.{made} Set model.init_args."
            "encoder / patch_size / encoder_kwargs (and the data's img_size / channels) to match it."
        )
    vit.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    if fresh:
        rank_zero_info(
            f"init_from {source!r}: average pooling, so the checkpoint's final norm is replaced by a freshly "
            f"initialised {sorted(fresh)} (MAE fine-tuning protocol)"
        )


# ---- the shared base ----------------------------------------------------------------------------------
class ClassifierModule(UnscaledClipping, L.LightningModule):
    """Shared part of ``LinearProbeModule`` and ``FinetuneModule``: encoder, ``init_from``, metrics, the
    evaluation steps and the lr schedule (``base_lr`` scaled by total batch / ``lr_reference_batch``,
    linear warm-up, then half-cycle cosine per step to ``min_lr``; each group's ``lr_scale`` multiplies
    its lr throughout, so lr = base * lr_scale * schedule).

    ``global_pool: null`` picks the pooling from the method that pre-trained ``init_from`` (``method_pooling``):
    ``avg`` for SimMIM, else the subclass's ``default_pool``; the resolved value is what the hyperparameters
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
        super().__init__()
        require_positive(num_classes=num_classes, batch_size=batch_size, lr_reference_batch=lr_reference_batch)
        require_non_negative(base_lr=base_lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr)
        if encoder_kwargs and "global_pool" in encoder_kwargs:
            raise ValueError("set the pooling with model.init_args.global_pool, not in encoder_kwargs")
        weights = read_encoder_weights(init_from) if init_from is not None else None
        global_pool = resolve_pooling(global_pool, weights and weights.method, self.default_pool, str(init_from))
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams["global_pool"] = global_pool
        self.hparams.update(plain(dict(self.hparams)))  # loadable with torch.load(weights_only=True)
        self.optimizer_factory = optimizer
        self.encoder = MaskedViT(
            encoder,
            img_size,
            patch_size,
            in_chans,
            mean,
            std,
            drop_path_rate,
            sincos_pos_embed,
            {**(encoder_kwargs or {}), "global_pool": global_pool},
        )
        if weights is not None:
            load_encoder_weights(self.encoder.vit, weights.state, str(init_from), weights.made_by)
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

    # ---- optimisation -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group's ``lr_scale`` (default 1) multiplies its lr."""
        raise NotImplementedError

    def configure_optimizers(self) -> dict:
        trainer, hp = self.trainer, self.hparams
        total_batch = hp.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        lr = scaled_lr(hp.base_lr, total_batch, hp.lr_reference_batch)
        groups = [g for g in self.param_groups() if g["params"]]
        for group in groups:
            group["lr"] = lr * group.setdefault("lr_scale", 1.0)
        optimizer = self.optimizer_factory(groups)
        total_steps = max(int(trainer.estimated_stepping_batches), 1)
        warmup_steps = math.ceil(hp.warmup_epochs * steps_per_epoch(trainer)) if hp.warmup_epochs else 0
        min_ratio = hp.min_lr / lr if lr > 0 else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---- linear probing -----------------------------------------------------------------------------------
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


# ---- fine-tuning --------------------------------------------------------------------------------------
class FinetuneModule(ClassifierModule):
    """End-to-end fine-tuning (MAE protocol), optionally adversarial through the AEMIM attack callback.

    Head: pooling (``avg``: mean of patch tokens + ``fc_norm`` LayerNorm, MAE's default; ``token``: cls
    token after the final norm) + ``Linear`` (init trunc-normal std 2e-5, bias 0). Layer-wise lr decay:
    parameter groups from ``timm.optim.param_groups_layer_decay`` with lr scale
    ``layer_decay^(num_layers - layer_id)``, layer id 0 for patch embedding / cls token / positions,
    ``i + 1`` for block i and ``num_layers = depth + 1`` for everything after the blocks (norms, head).
    Training-time augmentation runs on the device batch: RandAugment per image, random erasing, then Mixup/CutMix with
    soft-target cross-entropy (label smoothing folded into the targets), or label-smoothed cross-entropy
    when mixing is off.

    With ``adversarial: true`` an ``AdversarialTargetCallback`` must be on the trainer. Each step it crafts
    x_a maximising the cross-entropy of the (aux-branch) logits against the step's targets, and the loss is
    CE(x) + adv_weight * CE(x_a). With ``branch_params: norm`` x_a goes through its own copy of every
    normalisation layer (AdvProp), initialised from the pre-trained ones; the clean copy is the model.

    Args:
        num_classes: classes (linked from the DataModule's ``num_classes`` by the ``advmim`` CLI).
        encoder: timm ViT name, e.g. ``vit_base_patch16_224`` (must match ``init_from``).
        img_size: input side in pixels (linked from the DataModule).
        patch_size: patch side in pixels.
        in_chans: image channels (linked from the DataModule).
        mean: per-channel mean of the pixel-space Normalize inside the model (linked from the data).
        std: per-channel std of that Normalize (linked from the data).
        encoder_kwargs: extra timm ``create_model`` arguments (must match ``init_from``).
        sincos_pos_embed: fixed 2-D sin-cos positions (loaded from ``init_from``); false trains them.
        global_pool: ``avg`` (mean patch token + fc_norm) or ``token`` (cls token; warns for a SimMIM encoder).
        drop_path_rate: stochastic depth of the encoder.
        init_from: ``PretrainModule`` checkpoint (.ckpt) or exported encoder (.safetensors); None trains
            from scratch.
        batch_size: per-device batch size (linked from the data), for the lr scaling rule.
        optimizer: optimizer factory (default fused AdamW, betas (0.9, 0.999)).
        base_lr: lr per ``lr_reference_batch`` images.
        lr_reference_batch: the 256 of the scaling rule.
        weight_decay: on weight matrices; none on 1-d parameters, positions and tokens.
        layer_decay: layer-wise lr decay factor (0.65 for ViT-B in MAE; 1 disables it).
        warmup_epochs: linear lr warm-up length; then half-cycle cosine per step.
        min_lr: final lr of the cosine (times each group's lr scale).
        label_smoothing: label smoothing of the training targets.
        mixup_alpha: Mixup beta parameter (0 disables Mixup).
        cutmix_alpha: CutMix beta parameter (0 disables CutMix).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        randaugment: RandAugment (``torchvision.transforms.v2``) per training image, on the device.
        randaugment_ops: operations per image.
        randaugment_magnitude: magnitude of each operation, 0-30 (9 in MAE).
        random_erasing: probability of erasing one random rectangle per training image (0.25 in MAE), after
            RandAugment and before Mixup; the rectangle is filled with per-pixel N(0, 1) noise in the normalised
            space (timm ``RandomErasing``, mode ``pixel``), i.e. mean + std * N(0, 1) in pixel units.
        adversarial: adversarial fine-tuning (needs the ``AdversarialTargetCallback``).
        adv_weight: weight of the cross-entropy on x_a.
        branch_params: ``norm`` gives x_a its own normalisation layers (AdvProp); ``none`` shares all.
    """

    default_pool: GlobalPool = "avg"

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
        global_pool: GlobalPool = "avg",
        drop_path_rate: ClosedUnitInterval = 0.1,
        init_from: str | None = None,
        batch_size: PositiveInt = 64,
        optimizer: OptimizerCallable = finetune_adamw,
        base_lr: NonNegativeFloat = 1e-3,
        lr_reference_batch: PositiveInt = 256,
        weight_decay: NonNegativeFloat = 0.05,
        layer_decay: ClosedUnitInterval = 0.65,
        warmup_epochs: NonNegativeFloat = 5.0,
        min_lr: NonNegativeFloat = 1e-6,
        label_smoothing: ClosedUnitInterval = 0.1,
        mixup_alpha: NonNegativeFloat = 0.8,
        cutmix_alpha: NonNegativeFloat = 1.0,
        mixup_prob: ClosedUnitInterval = 1.0,
        mixup_switch_prob: ClosedUnitInterval = 0.5,
        randaugment: bool = True,
        randaugment_ops: PositiveInt = 2,
        randaugment_magnitude: NonNegativeInt = 9,
        random_erasing: ClosedUnitInterval = 0.25,
        adversarial: bool = False,
        adv_weight: NonNegativeFloat = 1.0,
        branch_params: Literal["norm", "none"] = "norm",
    ) -> None:
        for name, value in (
            ("label_smoothing", label_smoothing),
            ("mixup_prob", mixup_prob),
            ("random_erasing", random_erasing),
        ):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha), ("adv_weight", adv_weight)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
        if not 0 <= randaugment_magnitude <= 30:
            raise ValueError(f"randaugment_magnitude must be in [0, 30], got {randaugment_magnitude}")
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
            drop_path_rate=drop_path_rate,
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
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        if adversarial and branch_params == "norm":
            add_branch_norms(self.encoder)  # after loading: the aux copies start from the pre-trained norms
        self.mixup: Mixup | None = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_prob > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.randaugment = (
            v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude) if randaugment else None
        )
        self.attack: AdversarialTargetCallback | None = None

    # ---- fit-time wiring ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Find the attack callback; for fit, refuse a module/callback mismatch before training starts."""
        callbacks = [c for c in self.trainer.callbacks if isinstance(c, AdversarialTargetCallback)]
        self.attack = callbacks[0] if callbacks else None
        if stage != "fit":
            return
        if self.hparams.adversarial and not callbacks:
            raise RuntimeError(
                "FinetuneModule(adversarial=True) needs an AdversarialTargetCallback on the trainer. Add an\n"
                "  attack:\n    class_path: advmim_pl.adversarial.AdversarialTargetCallback\n"
                "section to the config (or the callback to trainer.callbacks); set model.init_args.adversarial: "
                "false for plain fine-tuning."
            )
        if callbacks and not self.hparams.adversarial:
            raise RuntimeError(
                "An AdversarialTargetCallback is on the trainer but FinetuneModule was built with adversarial=False: "
                "set model.init_args.adversarial: true, or remove the callback for plain fine-tuning."
            )

    # ---- the step ------------------------------------------------------------------------------------
    @property
    def adv_branch(self) -> Branch:
        """The normalisation branch adversarial inputs go through."""
        return "aux" if self.hparams.branch_params == "norm" else "clean"

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Training-time augmentation of a device batch: x (B, C, H, W) in [0, 1], y (B,) -> augmented x and
        targets: (B,) labels, or (B, num_classes) soft targets when Mixup/CutMix is on. Erased rectangles may
        leave [0, 1] (noise with the data's mean and std)."""
        if self.randaugment is not None:
            x = torch.stack([self.randaugment(image) for image in x])
        if self.hparams.random_erasing > 0:
            erase = RandomErasing(self.hparams.random_erasing, mode="pixel", device=x.device)
            normalize = self.encoder.normalize
            x = erase(normalize(x).contiguous()) * normalize.std + normalize.mean
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix needs an even batch size, got {x.shape[0]}")
            x, y = self.mixup(x.clone(), y)
        return x, y

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean training loss: soft-target CE for mixed (B, K) targets, else label-smoothed CE."""
        if target.ndim == 2:
            return soft_cross_entropy(logits, target).mean()
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def losses(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Clean loss and, when adversarial, the loss on x_a crafted against the aux branch.

        x (B, C, H, W) already augmented; target (B,) or (B, K). Returns {"clean", "loss"} and, when
        adversarial, also "adv", "x_adv", "finite" and "delta_linf".
        """
        out = {"clean": self.criterion(self.logits(x), target)}
        out["loss"] = out["clean"]
        if self.hparams.adversarial:
            result = self.attack.generate(self, x, self.cross_entropy_objective(target, self.adv_branch))
            with branch(self.encoder, self.adv_branch):
                out["adv"] = self.criterion(self.logits(result.x_adv), target)
            out["loss"] = out["clean"] + self.hparams.adv_weight * self.attack.ramp(self._trainer) * out["adv"]
            out.update(x_adv=result.x_adv, finite=result.finite, delta_linf=result.delta_linf)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, target = self.augment(batch[0], batch[1])
        out = self.losses(x, target)
        if self.hparams.adversarial:
            self.attack.record_finite(out["finite"], self.trainer)
            self.log("train/loss_clean", out["clean"])
            self.log("train/loss_adv", out["adv"])
            self.log("attack/delta_linf", out["delta_linf"])
        self.log("train/loss", out["loss"], prog_bar=True)
        return out["loss"]

    # ---- optimisation -------------------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping (the interface ``param_groups_layer_decay`` reads) with MAE's layer ids:
        embeddings 0, block i -> i + 1; everything else (final norm, fc_norm, head) comes last."""
        return {
            "stem": r"^encoder\.vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
            "blocks": r"^encoder\.vit\.blocks\.(\d+)",
        }

    def param_groups(self) -> list[dict]:
        """Layer-wise lr decay groups (each with ``lr_scale``); no weight decay on 1-d parameters, positions
        and tokens."""
        no_decay = [f"encoder.vit.{name}" for name in ("pos_embed", "cls_token", "reg_token", "dist_token")]
        return param_groups_layer_decay(
            self,
            weight_decay=self.hparams.weight_decay,
            no_weight_decay_list=no_decay,
            layer_decay=self.hparams.layer_decay,
        )


__all__ = [
    "ClassifierModule",
    "FinetuneModule",
    "LinearProbeModule",
    "finetune_adamw",
    "load_encoder_weights",
    "EncoderWeights",
    "probe_lars",
    "read_encoder_weights",
    "soft_cross_entropy",
]
