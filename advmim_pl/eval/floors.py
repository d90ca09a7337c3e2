"""Frozen features read out by a converged logistic regression, as classifiers of images: the floors (a randomly
initialised encoder of the same architecture, the raw pixels) and a trained encoder, read out the same way."""

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from advmim_pl.eval.extract import extract, pixel_features, pooled_features
from advmim_pl.eval.probes import LogisticProbe, ProbeSettings
from advmim_pl.models.pooling import GlobalPool
from advmim_pl.models.vit import MaskedViT


def random_encoder(architecture: Mapping[str, Any], seed: int) -> MaskedViT:
    """A randomly initialised encoder (the floor), seeded without touching the global RNG. ``architecture``: the
    ``encoder``, ``img_size``, ``patch_size``, ``in_chans``, ``mean``, ``std``, ``encoder_kwargs`` and
    ``sincos_pos_embed`` hyperparameters of a module; the encoder keeps its final norm (``pooled_features``)."""
    kwargs = {k: v for k, v in (architecture.get("encoder_kwargs") or {}).items() if k != "global_pool"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskedViT.from_settings({**architecture, "encoder_kwargs": kwargs})


class Pooled(nn.Module):
    """One pooling of ``pooled_features`` of a frozen encoder: images (B, C, H, W) -> (B, D)."""

    def __init__(self, encoder: MaskedViT, pooling: GlobalPool) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder.requires_grad_(False).eval(), pooling

    def forward(self, x: Tensor) -> Tensor:
        return pooled_features(self.encoder, x)[self.pooling]


class Pixels(nn.Module):
    """``pixel_features`` as a module: images (B, C, H, W) -> (B, C * s * s)."""

    def __init__(self, normalize: nn.Module, size: int) -> None:
        super().__init__()
        self.normalize, self.size = normalize, size

    def forward(self, x: Tensor) -> Tensor:
        return pixel_features(x, self.normalize, self.size)


class LinearReadout(nn.Module):
    """A logistic regression fit on frozen features, as a classifier of images: ``logits(x)`` (B, K) of images
    x (B, C, H, W) in [0, 1], differentiable in x, so that ``robust_accuracy`` attacks and scores it as it does a
    classifier module."""

    def __init__(self, features_of: Callable[[Tensor], Tensor], probe: LogisticProbe) -> None:
        super().__init__()
        self.features_of, self.probe = features_of, probe

    def logits(self, x: Tensor) -> Tensor:
        return self.probe.logits(self.features_of(x).float())


def fit_readouts(
    features: Mapping[str, Callable[[Tensor], Tensor]],
    batches: Iterable,
    num_classes: int,
    settings: ProbeSettings,
    device: torch.device,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, LinearReadout]:
    """A ``LinearReadout`` per named feature (images (B, C, H, W) -> (B, D)): every feature of the labelled
    ``batches`` is extracted in one pass on ``device`` inside ``context``, then ``settings.logistic`` fits each."""
    train = extract(lambda x: {name: of(x) for name, of in features.items()}, batches, device, context)
    return {
        name: LinearReadout(of, settings.logistic(train.features[name], train.labels, num_classes))
        for name, of in features.items()
    }
