"""Attack engine: L-infinity PGD and equal-size generic corruptions, as pure functions.

Every function takes images x (B, C, H, W) in pixel space [0, 1] and returns x_adv of the same shape
with ``|x_adv - x|_inf <= eps`` and ``x_adv`` in [0, 1]. ``objective(x_adv) -> (B,)`` is maximised;
gradients are taken with respect to the input only (``torch.autograd.grad``), so no parameter's
``.grad`` is ever written. Nothing here synchronises with the host.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from advmim_pl.checks import choices, require
from advmim_pl.rng import rand, randn

Objective = Callable[[Tensor], Tensor]
Perturbation = Literal["pgd", "sign", "gaussian", "uniform", "none"]
MAX_EPS = 1.0  # a budget of the whole [0, 1] pixel range or more is a unit slip (8 for 8/255)
LARGE_EPS = 32 / 255  # beyond the budgets of the robustness literature: warned


def check_eps(eps: float, owner: str, key: str = "eps") -> str | None:
    """Refuse an L-inf budget that cannot be meant, and describe one that is probably a slip.

    ``eps`` is in pixel units of [0, 1] images. Raises ValueError for ``eps < 0`` or ``eps >= 1`` (the ball
    would cover the whole pixel range); returns a warning text for ``eps > 32/255``, else None. Both name
    the value and the likely intent (``eps / 255``).
    """
    require(eps >= 0, key, eps, "a non-negative L-inf budget in pixel units")
    if eps >= MAX_EPS:
        raise ValueError(
            f"{owner}: {key}={eps!r} is in pixel units of [0, 1] images, so the ball covers the whole pixel "
            f"range; did you mean {eps:g}/255 = {eps / 255:.4f}?"
        )
    if eps > LARGE_EPS:
        return (
            f"{owner}: {key}={eps!r} is {eps * 255:.3g}/255 in pixel units of [0, 1] images, above 32/255; "
            "did you mean 4/255 = 0.0157 or 8/255 = 0.0314, the usual budgets?"
        )
    return None


def default_step_size(eps: float, steps: int) -> float:
    """1.25 * eps for a single step, else 2.5 * eps / steps (docs/method.md, "The attack")."""
    return 1.25 * eps if steps == 1 else 2.5 * eps / max(steps, 1)


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the eps-ball around x and onto [0, 1]. Both (B, C, H, W)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def uniform_noise(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """Uniform noise in [-eps, eps] with x's shape, drawn from ``generator`` on its device."""
    u = rand(tuple(x.shape), x.device, generator)
    return ((2 * u - 1) * eps).to(x.dtype)


def pgd_steps(
    objective: Objective,
    x: Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """PGD that also reports whether every gradient was finite.

    Returns (x_adv (B, C, H, W), finite () bool). When any gradient of the batch is non-finite the
    batch falls back to the clean x (``finite`` is False), so NaN never leaves the attack.
    """
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    x = x.detach()
    x_adv = project(x + uniform_noise(x, eps, generator), x, eps) if random_start else x.clone()
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            value = objective(x_adv).sum()
        (grad,) = torch.autograd.grad(value, x_adv)
        finite = finite & torch.isfinite(grad).all()
        x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return torch.where(finite, x_adv, x), finite


def pgd_attack(
    objective: Objective,
    x: Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L-infinity PGD maximising ``objective``: optional uniform start, ``steps`` signed-gradient steps.

    x (B, C, H, W) in [0, 1] -> x_adv (B, C, H, W). ``step_size`` defaults to ``default_step_size``.
    """
    return pgd_steps(objective, x, eps, steps, step_size, random_start, generator)[0]


def random_sign(x: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """x + eps * s with s = +-1 per pixel (equal odds), projected like PGD: the energy-matched random control.

    x (B, C, H, W) -> (B, C, H, W). Before the projection onto [0, 1] its RMS is exactly eps, the size of a
    PGD step's sign pattern.
    """
    sign = rand(tuple(x.shape), x.device, generator).lt(0.5).to(x.dtype).mul(2).sub(1)
    return project(x + eps * sign, x, eps)


def perturb(
    kind: Perturbation,
    objective: Objective,
    x: Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One perturbation of size eps. Returns (x_adv, finite) as ``pgd_steps``.

    RMS of the perturbation before the projection onto [0, 1], for one step with a random start: ``pgd``
    0.89 to 1.0 eps (the sign step of 1.25 eps from a uniform start, clipped to +-eps; 0.89 when the
    gradient's sign is independent of the start); ``sign`` (random +-eps
    per pixel) exactly eps, the energy-matched control; ``gaussian`` (sigma = eps, clipped to +-eps) 0.72 eps;
    ``uniform`` (+-eps) 0.58 eps; ``none`` 0.
    """
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    if kind == "pgd":
        return pgd_steps(objective, x, eps, steps, step_size, random_start, generator)
    if kind == "sign":
        return random_sign(x, eps, generator), finite
    if kind == "gaussian":
        noise = randn(tuple(x.shape), x.device, generator).mul(eps).clamp(-eps, eps)
        return project(x + noise.to(x.dtype), x, eps), finite
    if kind == "uniform":
        return project(x + uniform_noise(x, eps, generator), x, eps), finite
    if kind == "none":
        return x.detach(), finite
    raise ValueError(f"perturbation must be one of {choices(Perturbation)}, got {kind!r}")


@contextmanager
def frozen_eval(module: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no dropout / drop-path, no running-statistic updates), then every
    submodule's own train/eval flag is restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
