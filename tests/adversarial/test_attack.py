"""Attack engine: budgets, analytic PGD, step-size rule, non-finite fallback, frozen_eval."""

import itertools

import pytest
import torch
from torch import nn

from advmim_pl.adversarial.attack import check_eps, default_step_size, frozen_eval, perturb, pgd_attack, pgd_steps

EPS = [0.0, 4 / 255, 8 / 255]


def boundary_images(seed: int = 0) -> torch.Tensor:
    """(4, 2, 8, 8) in [0, 1] with exact 0s and 1s and values near the bounds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 2, 8, 8, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    x[2, :, :4] = 0.0
    x[2, :, 4:] = 1.0
    x[3, 0] = 0.5 / 255
    x[3, 1] = 1 - 0.5 / 255
    return x


def weights(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Per-pixel weights, none of them zero, both signs at the bounds."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1:], generator=g)
    return torch.where(w.abs() < 0.05, torch.full_like(w, 0.5), w)


def linear_objective(w: torch.Tensor):
    return lambda x: (w * x).flatten(1).sum(dim=1)


@pytest.mark.parametrize(
    "kind, random_start, eps",
    list(itertools.product(["pgd", "sign", "gaussian", "uniform", "none"], [True, False], EPS)),
)
def test_budget_and_range(kind, random_start, eps):
    x = boundary_images()
    objective = linear_objective(weights(x))
    g = torch.Generator().manual_seed(0)
    x_adv, finite = perturb(kind, objective, x, eps, 3, None, random_start, g)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert bool(finite) is True
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    if eps == 0 or kind == "none":
        assert torch.equal(x_adv, x)
    elif kind == "pgd" or random_start or kind in ("sign", "gaussian", "uniform"):
        assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("eps", [4 / 255, 8 / 255])
def test_pgd_one_step_is_signed_gradient_step(eps):
    x = boundary_images()
    w = weights(x)
    x_adv = pgd_attack(linear_objective(w), x, eps, steps=1, step_size=eps, random_start=False)
    expected = (x + eps * w.sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, atol=1e-7, rtol=0)
    # the objective does increase, by eps * |w| on every pixel that is not pinned at a bound
    assert (linear_objective(w)(x_adv) > linear_objective(w)(x)).all()


def test_pgd_many_steps_reach_the_ball_corner_with_random_start():
    eps = 8 / 255
    x = boundary_images()
    w = weights(x)
    g = torch.Generator().manual_seed(0)
    x_adv = pgd_attack(linear_objective(w), x, eps, steps=5, step_size=eps / 2, random_start=True, generator=g)
    expected = (x + eps * w.sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, atol=1e-6, rtol=0)


def test_default_step_size_rule():
    eps = 8 / 255
    assert default_step_size(eps, 1) == pytest.approx(1.25 * eps)
    for steps in (2, 3, 10):
        assert default_step_size(eps, steps) == pytest.approx(2.5 * eps / steps)
    assert default_step_size(0.0, 5) == 0.0


@pytest.mark.parametrize("steps", [1, 3])
def test_pgd_uses_default_step_size_when_none(steps):
    eps = 8 / 255
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # a non-linear objective, so that the step size matters
    objective = lambda z: (torch.sin(20 * z) * z).flatten(1).sum(dim=1)
    a = pgd_attack(objective, x, eps, steps, None, True, torch.Generator().manual_seed(5))
    b = pgd_attack(objective, x, eps, steps, default_step_size(eps, steps), True, torch.Generator().manual_seed(5))
    c = pgd_attack(objective, x, eps, steps, eps / 10, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("random_start", [True, False])
def test_non_finite_gradient_falls_back_to_clean(random_start):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    # sqrt of a negative number: value and gradient are NaN
    objective = lambda z: torch.sqrt(z - 2.0).flatten(1).sum(dim=1)
    x_adv, finite = pgd_steps(objective, x, 8 / 255, 2, None, random_start, torch.Generator().manual_seed(0))
    assert bool(finite) is False and finite.dtype == torch.bool and finite.dim() == 0
    assert torch.equal(x_adv, x)


def test_one_non_finite_sample_falls_back_for_the_whole_batch():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[1] = 0.0

    def objective(z):
        per = z.flatten(1)
        # sample 1 sits at 0 where sqrt has an infinite gradient; the others are fine
        return torch.sqrt(per).sum(dim=1)

    x_adv, finite = pgd_steps(objective, x, 8 / 255, 1, None, False)
    assert bool(finite) is False
    assert torch.equal(x_adv, x)


def test_pgd_writes_no_parameter_grad():
    lin = nn.Linear(64, 1)
    x = torch.rand(2, 1, 8, 8)
    pgd_attack(lambda z: lin(z.flatten(1)).squeeze(1), x, 4 / 255, 2)
    assert lin.weight.grad is None and lin.bias.grad is None


def test_unknown_perturbation():
    with pytest.raises(ValueError, match="salt"):
        perturb("salt", lambda z: z.sum(), torch.rand(1, 1, 2, 2), 0.1, 1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
        self.b = nn.Sequential(nn.Dropout(0.1), nn.LayerNorm(2))


def mixed_pattern() -> Mixed:
    m = Mixed().train()
    m.a[1].eval()
    m.b.eval()
    m.b[1].train()  # a train child under an eval parent
    return m


def test_frozen_eval_sets_eval_and_restores_mixed_pattern():
    m = mixed_pattern()
    before = [(name, mod.training) for name, mod in m.named_modules()]
    assert len({t for _, t in before}) == 2
    with frozen_eval(m):
        assert not any(mod.training for mod in m.modules())
    assert [(name, mod.training) for name, mod in m.named_modules()] == before


def test_frozen_eval_restores_on_exception():
    m = mixed_pattern()
    before = [mod.training for mod in m.modules()]
    with pytest.raises(ZeroDivisionError):
        with frozen_eval(m):
            raise ZeroDivisionError
    assert [mod.training for mod in m.modules()] == before


def test_frozen_eval_freezes_running_stats():
    m = mixed_pattern()
    stats = {k: v.clone() for k, v in m.state_dict().items()}
    with frozen_eval(m):
        m.a(torch.randn(4, 2) * 5)
    assert all(torch.equal(v, stats[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize(
    "kind, low, high",
    [("sign", 1.0, 1.0), ("gaussian", 0.71, 0.73), ("uniform", 0.57, 0.585), ("pgd", 0.885, 1.0)],
)
def test_perturbation_rms_in_units_of_eps(kind, low, high):
    """The documented energies: sign exactly eps, the clipped Gaussian 0.72 eps, uniform 1/sqrt(3) eps, one
    PGD step from a random start 0.89 eps when the gradient's sign is independent of the start."""
    eps = 8 / 255
    x = torch.full((16, 1, 64, 64), 0.5)  # away from the pixel bounds: no clipping to [0, 1]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(x.shape[1:], generator=g)
    x_adv, _ = perturb(kind, linear_objective(w), x, eps, 1, None, True, g)
    rms = (x_adv - x).pow(2).mean().sqrt().item() / eps
    assert low - 1e-4 <= rms <= high + 1e-4, rms


@pytest.mark.parametrize("eps, intent", [(2.0, "2/255 = 0.0078"), (8, "8/255 = 0.0314"), (1.0, "1/255 = 0.0039")])
def test_an_eps_of_one_or_more_is_refused_with_the_likely_intent(eps, intent):
    with pytest.raises(ValueError, match=rf"eps={eps!r}.*did you mean {intent}"):
        check_eps(eps, "PGD")


def test_a_large_eps_is_warned_and_a_usual_one_is_not():
    warning = check_eps(0.2, "PGD")
    assert "eps=0.2" in warning and "51/255" in warning and "8/255 = 0.0314" in warning
    assert check_eps(32 / 255, "PGD") is None and check_eps(4 / 255, "PGD") is None and check_eps(0.0, "PGD") is None
