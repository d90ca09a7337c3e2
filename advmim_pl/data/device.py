"""Device-resident training data: batched random-resized-crop and flip, and batches sliced on the device.

For splits that fit in device memory as uint8 tensors (Fashion-MNIST, the bundled sample, synthetic
data). The train split is copied to the device once and each epoch's batch indices (``TrainingOrder``) once
per epoch; every batch is an ``index_select`` and one ``grid_sample`` call, with no DataLoader workers, no
per-sample Python and no per-batch host-device copies or synchronisation.

Differences from the per-sample torchvision path (``ImageDataModule.train_transform``): crop boxes are
continuous (sub-pixel sides and corners instead of rounded integers) and there is no antialiasing, which
only matters for crops much larger than the output (a 28-px Fashion-MNIST crop is always upsampled).
"""

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from advmim_pl.data.resolution import ResolutionSchedule, announce
from advmim_pl.data.resumable import TrainingOrder, mix
from advmim_pl.rng import generator_for, rand

RATIO = (3 / 4, 4 / 3)  # aspect-ratio range (width / height) of RandomResizedCrop
ATTEMPTS = 10  # candidate boxes per sample before the centred fallback, as in torchvision
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random-resized-crop boxes, drawn as torchvision's ``RandomResizedCrop`` draws them, for a batch.

    Per sample, ``ATTEMPTS`` candidates: area uniform in ``scale * height * width``, aspect (w / h)
    log-uniform in ``ratio``. The first candidate that fits inside the image is kept and placed uniformly
    at random; a sample with no fitting candidate gets the largest centred box whose aspect is clamped
    to ``ratio``. Sides and corners are real numbers (not rounded to pixels).

    Returns boxes (batch, 4) float32 on ``device``: top, left, h, w in pixels, the image spanning
    [0, height] x [0, width].
    """
    u = rand((batch, ATTEMPTS, 2), device, generator)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()  # (B, ATTEMPTS)
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting candidate (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, narrowed to the nearest allowed aspect, centred
    in_ratio = width / height
    fallback_w, fallback_h = float(width), float(height)
    if in_ratio < min(ratio):
        fallback_h = width / min(ratio)
    elif in_ratio > max(ratio):
        fallback_w = height * max(ratio)
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    corner = rand((batch, 2), device, generator)
    corner = torch.where(found.unsqueeze(1), corner, 0.5)  # fallback boxes are centred
    top = corner[:, 0] * (height - h)
    left = corner[:, 1] * (width - w)
    return torch.stack([top, left, h, w], dim=1)


def crop_resize(
    images: Tensor,
    boxes: Tensor,
    out_size: int,
    flip: Tensor | None = None,
    mode: str = "bicubic",
) -> Tensor:
    """Crop every image to its own box and resize it to ``out_size`` x ``out_size`` in one ``grid_sample``.

    images (B, C, H, W) float; boxes (B, 4) top, left, h, w in pixels (as ``sample_crop_boxes``); flip
    (B,) bool mirrors the crop horizontally where True. Returns (B, C, out_size, out_size), images' dtype.
    Sampling points are pixel centres (``align_corners=False``, as ``F.interpolate``); taps outside the
    image repeat the border pixels. ``mode``: ``bilinear``, ``bicubic`` (may overshoot [0, 1]) or ``nearest``.
    """
    batch, channels, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(dim=1)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1]:
    # x_in = scale_x * x_out + centre_x, and likewise for y; a negative scale_x mirrors the crop.
    scale_x, scale_y = w / width, h / height
    centre_x, centre_y = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    if flip is not None:
        scale_x = torch.where(flip, -scale_x, scale_x)
    zero = torch.zeros_like(scale_x)
    theta = torch.stack(
        [torch.stack([scale_x, zero, centre_x], dim=1), torch.stack([zero, scale_y, centre_y], dim=1)], dim=1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, [batch, channels, out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def random_resized_crop_flip(
    images: Tensor,
    out_size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
    generator: torch.Generator | None = None,
    hflip: bool = True,
    mode: str = "bicubic",
) -> Tensor:
    """Batched RandomResizedCrop + RandomHorizontalFlip(p=0.5): one random box and coin per sample.

    images uint8 (B, C, h, w) -> float32 (B, C, out_size, out_size) in [0, 1], on images' device.
    Draws from ``generator`` (on images' device): the boxes first, then the B flip coins (if ``hflip``),
    so the same generator state gives the same boxes with and without flipping.
    """
    batch, _, height, width = images.shape
    boxes = sample_crop_boxes(batch, height, width, scale, ratio, generator, images.device)
    flip = rand((batch,), images.device, generator) < 0.5 if hflip else None
    return crop_resize(images.float() / 255, boxes, out_size, flip, mode).clamp_(0, 1)


def to_channels(images: Tensor, channels: int) -> Tensor:
    """(B, C, H, W) -> (B, channels, H, W): grey replicated to 3 channels, RGB to luminance grey."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.repeat(1, channels, 1, 1)
    weights = torch.tensor(GREY_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


class DeviceBatches:
    """Iterable of augmented training batches, sliced on the device from a device-resident uint8 tensor.

    Which samples each batch holds, and where an epoch's iteration starts, come from ``order`` (the
    ``TrainingOrder`` the DataLoader path uses too): its indices are copied to the device once per epoch.
    The crop boxes and flips of batch ``b`` of epoch ``e`` on rank ``r`` come from a generator seeded with
    ``mix(seed, e, r, b)``, so a run resumed mid-epoch draws the augmentations the uninterrupted run drew.

    Yields (images float32 (batch_size, channels, out_size, out_size) in [0, 1], labels int64
    (batch_size,)), on the device of ``images``.

    Args:
        images: uint8 (N, C, h, w), already on the target device.
        labels: int64 (N,) on the same device.
        order: the training order of this process over the N samples.
        out_size: output side in pixels.
        channels: output channels (grey is replicated to 3, RGB converted to grey).
        scale: crop-area range as a fraction of the image.
        hflip: random horizontal flip with p=0.5.
        resolution: progressive resolution: epoch ``e``'s batches are ``resolution.size(e)`` wide, not ``out_size``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        order: TrainingOrder,
        out_size: int,
        channels: int,
        scale: tuple[float, float],
        hflip: bool = True,
        resolution: ResolutionSchedule | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if order.size != len(images):
            raise ValueError(f"the training order covers {order.size} samples, but there are {len(images)} images")
        self.images, self.labels, self.order = images, labels, order
        self.out_size, self.channels, self.scale, self.hflip = out_size, channels, scale, hflip
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, first = self.order.start()
        size = self.out_size
        if self.resolution is not None:
            announce(self.resolution, epoch)
            size = self.resolution.size(epoch)
        device = self.images.device
        batches = self.order.batches(epoch)[first:].to(device)
        augment = generator_for(device)
        for b, index in enumerate(batches, start=first):
            augment.manual_seed(mix(self.order.seed, epoch, self.order.rank, b))
            images = random_resized_crop_flip(
                self.images.index_select(0, index), size, self.scale, RATIO, augment, self.hflip
            )
            yield to_channels(images, self.channels), self.labels.index_select(0, index)
