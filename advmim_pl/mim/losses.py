"""Reconstruction targets and losses, as pure functions."""

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, pixels (p, p, C) inside a patch as in MAE."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int, grid_size: tuple[int, int]) -> Tensor:
    """Inverse of ``patchify``: (B, N, p*p*C) -> (B, C, h*p, w*p)."""
    b = patches.shape[0]
    (h, w), p = grid_size, patch_size
    x = patches.reshape(b, h, w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h * p, w * p)


def normalize_patches(target: Tensor, var_floor: float = 0.0, stats_from: Tensor | None = None) -> Tensor:
    """Per-patch normalised targets: ``(target - mean) / sqrt(var + 1e-6 + var_floor)``.

    target (B, N, P) -> (B, N, P). The mean and (unbiased) variance are per patch, of ``stats_from``
    (B, N, P) when given, else of ``target``. ``var_floor = 0`` is MAE's ``norm_pix_loss``; a floor keeps
    a perturbation of a flat patch at its size divided by ``sqrt(var_floor)`` instead of unit variance.
    """
    source = target if stats_from is None else stats_from.float()
    mean = source.mean(dim=-1, keepdim=True)
    var = source.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1e-6 + var_floor).sqrt()


def mae_loss(
    pred: Tensor,
    target: Tensor,
    mask: Tensor,
    norm_pix: bool = True,
    var_floor: float = 0.0,
    stats_from: Tensor | None = None,
) -> Tensor:
    """Mean over masked patches of the per-patch MSE.

    pred/target (B, N, p*p*C), mask (B, N) 1 = masked. With ``norm_pix`` the target goes through
    ``normalize_patches(target, var_floor, stats_from)`` first (stats_from (B, N, p*p*C) or None).
    Returns a scalar (fp32).
    """
    pred, target = pred.float(), target.float()
    if norm_pix:
        target = normalize_patches(target, var_floor, stats_from)
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def simmim_loss(pred: Tensor, target: Tensor, pixel_mask: Tensor) -> Tensor:
    """L1 over masked pixels only, averaged per masked pixel and channel.

    pred/target (B, C, H, W), pixel_mask (B, 1, H, W) 1 = masked. Returns a scalar (fp32).
    """
    l1 = (pred.float() - target.float()).abs()
    channels = target.shape[1]
    return (l1 * pixel_mask).sum() / (pixel_mask.sum() * channels).clamp_min(1)


def upsample_mask(mask: Tensor, grid_size: tuple[int, int], patch_size: int) -> Tensor:
    """Patch mask (B, N) -> pixel mask (B, 1, h*p, w*p)."""
    h, w = grid_size
    m = mask.reshape(-1, 1, h, w)
    return m.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def feature_distance(features: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Per-sample distance between token features (B, T, D) -> (B,), computed in fp32.

    ``mse``: mean squared difference; ``cosine``: mean over tokens of 1 - cos; ``kl``: mean over tokens
    of KL(softmax(target) || softmax(features)) with softmax over channels.
    """
    f, t = features.float(), target.float()
    if kind == "mse":
        return (f - t).pow(2).mean(dim=(1, 2))
    if kind == "cosine":
        return (1 - torch.nn.functional.cosine_similarity(f, t, dim=-1)).mean(dim=1)
    if kind == "kl":
        log_p, log_q = t.log_softmax(dim=-1), f.log_softmax(dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=1)
    raise ValueError(f"distance must be one of ('mse', 'cosine', 'kl'), got {kind!r}")
