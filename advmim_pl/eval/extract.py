"""Frozen features of labelled images: both poolings of an encoder from one public encoder pass, the raw pixels,
and the deterministic evaluation batches of a data module's split they are extracted from."""

import copy
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advmim_pl.data.base import TensorImageDataset
from advmim_pl.errors import EvaluationInputError
from advmim_pl.eval.probes import FeatureSet
from advmim_pl.models.vit import MaskedViT

FC_NORM_EPS = 1e-6  # timm's ViT LayerNorm eps, as in the fc_norm that average pooling puts after the mean


def pooled_features(encoder: MaskedViT, x: Tensor) -> dict[str, Tensor]:
    """Both poolings of images x (B, C, H, W) in [0, 1], from one encoder pass: {"token": (B, D), "avg": (B, D)}.

    ``token`` is the cls token after the final norm (MAE's probe). ``avg`` is the mean of the patch tokens
    before the final norm (``encoder.forward_tokens(x, final_norm=False)``), through a LayerNorm without affine
    parameters: what timm's freshly initialised ``fc_norm`` gives with ``global_pool: avg`` (MAE's global-pool
    probe and fine-tuning, BEiT, SimMIM), so it equals ``LinearProbeModule(global_pool="avg").features``. The
    encoder must keep its final norm (built with the default ``global_pool: token``, as every pre-training
    encoder is).
    """
    tokens = encoder.forward_tokens(x, final_norm=False)
    mean_patch = tokens[:, encoder.num_prefix_tokens :].mean(dim=1)
    return {
        "token": encoder.vit.norm(tokens[:, 0]),
        "avg": F.layer_norm(mean_patch, mean_patch.shape[-1:], eps=FC_NORM_EPS),
    }


def pixel_features(x: Tensor, normalize: nn.Module, size: int) -> Tensor:
    """The raw-pixel floor: images x (B, C, H, W) in [0, 1], normalised as the encoder sees them, area-averaged
    down to at most size x size and flattened -> (B, C * s * s), s = min(size, H)."""
    x = normalize(x)
    if size < x.shape[-1]:
        x = F.adaptive_avg_pool2d(x, size)
    return x.flatten(1)


def labelled(batch: object) -> tuple[Tensor, Tensor]:
    """(images, labels) of a batch; ValueError when the batch carries no class labels."""
    if isinstance(batch, list | tuple) and len(batch) >= 2 and isinstance(batch[1], Tensor | int):
        labels = torch.as_tensor(batch[1])
        if labels.ndim <= 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
            return batch[0], labels.reshape(-1)
    got = type(batch).__name__ if not isinstance(batch, list | tuple) else f"a {len(batch)}-tuple"
    raise EvaluationInputError(
        f"the dataset has no labels: its batches are {got}, not (images, class indices); kNN and linear probes "
        "need a labelled DataModule (e.g. advmim_pl.data.FashionMNISTDataModule)"
    )


@torch.no_grad()
def extract(
    features_of: Callable[[Tensor], dict[str, Tensor]],
    batches: Iterable,
    device: torch.device,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> FeatureSet:
    """Run ``features_of`` (images (B, C, H, W) -> {name: (B, D)}) over labelled ``batches`` on ``device`` inside
    ``context`` (e.g. bf16 autocast); the features are kept there as float32."""
    parts: dict[str, list[Tensor]] = {}
    labels = []
    for batch in batches:
        x, y = labelled(batch)
        with context():
            out = features_of(x.to(device, non_blocking=True))
        for name, value in out.items():
            parts.setdefault(name, []).append(value.float())
        labels.append(y.to(device))
    if not labels:
        raise EvaluationInputError("no images to extract features from: the split is empty")
    return FeatureSet({k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels))


def evaluation_view(dataset: Dataset, transform: Callable) -> Dataset:
    """A shallow copy of ``dataset`` (a project data module's split) that applies ``transform`` instead of its
    own, e.g. the training images with the deterministic evaluation transform."""
    if not hasattr(dataset, "transform"):
        raise ValueError(f"{type(dataset).__name__} has no transform to replace")
    view = copy.copy(dataset)
    view.transform = transform
    return view


def evaluation_batches(
    dataset: Dataset, transform: Callable, batch_size: int, num_workers: int = 0, indices: Tensor | None = None
) -> Iterable:
    """(images, labels) batches of a data module's split (only the images at ``indices``, if given) under
    ``transform``, in order. An in-memory uint8 split (``TensorImageDataset``) is transformed a whole batch at a
    time; other splits go through a DataLoader over ``evaluation_view``."""
    if isinstance(dataset, TensorImageDataset):
        images, labels = dataset.images, dataset.labels
        if indices is not None:
            images, labels = images[indices], labels[indices]
        return (
            (transform(images[i : i + batch_size]), labels[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        )
    view = evaluation_view(dataset, transform)
    if indices is not None:
        view = Subset(view, indices.tolist())
    return DataLoader(view, batch_size=batch_size, num_workers=num_workers)
