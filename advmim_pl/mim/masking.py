"""Mask sampling, as pure functions. Masks are (B, N) with 1 = masked, N patches in row-major order."""

import torch
from torch import Tensor

from advmim_pl.rng import rand


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches an MAE encoder sees: ``int(N * (1 - ratio))``, as in the reference code."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Uniform per-sample masking (MAE).

    Returns keep (B, K) sorted patch indices with K = ``num_kept(N, ratio)``, and mask (B, N) float,
    1 on the N - K masked patches. Sorting the kept indices does not change the encoding (positions
    are added before selection) and makes ratio 0 equal to the unmasked encoder.
    """
    noise = rand((batch, num_patches), device, generator)
    keep = noise.argsort(dim=1)[:, : num_kept(num_patches, mask_ratio)].sort(dim=1).values
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, keep, 0.0)
    return keep, mask


def block_masking(
    batch: int,
    grid_size: tuple[int, int],
    block: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """SimMIM block-wise masking: mask ``round(ratio * units)`` random block x block squares of patches.

    grid_size (h, w) in patches, both divisible by ``block``. Returns mask (B, h*w) float, 1 = masked.
    """
    h, w = grid_size
    units_h, units_w = h // block, w // block
    units = units_h * units_w
    num_masked = int(round(mask_ratio * units))
    noise = rand((batch, units), device, generator)
    rank = noise.argsort(dim=1).argsort(dim=1)
    unit_mask = (rank < num_masked).float().view(batch, units_h, units_w)
    full = unit_mask.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
    return full.reshape(batch, h * w)
