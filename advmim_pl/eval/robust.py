"""Robust accuracy of classifiers, as pure functions: clean, every corruption x severity, and PGD.

``robust_accuracies`` serves ``RobustnessEvaluator`` (its model and readouts, one test batch per call) and
``robust_accuracy`` (one classifier) the study (all its images).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advmim_pl.adversarial.attack import Objective
from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.rng import generator_for

CORRUPTION_SEED_STRIDE = 1_000_003  # batch i of seed s draws its corruption noise from seed s * stride + i


def pgd_key(eps: float) -> str:
    """The results key of the PGD accuracy at L-inf budget ``eps`` (pixel units), e.g. 'pgd/0.01569'."""
    return f"pgd/{eps:.5f}"


def pgd_eps(key: str) -> float:
    """The budget of a PGD results key: 'pgd/0.01569' -> 0.01569."""
    return float(key.removeprefix("pgd/"))


def accuracy_counts(logits: Tensor, labels: Tensor, classes: Tensor | None = None) -> Tensor:
    """Correct top-1 predictions as a 0-d tensor. logits (B, K), labels (B,); ``classes`` (M,) restricts the
    argmax to those class indices."""
    if classes is not None:
        return (classes[logits[:, classes].argmax(dim=1)] == labels).sum()
    return (logits.argmax(dim=1) == labels).sum()


def cross_entropy_objective(logits: Callable[[Tensor], Tensor], labels: Tensor) -> Objective:
    """objective(x_adv) -> per-sample cross-entropy (B,) of ``logits(x_adv)`` (in float32) against labels (B,)."""
    labels = labels.detach()
    return lambda x_adv: F.cross_entropy(logits(x_adv).float(), labels, reduction="none")


@dataclass
class RobustCounts:
    """Correct predictions per results key ("clean", "corruption/<name>/<severity>", ``pgd_key(eps)``) as 0-d
    tensors on the images' device, out of ``total`` images."""

    correct: dict[str, Tensor]
    total: int

    def accuracy(self) -> dict[str, float]:
        """Every key as a fraction of ``total``, plus "corruption/mean" (the mean over the corruption keys)."""
        if self.total <= 0:
            raise ValueError(f"no images were scored (total={self.total}): give robust_accuracy at least one batch")
        return with_corruption_mean({key: float(count) / self.total for key, count in self.correct.items()})


def with_corruption_mean(results: dict[str, float], prefix: str = "") -> dict[str, float]:
    """``results`` with "<prefix>corruption/mean" added: the mean of its "<prefix>corruption/..." entries (none:
    nothing added)."""
    corruption = [v for k, v in results.items() if k.startswith(f"{prefix}corruption/")]
    if not corruption:
        return results
    return {**results, f"{prefix}corruption/mean": sum(corruption) / len(corruption)}


@dataclass
class Classifier:
    """One classifier ``robust_accuracy`` scores: ``logits`` images (B, C, H, W) in [0, 1] -> logits (B, K),
    differentiable in the images; ``attacks`` one ``Attacker`` per budget, each keeping its own random stream across
    calls; ``objective(labels)`` the loss PGD maximises (None: ``cross_entropy_objective(logits, labels)``)."""

    logits: Callable[[Tensor], Tensor]
    attacks: Sequence[Attacker] = ()
    objective: Callable[[Tensor], Objective] | None = None


def robust_accuracies(
    classifiers: Mapping[str, Classifier],
    batches: Iterable[tuple[Tensor, Tensor]],
    module: nn.Module,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    first_batch: int = 0,
) -> dict[str, RobustCounts]:
    """Clean, corruption and PGD accuracy counts of several classifiers on the same labelled batches; each
    corrupted batch is made once and scored by every classifier.

    ``batches`` of (images (B, C, H, W) in [0, 1], labels (B,)); ``module`` the model the attacks run against
    (handed to ``Attacker.generate``, which puts it in eval mode for the attack). Returns the counts per name.

    Seeding rule: batch i (counted from ``first_batch``) draws all its corruption noise from one generator on the
    images' device seeded with ``seed * 1_000_003 + i``, in the order ``corruptions`` x ``severities``. So a
    corrupted image depends only on (seed, batch index, batch content), not on the classifiers or what was scored
    before: every classifier scored with the same arguments sees the same corrupted images.
    """
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; choose from {list(CORRUPTIONS)}")
    correct: dict[str, dict[str, Tensor]] = {name: {} for name in classifiers}
    total = 0

    def score(key: str, x: Tensor, y: Tensor, names=classifiers) -> None:
        for name in names:
            counts = correct[name]
            counts[key] = counts.get(key, 0) + accuracy_counts(classifiers[name].logits(x), y)

    for index, (x, y) in enumerate(batches, start=first_batch):
        total += len(y)
        with torch.no_grad():
            score("clean", x, y)
            generator = generator_for(x.device).manual_seed(seed * CORRUPTION_SEED_STRIDE + index)
            for name in corruptions:
                for severity in severities:
                    score(f"corruption/{name}/{severity}", corrupt(x, name, severity, generator), y)
        for name, classifier in classifiers.items():
            objective = classifier.objective or (lambda labels, c=classifier: cross_entropy_objective(c.logits, labels))
            for attack in classifier.attacks:
                x_adv = attack.generate(module, x, objective(y)).x_adv
                with torch.no_grad():
                    score(pgd_key(attack.eps), x_adv, y, names=[name])
    return {name: RobustCounts(counts, total) for name, counts in correct.items()}


def robust_accuracy(
    logits: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    module: nn.Module,
    attacks: Sequence[Attacker] = (),
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    first_batch: int = 0,
    objective: Callable[[Tensor], Objective] | None = None,
) -> RobustCounts:
    """``robust_accuracies`` of one classifier (``Classifier`` documents ``logits``, ``attacks`` and
    ``objective``), with the same seeding rule."""
    classifier = {"": Classifier(logits, attacks, objective)}
    return robust_accuracies(classifier, batches, module, corruptions, severities, seed, first_batch)[""]
