"""Frozen-feature evaluation: extract once, fit many.

An encoder's frozen features of the training and test images are extracted once, in one pass for both
poolings (the cls token and the average of the patch tokens), and kept on the device. Two probes are then fit
on them:

- **kNN** (InstDisc, Wu et al. 2018, arXiv:1805.01978; the rule of DINO's ``eval_knn``): cosine similarity,
  the k most similar training features vote for their class with weight exp(similarity / T).
- **Logistic regression**: multinomial, L2 on the weights, on standardised features, run to convergence with
  full-batch L-BFGS; the L2 strength is chosen on a held-out part of the training set, then the model is refit
  on all of it.

Each accuracy comes with its Wilson score 95% interval. The floors go through the same code: a randomly
initialised encoder of the same architecture and the raw pixels.

``FeatureEvalModule`` runs all of it as ``advmim test -c eval/features.yaml --model.init_args.init_from X``
and writes ``features.json`` / ``features.md`` next to the run.
"""

import copy
import json
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from advmim_pl.checks import plain, require_positive
from advmim_pl.data.base import ImageDataModule, TensorImageDataset
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules.classifier import GlobalPool
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.weights import load_encoder, read_weights

POOLINGS = ("token", "avg")
POOLING_NAMES = {"token": "cls token", "avg": "patch average"}
FC_NORM_EPS = 1e-6  # timm's ViT LayerNorm eps, as in the fc_norm that average pooling puts after the mean
Z95 = 1.959963984540054  # two-sided 95% normal quantile


class EvaluationInputError(ValueError):
    """Input the evaluation cannot use (a dataset without labels, k larger than the training set, ...); the
    ``advmim`` command prints it as one line."""


# ---- features -----------------------------------------------------------------------------------------
def pooled_features(encoder: MaskedViT, x: Tensor) -> dict[str, Tensor]:
    """Both poolings of images x (B, C, H, W) in [0, 1], from one encoder pass: {"token": (B, D), "avg": (B, D)}.

    ``token`` is the cls token after the final norm (MAE's probe). ``avg`` is the mean of the patch tokens
    before the final norm, through a LayerNorm without affine parameters: what timm's freshly initialised
    ``fc_norm`` gives with ``global_pool: avg`` (MAE's global-pool probe and fine-tuning, BEiT, SimMIM), so it
    equals ``LinearProbeModule(global_pool="avg").features``. The encoder must keep its final norm (built with
    the default ``global_pool: token``, as every pre-training encoder is).
    """
    vit = encoder.vit
    prefix, patches = encoder._add_positions(encoder._embed(x))
    tokens = vit.blocks(vit.norm_pre(vit.pos_drop(torch.cat([prefix, patches], dim=1))))
    mean_patch = tokens[:, encoder.num_prefix_tokens :].mean(dim=1)
    return {
        "token": vit.norm(tokens[:, 0]),
        "avg": F.layer_norm(mean_patch, mean_patch.shape[-1:], eps=FC_NORM_EPS),
    }


def pixel_features(x: Tensor, normalize: nn.Module, size: int) -> Tensor:
    """The raw-pixel floor: images x (B, C, H, W) in [0, 1], normalised as the encoder sees them, area-averaged
    down to at most size x size and flattened -> (B, C * s * s), s = min(size, H)."""
    x = normalize(x)
    if size < x.shape[-1]:
        x = F.adaptive_avg_pool2d(x, size)
    return x.flatten(1)


@dataclass
class FeatureSet:
    """Frozen features of one set of images: ``features`` maps a name ("encoder/token", "random/avg",
    "pixels") to (N, D) float32, ``labels`` (N,) int64, all on one device."""

    features: dict[str, Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> "FeatureSet":
        """The samples at ``index`` (M,)."""
        return FeatureSet({k: v[index] for k, v in self.features.items()}, self.labels[index])

    @staticmethod
    def cat(parts: Sequence["FeatureSet"]) -> "FeatureSet":
        """The parts one after the other (same feature names)."""
        names = parts[0].features
        return FeatureSet(
            {k: torch.cat([p.features[k] for p in parts]) for k in names}, torch.cat([p.labels for p in parts])
        )


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


# ---- kNN ----------------------------------------------------------------------------------------------
def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 512,
) -> Tensor:
    """Temperature-weighted kNN classification (InstDisc / DINO rule).

    bank (N, D) with bank_labels (N,), queries (M, D) -> predicted classes (M,). Features are compared by
    cosine similarity; each of a query's k most similar bank features votes for its class with weight
    exp(sim / temperature), and the class with the largest total wins (ties: the lower class index).
    """
    if k > len(bank):
        raise EvaluationInputError(
            f"kNN k={k} is larger than the training set ({len(bank)} features): choose k <= {len(bank)}"
        )
    bank = F.normalize(bank.float(), dim=1)
    predictions = []
    for block in queries.split(chunk):
        similarity = F.normalize(block.float(), dim=1) @ bank.T
        top, index = similarity.topk(k, dim=1)
        weights = ((top - top[:, :1]) / temperature).exp()  # exp(sim / T) up to a per-query factor
        votes = torch.zeros(len(block), num_classes, device=block.device).scatter_add_(1, bank_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


# ---- logistic regression ----------------------------------------------------------------------------
@dataclass
class LogisticFit:
    """Multinomial logistic regression: logits = x @ weight + bias; weight (D, K), bias (K,); ``c`` the inverse L2
    strength it was fit with, ``iterations`` the L-BFGS iterations, ``grad_max`` the largest gradient entry at
    the end (of the objective divided by C * N)."""

    weight: Tensor
    bias: Tensor
    c: float
    iterations: int
    grad_max: float

    def logits(self, x: Tensor) -> Tensor:
        """x (N, D) -> logits (N, K)."""
        return x @ self.weight + self.bias


def fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    c: float,
    max_iter: int = 1000,
    tolerance: float = 1e-5,
    init: LogisticFit | None = None,
) -> LogisticFit:
    """L2-regularised multinomial logistic regression, scikit-learn's objective: minimise
    C * sum of cross-entropies + ||weight||^2 / 2 (the bias unpenalised).

    x (N, D) float32, best centred with uncorrelated columns (``logistic_probe`` rotates them to their principal
    axes); y (N,) class indices; ``init`` warm-starts from another fit. Full-batch L-BFGS with a strong-Wolfe
    line search minimises the objective divided by C * N (a mean cross-entropy) until its largest gradient entry
    is <= tolerance, or max_iter iterations. It runs on weight / s with s_j = (var(x_j) + l2)^(-1/2),
    l2 = 1 / (C * N): an exact change of variables (the same minimiser) that gives every direction a curvature
    of about one when the columns are uncorrelated.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also when called from an inference-mode loop
        return _lbfgs(x.clone(), y.clone(), num_classes, c, max_iter, tolerance, init)


def _lbfgs(
    x: Tensor, y: Tensor, num_classes: int, c: float, max_iter: int, tolerance: float, init: LogisticFit | None
) -> LogisticFit:
    """The body of ``fit_logistic``, with autograd on."""
    l2 = 1.0 / (c * len(x))
    scale = (x.var(dim=0) + l2).rsqrt().unsqueeze(1)  # (D, 1)
    params = torch.zeros(x.shape[1] + 1, num_classes, device=x.device, dtype=torch.float32)
    if init is not None:
        params.copy_(torch.cat([init.weight / scale, init.bias.unsqueeze(0)]))
    params.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [params],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    xs = x * scale.T

    def objective() -> Tensor:
        optimizer.zero_grad()
        logits = xs @ params[:-1] + params[-1]
        cross_entropy = (logits.logsumexp(dim=1) - logits.gather(1, y.unsqueeze(1)).squeeze(1)).mean()
        loss = cross_entropy + 0.5 * l2 * (params[:-1] * scale).pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    objective()  # the gradient at the final point
    weight, bias = params.detach()[:-1] * scale, params.detach()[-1].clone()
    iterations = int(optimizer.state[params]["n_iter"])
    return LogisticFit(weight, bias, c, iterations, float(params.grad.abs().max()))


def standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (1, D) of x (N, D); constant features get std 1 (they become 0)."""
    mean, std = x.mean(dim=0, keepdim=True), x.std(dim=0, keepdim=True)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))


def principal_axes(z: Tensor) -> Tensor:
    """Orthonormal eigenvectors (D, D) of the covariance of centred z (N, D), as columns."""
    return torch.linalg.eigh(z.T @ z / len(z)).eigenvectors


def selection_split(
    n: int, holdout: float, limit: int | None, seed: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Indices (fit, held-out) for choosing C: a seeded random round(holdout * n) held out, the fit part the
    rest, cut to its first ``limit`` (null: all)."""
    held = round(holdout * n)
    if not 0 < held < n:
        raise EvaluationInputError(
            f"holding out {holdout} of {n} training features leaves an empty part: change holdout"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    return order[held:][:limit], order[:held]


@dataclass
class LogisticProbe:
    """A logistic regression on standardised features: logits(f) = ((f - mean) / std) @ weight + bias, with
    the held-out accuracy of every C tried."""

    mean: Tensor
    std: Tensor
    fit: LogisticFit
    heldout_accuracy: dict[float, float]

    def logits(self, features: Tensor) -> Tensor:
        """features (N, D) -> logits (N, K)."""
        return self.fit.logits((features - self.mean) / self.std)


def logistic_probe(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    c_grid: Sequence[float],
    holdout: float = 0.1,
    select_limit: int | None = 10_000,
    seed: int = 0,
    max_iter: int = 1000,
    tolerance: float = 1e-5,
) -> LogisticProbe:
    """Fit the L2-regularised logistic regression, choosing C on held-out training data, and refit on all.

    x (N, D), y (N,). The features are standardised with the statistics of x. ``selection_split`` holds out a
    part of x; the values of ``c_grid`` are fit on the rest (at most ``select_limit`` features) from the
    strongest penalty (smallest C) up, each warm-started from the previous one, until the held-out accuracy has
    fallen below its best twice in a row. The best C (ties: the smaller) is refit on all of x, warm-started from
    its fit. The fits run in the principal axes of the standardised features: a rotation, under which the
    penalty and the predictions are unchanged.
    """
    mean, std = standardiser(x)
    z = (x - mean) / std
    rotation = principal_axes(z)
    z = z @ rotation
    fit_part, held_part = selection_split(len(z), holdout, select_limit, seed, z.device)
    scores, fits, previous = {}, {}, None
    for c in sorted(c_grid):
        previous = fit_logistic(z[fit_part], y[fit_part], num_classes, c, max_iter, tolerance, previous)
        predictions = previous.logits(z[held_part]).argmax(dim=1)
        scores[c], fits[c] = float((predictions == y[held_part]).float().mean()), previous
        if len(scores) >= 3 and max(scores.values()) > max(list(scores.values())[-2:]):
            break
    best = max(scores, key=lambda c: (scores[c], -c))
    final = fit_logistic(z, y, num_classes, best, max_iter, tolerance, fits[best])
    final.weight = rotation @ final.weight
    return LogisticProbe(mean, std, final, scores)


# ---- accuracy -----------------------------------------------------------------------------------------
def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a binomial proportion correct / total; 95% by default."""
    if total <= 0:
        raise ValueError(f"an interval needs at least one trial, got total={total}")
    p, z2 = correct / total, z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


# ---- evaluation ---------------------------------------------------------------------------------------
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass
class ProbeSettings:
    """Options of the two probes: ``knn_predict`` and ``logistic_probe`` (whose arguments these are)."""

    k: int = 20
    temperature: float = 0.07
    c_grid: Sequence[float] = C_GRID
    holdout: float = 0.1
    select_limit: int | None = 10_000
    max_iter: int = 1000
    tolerance: float = 1e-5
    seed: int = 0

    def logistic(self, x: Tensor, y: Tensor, num_classes: int) -> LogisticProbe:
        """``logistic_probe`` of x (N, D), y (N,) with these settings."""
        return logistic_probe(
            x, y, num_classes, self.c_grid, self.holdout, self.select_limit, self.seed, self.max_iter, self.tolerance
        )


def probe_counts(train: FeatureSet, test: FeatureSet, num_classes: int, settings: ProbeSettings) -> dict[str, dict]:
    """Fit both probes on every feature of ``train`` and score them on ``test``: {"<feature>/knn": {"correct",
    "total"}, "<feature>/logreg": {"correct", "total", "c", "iterations", "grad_max"}}."""
    counts = {}
    for name, features in train.features.items():
        knn = knn_predict(features, train.labels, test.features[name], num_classes, settings.k, settings.temperature)
        probe = settings.logistic(features, train.labels, num_classes)
        logreg = probe.logits(test.features[name]).argmax(dim=1)
        total = len(test)
        counts[f"{name}/knn"] = {"correct": int((knn == test.labels).sum()), "total": total}
        counts[f"{name}/logreg"] = {
            "correct": int((logreg == test.labels).sum()),
            "total": total,
            "c": probe.fit.c,
            "iterations": probe.fit.iterations,
            "grad_max": probe.fit.grad_max,
        }
    return counts


def stratified_folds(labels: Tensor, folds: int, seed: int = 0) -> list[Tensor]:
    """``folds`` disjoint index tensors that cover range(N) once: every class's samples, in a seeded random
    order, are dealt to the folds in turn, so each fold holds each class's share to within one sample."""
    if not 2 <= folds <= len(labels):
        raise EvaluationInputError(f"folds must be in 2..{len(labels)} (the number of images), got {folds}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(labels.device)
    by_class = order[torch.sort(labels[order], stable=True).indices]
    return [by_class[fold::folds] for fold in range(folds)]


def cross_validate(data: FeatureSet, folds: int, num_classes: int, settings: ProbeSettings) -> dict[str, dict]:
    """k-fold cross-validation of both probes: every image is scored once, by probes fit on the other folds.
    Returns ``probe_counts``'s keys with the counts summed over the folds and ``c`` / ``iterations`` / ``grad_max``
    as per-fold lists."""
    summed: dict[str, dict] = {}
    for fold in stratified_folds(data.labels, folds, settings.seed):
        rest = torch.ones(len(data), dtype=torch.bool, device=data.labels.device)
        rest[fold] = False
        train = data.subset(rest.nonzero().squeeze(1))
        for key, counts in probe_counts(train, data.subset(fold), num_classes, settings).items():
            into = summed.setdefault(key, {"correct": 0, "total": 0})
            for field, value in counts.items():
                if field in ("correct", "total"):
                    into[field] += value
                else:
                    into.setdefault(field, []).append(value)
    return summed


def with_intervals(counts: dict[str, dict]) -> dict[str, dict]:
    """Each entry of ``counts`` with its top-1 accuracy and Wilson 95% interval added ("top1", "ci95")."""
    return {
        key: {"top1": c["correct"] / c["total"], "ci95": list(wilson_interval(c["correct"], c["total"])), **c}
        for key, c in counts.items()
    }


# ---- floors as classifiers ----------------------------------------------------------------------------
def random_encoder(architecture: dict[str, Any], seed: int) -> MaskedViT:
    """A randomly initialised encoder (the floor), seeded without touching the global RNG. ``architecture``: the
    ``encoder``, ``img_size``, ``patch_size``, ``in_chans``, ``mean``, ``std``, ``encoder_kwargs`` and
    ``sincos_pos_embed`` hyperparameters of a module; the encoder keeps its final norm (``pooled_features``)."""
    kwargs = {k: v for k, v in (architecture.get("encoder_kwargs") or {}).items() if k != "global_pool"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskedViT.from_settings({**architecture, "encoder_kwargs": kwargs})


class Pooled(nn.Module):
    """One pooling of ``pooled_features``: images (B, C, H, W) -> (B, D)."""

    def __init__(self, encoder: MaskedViT, pooling: GlobalPool) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling

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
    x (B, C, H, W) in [0, 1], differentiable in x, and the ``cross_entropy_objective`` that PGD maximises, so the
    robustness evaluator scores a floor as it scores a classifier module."""

    def __init__(self, features_of: nn.Module, probe: LogisticProbe) -> None:
        super().__init__()
        self.features_of, self.probe = features_of.requires_grad_(False).eval(), probe

    def logits(self, x: Tensor) -> Tensor:
        return self.probe.logits(self.features_of(x).float())

    def cross_entropy_objective(self, labels: Tensor) -> Callable[[Tensor], Tensor]:
        """objective(x_adv) -> per-sample cross-entropy (B,) of ``logits(x_adv)`` against labels (B,)."""
        labels = labels.detach()
        return lambda x_adv: F.cross_entropy(self.logits(x_adv), labels, reduction="none")


# ---- the command ---------------------------------------------------------------------------------------
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


class FeatureEvalModule(L.LightningModule):
    """kNN and logistic-regression probes of an encoder's frozen features, beside the random-encoder and raw-pixel
    floors, run by ``advmim test`` (see the module docstring).

    ``on_test_epoch_start`` extracts the training split's features (the data module's evaluation transform, no
    augmentation), ``test_step`` those of the test batches, and ``on_test_epoch_end`` fits and scores both probes
    on every feature: the encoder's for each pooling, a randomly initialised encoder of the same architecture
    (seeded; absent when the encoder itself is ``random``) and the raw pixels. With ``folds`` >= 2 the training
    and test images are pooled and scored by stratified k-fold cross-validation instead (for small test splits
    such as the MNIST subset's 1,000 images). It prints a table, logs ``features/<source>/<pooling>/<probe>``
    top-1 and writes ``features.md`` / ``features.json`` (``results``: every accuracy with its Wilson interval and
    counts; ``self.results`` holds the same) to the logger's folder. Features and fits stay on the module's
    device; extraction runs under the trainer's precision (bf16-mixed: bf16 autocast). One device only.

    Args:
        init_from: ``PretrainModule`` checkpoint (.ckpt, clean branch), exported encoder (.safetensors), or
            ``random`` for a randomly initialised encoder (the floor itself).
        num_classes: classes (linked from the DataModule).
        encoder: timm ViT name (must match ``init_from``).
        img_size: input side in pixels (linked from the DataModule).
        patch_size: patch side in pixels.
        in_chans: image channels (linked from the DataModule).
        mean: per-channel pixel mean of the Normalize inside the encoder (linked from the data).
        std: per-channel pixel std (linked from the data).
        encoder_kwargs: extra timm ``create_model`` arguments (must match ``init_from``).
        sincos_pos_embed: fixed sin-cos positions for a random encoder (loaded from ``init_from`` otherwise).
        poolings: which poolings to report: ``token`` (cls token after the final norm), ``avg`` (patch average).
        floors: also report the random-encoder and raw-pixel floors.
        pixel_size: side the raw-pixel floor is area-averaged down to (at most the image side).
        knn_k: neighbours that vote.
        knn_temperature: T of the vote weights exp(cosine / T).
        logreg_c: the inverse L2 strengths (scikit-learn's C) to choose from.
        holdout: fraction of the training features held out to choose C.
        select_limit: at most this many features fit each candidate C (all of them fit the chosen one).
        max_iter: L-BFGS iteration limit per fit.
        tolerance: L-BFGS stops when the largest gradient entry of the mean objective is below it.
        folds: 0 scores the test split; k >= 2 runs stratified k-fold cross-validation over train + test.
        seed: seed of the random encoder, the held-out split and the folds.
    """

    def __init__(
        self,
        init_from: str,
        num_classes: PositiveInt,
        encoder: str = "vit_base_patch16_224",
        img_size: PositiveInt = 224,
        patch_size: PositiveInt = 16,
        in_chans: PositiveInt = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        encoder_kwargs: dict[str, Any] | None = None,
        sincos_pos_embed: bool = True,
        poolings: tuple[GlobalPool, ...] = POOLINGS,
        floors: bool = True,
        pixel_size: PositiveInt = 32,
        knn_k: PositiveInt = 20,
        knn_temperature: PositiveFloat = 0.07,
        logreg_c: tuple[PositiveFloat, ...] = C_GRID,
        holdout: OpenUnitInterval = 0.1,
        select_limit: PositiveInt | None = 10_000,
        max_iter: PositiveInt = 1000,
        tolerance: PositiveFloat = 1e-5,
        folds: NonNegativeInt = 0,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        unknown = [p for p in poolings if p not in POOLINGS]
        if unknown or not poolings:
            raise ValueError(f"unknown pooling {unknown or poolings!r}: choose one or more of {list(POOLINGS)}")
        if folds == 1:
            raise ValueError("folds must be 0 (score the test split) or at least 2 (k-fold cross-validation), got 1")
        if encoder_kwargs and "global_pool" in encoder_kwargs:
            raise ValueError("FeatureEvalModule reports every pooling itself: drop global_pool from encoder_kwargs")
        require_positive(knn_k=knn_k, knn_temperature=knn_temperature, pixel_size=pixel_size, max_iter=max_iter)
        self.save_hyperparameters()
        self.hparams.update(plain(dict(self.hparams)))  # jsonargparse's PositiveInt etc. as plain numbers
        if init_from == "random":
            sources = {"encoder": random_encoder(self.hparams, seed)}
        else:
            sources = {"encoder": random_encoder(self.hparams, seed + 1)}  # its weights come from init_from
            weights = read_weights(init_from)
            load_encoder(sources["encoder"].vit, weights, init_from)
            weights.check_statistics(init_from, mean, std)
            if floors:  # the random-encoder floor
                sources["random"] = random_encoder(self.hparams, seed)
        self.encoders = nn.ModuleDict(sources).requires_grad_(False).eval()
        self.settings = ProbeSettings(
            knn_k, knn_temperature, logreg_c, holdout, select_limit, max_iter, tolerance, seed
        )
        self.train_features: FeatureSet | None = None
        self.test_parts: list[FeatureSet] = []
        self.results: dict[str, dict] = {}

    def train(self, mode: bool = True) -> "FeatureEvalModule":
        """The encoders are frozen: always in eval mode."""
        return super().train(False)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Every feature of images x (B, C, H, W) in [0, 1]: {"<source>/<pooling>": (B, D), "pixels": (B, P)}."""
        out = {}
        for source, encoder in self.encoders.items():
            pooled = pooled_features(encoder, x)
            out.update({f"{source}/{pooling}": pooled[pooling] for pooling in self.hparams.poolings})
        if self.hparams.floors:
            out["pixels"] = pixel_features(x, self.encoders["encoder"].normalize, self.hparams.pixel_size)
        return out

    def on_test_epoch_start(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise RuntimeError("FeatureEvalModule runs on one device: set trainer.devices: 1")
        data = trainer.datamodule
        if not isinstance(data, ImageDataModule):
            raise EvaluationInputError(
                f"FeatureEvalModule needs one of the project's data modules (advmim_pl.data), got {type(data).__name__}"
            )
        batches = evaluation_batches(data.train_set, data.eval_transform(), data.batch_size, data.num_workers)
        self.train_features = extract(self.features, batches, self.device, trainer.precision_plugin.forward_context)
        self.test_parts = []

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = labelled(batch)
        self.test_parts.append(FeatureSet({k: v.float() for k, v in self.features(x).items()}, y))

    def on_test_epoch_end(self) -> None:
        train, num_classes = self.train_features, self.hparams.num_classes
        if not self.test_parts:
            raise EvaluationInputError("the data module has no test images: give it a test split (e.g. val_root)")
        test = FeatureSet.cat(self.test_parts)
        for split, labels in (("training", train.labels), ("test", test.labels)):
            if labels.min() < 0 or labels.max() >= num_classes:
                raise EvaluationInputError(
                    f"{split} labels span {int(labels.min())}..{int(labels.max())}, not 0..{num_classes - 1}"
                )
        if len(train.labels.unique()) < 2:
            raise EvaluationInputError(
                f"the training labels hold one class ({int(train.labels[0])}): probes need at least two"
            )
        folds = self.hparams.folds
        if folds:
            counts = cross_validate(FeatureSet.cat([train, test]), folds, num_classes, self.settings)
        else:
            counts = probe_counts(train, test, num_classes, self.settings)
        self.results = with_intervals(counts)
        self.log_dict({f"features/{key}": value["top1"] for key, value in self.results.items()})
        if self.trainer.is_global_zero:
            self._report(len(train), len(test))

    def _report(self, n_train: int, n_test: int) -> None:
        """Print the table; write features.md and features.json to the log folder."""
        hp, trainer = self.hparams, self.trainer
        data = type(trainer.datamodule).__name__
        if hp.folds:
            protocol = f"{hp.folds}-fold cross-validation over the {n_train + n_test:,} training and test images"
        else:
            protocol = f"{n_train:,} training images, scored on {n_test:,} test images"
        knn = f"kNN (k={hp.knn_k}, T={hp.knn_temperature})"
        title = f"Frozen features of {hp.init_from} on {data}: {protocol}; top-1 % [Wilson 95% interval]"
        rows = table_rows(self.results, hp.init_from, hp.pixel_size)
        header = ["features", "pooling", knn, "logistic regression", "C"]
        table = Table(title=title)
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"{title}.", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        (folder / "features.md").write_text("\n".join(lines) + "\n")
        report = {
            "init_from": hp.init_from,
            "data": data,
            "protocol": {"folds": hp.folds, "train": n_train, "test": n_test},
            "knn": {"k": hp.knn_k, "temperature": hp.knn_temperature},
            "interval": "Wilson score, 95%",
            "results": self.results,
        }
        (folder / "features.json").write_text(json.dumps(report, indent=2))


def table_rows(results: dict[str, dict], init_from: str, pixel_size: int) -> list[list[str]]:
    """Table rows (features, pooling, kNN, logistic regression, C) of ``FeatureEvalModule.results``: the encoder's
    rows first, then the floors."""
    names = {"encoder": "random init" if init_from == "random" else "encoder", "random": "random init"}

    def accuracy(entry: dict) -> str:
        low, high = entry["ci95"]
        return f"{100 * entry['top1']:.2f} [{100 * low:.1f}, {100 * high:.1f}]"

    rows = []
    for key in dict.fromkeys(k.rpartition("/")[0] for k in results):
        source, _, pooling = key.partition("/")
        c = results[f"{key}/logreg"]["c"]
        c = ", ".join(f"{v:g}" for v in c) if isinstance(c, list) else f"{c:g}"
        label = f"raw pixels ({pixel_size} px)" if source == "pixels" else names[source]
        rows.append(
            [
                label,
                POOLING_NAMES.get(pooling, ""),
                accuracy(results[f"{key}/knn"]),
                accuracy(results[f"{key}/logreg"]),
                c,
            ]
        )
    return rows
