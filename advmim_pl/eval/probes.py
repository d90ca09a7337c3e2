"""Probes of frozen features, as pure functions: kNN, L-BFGS logistic regression, Wilson intervals and k-fold
cross-validation.

- **kNN** (InstDisc, Wu et al. 2018, arXiv:1805.01978; the rule of DINO's ``eval_knn``): cosine similarity,
  the k most similar training features vote for their class with weight exp(similarity / T).
- **Logistic regression**: multinomial, L2 on the weights, on standardised features, run to convergence with
  full-batch L-BFGS; the L2 strength is chosen on a held-out part of the training set, then the model is refit
  on all of it.

Each accuracy comes with its Wilson score 95% interval (``with_intervals``).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from advmim_pl.errors import EvaluationInputError

Z95 = 1.959963984540054  # two-sided 95% normal quantile


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
