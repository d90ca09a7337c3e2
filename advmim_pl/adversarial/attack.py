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

from advmim_pl.rng import rand, randn

Objective = Callable[[Tensor], Tensor]
Perturbation = Literal["pgd", "gaussian", "uniform", "none"]


def default_step_size(eps: float, steps: int) -> float:
    """SPEC rule: 1.25 * eps for a single step, else 2.5 * eps / steps."""
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
    """One perturbation of size eps: ``pgd``, ``gaussian`` (sigma = eps, clipped to +-eps), ``uniform``
    (+-eps) or ``none``. Returns (x_adv, finite) as ``pgd_steps``."""
    finite = torch.ones((), dtype=torch.bool, device=x.device)
    if kind == "pgd":
        return pgd_steps(objective, x, eps, steps, step_size, random_start, generator)
    if kind == "gaussian":
        noise = randn(tuple(x.shape), x.device, generator).mul(eps).clamp(-eps, eps)
        return project(x + noise.to(x.dtype), x, eps), finite
    if kind == "uniform":
        return project(x + uniform_noise(x, eps, generator), x, eps), finite
    if kind == "none":
        return x.detach(), finite
    raise ValueError(f"unknown perturbation {kind!r}: choose pgd, gaussian, uniform or none")


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
