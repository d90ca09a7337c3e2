"""robust_accuracy: clean, corruption and PGD counts against independent computations, and its seeding rule."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.eval.corruptions import corrupt
from advmim_pl.eval.robust import RobustCounts, pgd_key, robust_accuracy, with_corruption_mean
from advmim_pl.rng import generator_for

STEPS, STEP_SIZE, EPS = 4, 2 / 255, (2 / 255, 8 / 255)


class Linear(L.LightningModule):
    """A fixed linear classifier of 1 x 8 x 8 images whose classes follow the labels' rule: right on most images."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


@pytest.fixture(scope="module")
def problem() -> tuple[Linear, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    templates = torch.rand(3, 64, generator=generator)
    y = torch.randint(0, 3, (48,), generator=generator)
    x = (0.15 * templates[y] + 0.85 * torch.rand(48, 64, generator=generator)).clamp(0, 1).view(48, 1, 8, 8)
    return Linear(8 * (templates - templates.mean(0)).T.contiguous()), x, y


def reference_pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Textbook L-inf PGD (Madry et al.) from the clean image, written independently of advmim_pl."""
    x_adv = x.clone()
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = x_adv.detach() + STEP_SIZE * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    return x_adv


def batches(x, y, size=16):
    return list(zip(x.split(size), y.split(size), strict=True))


def test_counts_agree_with_an_independent_pgd_and_the_stated_corruption_seeds(problem):
    model, x, y = problem
    attacks = [Attacker(eps=eps, steps=STEPS, step_size=STEP_SIZE, random_start=False) for eps in EPS]
    names, severities, seed = ("gaussian_noise", "contrast"), (1, 5), 3
    counts = robust_accuracy(model, batches(x, y), model, attacks, names, severities, seed=seed, first_batch=7)
    assert counts.total == 48
    assert int(counts.correct["clean"]) == int((model(x).argmax(1) == y).sum()) >= 30
    expected = dict.fromkeys([f"corruption/{n}/{s}" for n in names for s in severities], 0)
    for index, (xb, yb) in enumerate(batches(x, y), start=7):  # one generator per batch, seed * 1_000_003 + index
        generator = generator_for(xb.device).manual_seed(seed * 1_000_003 + index)
        for key in expected:
            _, name, severity = key.split("/")
            expected[key] += int((model(corrupt(xb, name, int(severity), generator)).argmax(1) == yb).sum())
    assert {k: int(v) for k, v in counts.correct.items() if k.startswith("corruption/")} == expected
    assert expected["corruption/gaussian_noise/1"] != expected["corruption/gaussian_noise/5"]  # the noise matters
    for eps in EPS:
        adversarial = [(reference_pgd(model, xb, yb, eps), yb) for xb, yb in batches(x, y)]
        reference = sum(int((model(xa).argmax(1) == yb).sum()) for xa, yb in adversarial)
        assert abs(int(counts.correct[pgd_key(eps)]) - reference) <= 1, eps
    assert counts.correct[pgd_key(EPS[1])] < counts.correct["clean"]  # the attack does lower accuracy


def test_a_corrupted_image_depends_only_on_seed_and_batch_index(problem):
    model, x, y = problem
    whole = robust_accuracy(model, batches(x, y), model, corruptions=["shot_noise"], severities=[5])
    # the same batches scored one call at a time, each with its index: the same counts
    parts = [
        robust_accuracy(model, [batch], model, corruptions=["shot_noise"], severities=[5], first_batch=i)
        for i, batch in enumerate(batches(x, y))
    ]
    assert int(whole.correct["corruption/shot_noise/5"]) == sum(
        int(p.correct["corruption/shot_noise/5"]) for p in parts
    )
    shifted = robust_accuracy(model, batches(x, y), model, corruptions=["shot_noise"], severities=[5], seed=1)
    assert shifted.correct["clean"] == whole.correct["clean"]


def test_accuracy_adds_the_corruption_mean_and_refuses_no_images():
    counts = RobustCounts(
        {"clean": torch.tensor(8), "corruption/a/1": torch.tensor(4), "corruption/b/1": torch.tensor(2)}, 10
    )
    assert counts.accuracy() == pytest.approx({"clean": 0.8, "corruption/a/1": 0.4, "corruption/b/1": 0.2,
                                               "corruption/mean": 0.3})  # fmt: skip
    assert with_corruption_mean({"clean": 1.0}) == {"clean": 1.0}
    with pytest.raises(ValueError, match="no images were scored"):
        RobustCounts({}, 0).accuracy()
    with pytest.raises(ValueError, match=r"unknown corruptions \['fog_of_war'\]"):
        robust_accuracy(torch.nn.Identity(), [], torch.nn.Identity(), corruptions=["fog_of_war"])
