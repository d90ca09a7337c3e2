"""Common corruptions (ImageNet-C style) applied on the fly to batches of images.

``corrupt(images, name, severity, generator)`` takes float images (B, C, H, W) in [0, 1] with C = 1 or 3, on
any device, and returns a corrupted batch of the same shape, dtype and device, clamped to [0, 1]. The input
range check reads the batch's min and max back to the host.

Severity parameters follow Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR 2019), i.e. the tables in ``make_imagenet_c.py`` of
github.com/hendrycks/robustness (``ImageNet-C/create_c``), written for 224 x 224 images; ``SEVERITY_PARAMETERS``
lists the values used. The one departure is ``elastic_transform``: the ImageNet-C table is not ordered by
strength (severities 1-2 move the corners of a random affine warp by up to 24 and 49 px, severities 3-5 by
5 px, plus a ~1-2 px elastic field), so its parameters come from ``imagecorruptions`` (Michaelis et al.,
"Benchmarking Robustness in Object Detection", 2019), which keeps the ImageNet-C elastic field, drops the
affine part and makes the displacement grow with severity.

Image size. Spatial parameters (blur sigmas, the defocus radius, the elastic displacement and its smoothness)
are given in pixels of a 224-px image and multiplied by ``s = min(H, W) / 224``, so that corrupting a small
image looks like corrupting a 224-px image and then downsampling it. The defocus disk averages the bilinear
interpolant of the image, so that radii below one pixel (3 * 32 / 224 = 0.43 px at severity 1 on 32-px
images) still blur. ``gaussian_blur`` uses torchvision's sampled Gaussian kernel, which for sigmas below about
0.5 px (severities 1-3 on 32-px images: 0.14, 0.29, 0.43 px) blurs less than the scaled-down 224-px blur, and
is nearly the identity at severities 1-2. Pixelate's factor is already relative to the image size; the
noises, contrast, brightness and JPEG need no scaling.

Randomness (the noises and the elastic field) is drawn only from ``generator``, on the generator's device,
and then moved to the images' device; ``generator=None`` uses the global RNG of the images' device.
"""

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from advmim_pl.rng import rand, randn

REFERENCE_SIZE = 224  # the image size the severity tables are written for

# Name -> the parameter of each severity 1..5, for 224-px images (make_imagenet_c.py unless noted).
SEVERITY_PARAMETERS: dict[str, tuple] = {
    # std of additive Gaussian noise
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    # photons per unit intensity: poisson(x * c) / c
    "shot_noise": (60, 25, 12, 5, 3),
    # fraction of values replaced by salt (1) or pepper (0), half each
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    # (disk radius px, sigma px of the anti-aliasing Gaussian)
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    # added to the V channel of HSV
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    # factor c in (x - mean) * c + mean
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    # alpha of imagecorruptions: displacement = alpha * gaussian(U(-1.12, 1.12), sigma=2.24 px), 224-px units
    "elastic_transform": (12.5, 16.25, 21.25, 25.0, 30.0),
    # side of the intermediate low-resolution image, as a fraction of the side
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    # JPEG quality
    "jpeg_compression": (25, 18, 15, 10, 7),
    # std of multiplicative Gaussian noise: x + x * N(0, c^2) (one of ImageNet-C's four extra corruptions)
    "speckle_noise": (0.15, 0.2, 0.35, 0.45, 0.6),
    # Gaussian blur sigma px (one of ImageNet-C's four extra corruptions)
    "gaussian_blur": (1, 2, 3, 4, 6),
}

CORRUPTIONS: tuple[str, ...] = tuple(SEVERITY_PARAMETERS)
SEVERITIES = (1, 2, 3, 4, 5)

ELASTIC_SIGMA = 2.24  # px at 224: smoothness of the elastic field (imagecorruptions: 0.01 * size)
ELASTIC_NOISE = 1.12  # px at 224: half-width of the uniform noise that is smoothed (0.005 * size)


# ----------------------------------------------------------------------------------------------- helpers


def _scale(x: Tensor) -> float:
    """Size of x (B, C, H, W) relative to the 224-px reference images."""
    return min(x.shape[-2:]) / REFERENCE_SIZE


def _gaussian_kernel_size(sigma: float, truncate: float, max_size: int) -> int:
    """Odd kernel size covering +-truncate * sigma, at most ``max_size`` (reflect padding needs pad < size)."""
    half = min(max(math.ceil(truncate * sigma), 1), max_size - 1)
    return 2 * half + 1


def defocus_kernel(radius: float, alias_sigma: float, supersample: int = 16) -> Tensor:
    """Normalised disk kernel (K, K) of ``radius`` px, softened by a Gaussian of ``alias_sigma`` px.

    ImageNet-C's ``disk`` marks the pixels whose centre lies in the disk, which degenerates to the identity for
    radii below one pixel (3 * 32 / 224 = 0.43 px at severity 1 on 32-px images). Here the kernel is the mean
    of the image's bilinear interpolant over the disk: the disk is filled with a ``supersample`` x
    ``supersample`` grid of points per pixel and each point spreads bilinear (tent) weights onto its four
    neighbouring pixels. For large radii this is the anti-aliased flat disk; for small ones a mild blur.
    K = 2 * (ceil(radius) + g) + 1 with g the half-width of the Gaussian; the kernel sums to 1 and is
    symmetric under flips and transposition.
    """
    g = max(math.ceil(3 * alias_sigma), 1)  # Gaussian half-width (ImageNet-C: 3 x 3)
    half = math.ceil(radius) + g
    step = 1 / supersample
    axis = torch.arange(-math.ceil(radius / step), math.ceil(radius / step) + 1, dtype=torch.float64) * step
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    inside = xs**2 + ys**2 <= radius**2
    xs, ys = xs[inside], ys[inside]  # (N,) points filling the disk
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)  # (K,)
    tent_x = (1 - (xs[:, None] - offsets).abs()).clamp(min=0)  # (N, K) bilinear weight of each column
    tent_y = (1 - (ys[:, None] - offsets).abs()).clamp(min=0)  # (N, K) and of each row
    disk = tent_y.T @ tent_x  # (K, K)

    taps = torch.arange(-g, g + 1, dtype=torch.float64)
    gauss = torch.exp(-(taps**2) / (2 * alias_sigma**2))
    gauss = gauss / gauss.sum()
    kernel = F.conv2d(disk[None, None], (gauss[:, None] * gauss[None, :])[None, None], padding=g)[0, 0]
    return (kernel / kernel.sum()).to(torch.float32)


# ------------------------------------------------------------------------------------------- corruptions
# Each takes x (B, C, H, W) float in [0, 1], the severity's parameter and a generator; the result is
# clamped by ``corrupt``.


def _gaussian_noise(x: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    return x + sigma * randn(x.shape, x.device, generator).to(x.dtype)


def _shot_noise(x: Tensor, photons: float, generator: torch.Generator | None) -> Tensor:
    rate = (x * photons).to(x.device if generator is None else generator.device)  # drawn where the generator is
    return torch.poisson(rate, generator=generator).to(x.device) / photons


def _impulse_noise(x: Tensor, amount: float, generator: torch.Generator | None) -> Tensor:
    # each value independently (channels too, as skimage's random_noise 's&p'): pepper with probability
    # amount / 2, salt with probability amount / 2
    u = rand(x.shape, x.device, generator).to(x.dtype)
    x = torch.where(u < amount / 2, 0.0, x)
    return torch.where((u >= amount / 2) & (u < amount), 1.0, x)


def _speckle_noise(x: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    return x + x * sigma * randn(x.shape, x.device, generator).to(x.dtype)


def _gaussian_blur(x: Tensor, sigma: float, generator: torch.Generator | None) -> Tensor:
    sigma = sigma * _scale(x)
    size = _gaussian_kernel_size(sigma, truncate=4.0, max_size=min(x.shape[-2:]))  # skimage truncates at 4
    return TF.gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def _defocus_blur(x: Tensor, radius_alias: tuple[float, float], generator: torch.Generator | None) -> Tensor:
    radius, alias_sigma = radius_alias
    kernel = defocus_kernel(radius * _scale(x), alias_sigma * _scale(x)).to(x.device, x.dtype)
    channels, pad = x.shape[1], kernel.shape[-1] // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"  # cv2.filter2D reflects (BORDER_REFLECT_101)
    x = F.pad(x, [pad, pad, pad, pad], mode=mode)
    return F.conv2d(x, kernel.expand(channels, 1, *kernel.shape), groups=channels)


def _brightness(x: Tensor, shift: float, generator: torch.Generator | None) -> Tensor:
    # HSV -> V + shift -> RGB without the round trip: with hue and saturation fixed every RGB channel is
    # proportional to V = max over channels, so the channels scale by V' / V (black, V = 0, becomes grey V').
    # For C = 1 this is intensity + shift.
    value = x.amax(dim=1, keepdim=True)
    new_value = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * (new_value / value), new_value)


def _contrast(x: Tensor, factor: float, generator: torch.Generator | None) -> Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)  # per image and channel, as ImageNet-C
    return (x - mean) * factor + mean


def _elastic_transform(x: Tensor, alpha: float, generator: torch.Generator | None) -> Tensor:
    # imagecorruptions' field, built at the 224-px reference scale (so it is equally smooth at any size) and
    # resized to H x W: alpha * gaussian(U(-1.12, 1.12), sigma=2.24, truncate=3), in reference px.
    b, _, h, w = x.shape
    s = _scale(x)
    ref_h, ref_w = round(h / s), round(w / s)
    noise = (2 * rand((b, 2, ref_h, ref_w), x.device, generator).to(x.dtype) - 1) * ELASTIC_NOISE
    size = _gaussian_kernel_size(ELASTIC_SIGMA, truncate=3.0, max_size=min(ref_h, ref_w))
    field = alpha * TF.gaussian_blur(noise, kernel_size=[size, size], sigma=[ELASTIC_SIGMA, ELASTIC_SIGMA])
    field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)  # (B, 2, H, W)
    # d reference px = d * s px here = 2 * d * s / W (or / H) in grid_sample's [-1, 1] coordinates
    displacement = torch.stack((field[:, 0] * (2 * s / w), field[:, 1] * (2 * s / h)), dim=-1)  # (B, H, W, 2)
    identity = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(b, 2, 3)
    grid = F.affine_grid(identity, [b, 1, h, w], align_corners=False) + displacement
    # torchvision's elastic() does the same grid_sample, but with one field for the whole batch and zero
    # padding; ImageNet-C draws a field per image and reflects at the border (map_coordinates mode='reflect').
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _block_average(size: int, blocks: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """For one axis of ``size`` pixels split into ``blocks`` <= size blocks: the (blocks, size) matrix that
    averages each block and the (size,) block index of each pixel (nearest-neighbour, pixel centres)."""
    index = ((torch.arange(size, device=x.device) + 0.5) * blocks / size).floor().long()
    members = F.one_hot(index, blocks).T.to(x.dtype)  # (blocks, size)
    return members / members.sum(dim=1, keepdim=True), index


def _pixelate(x: Tensor, factor: float, generator: torch.Generator | None) -> Tensor:
    # Down to int(factor * side) (as ImageNet-C) with a box filter, back up with nearest neighbour. Each box
    # covers exactly the pixels that nearest neighbour later fills from it, so blocks are 1/factor rounded down
    # or up pixels wide; for an integer 1/factor this is average pooling followed by nearest upsampling.
    # (Resizing with torch's "area" mode instead misaligns the boxes with the nearest-neighbour blocks for
    # fractional factors, which makes severity 1 (0.6) change the image more than severity 2 (0.5).)
    h, w = x.shape[-2:]
    rows, row_index = _block_average(h, max(int(h * factor), 1), x)
    cols, col_index = _block_average(w, max(int(w * factor), 1), x)
    small = rows @ x @ cols.T  # (B, C, h', w')
    return small[..., row_index, :][..., col_index]


def _jpeg_compression(x: Tensor, quality: int, generator: torch.Generator | None) -> Tensor:
    # torchvision's encoder works on uint8 (C, H, W) images with C = 1 or 3, on the CPU
    encoded = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return TF.jpeg(encoded, quality=quality).to(x.device, x.dtype) / 255


_FUNCTIONS: dict[str, Callable[[Tensor, object, torch.Generator | None], Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
}


# --------------------------------------------------------------------------------------------------- API


def _check(images: Tensor, name: str, severity: int) -> None:
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"severity must be an integer in {SEVERITIES[0]}..{SEVERITIES[-1]}, got {severity!r}")
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (B, C, H, W), got {shape}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.numel() > 0:
        low, high = (v.item() for v in images.aminmax())
        if not (low >= 0 and high <= 1):  # also catches NaN
            raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")


def corrupt(images: Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a batch.

    Args:
        images: (B, C, H, W) floating point in [0, 1], C = 1 or 3, any device.
        name: one of ``CORRUPTIONS``.
        severity: one of ``SEVERITIES`` (1 = mildest, 5 = strongest).
        generator: source of all randomness (noises, elastic field); may live on another device than the
            images, the draws are made there and moved. None uses the global RNG.

    Returns:
        (B, C, H, W) with the dtype and device of ``images``, clamped to [0, 1]. Computed in at least float32.

    Raises:
        ValueError: unknown name, severity outside 1..5, or images not (B, C, H, W) floats in [0, 1] with C = 1 or 3.
    """
    _check(images, name, severity)
    if images.numel() == 0:
        return images.clone()
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    out = _FUNCTIONS[name](x, SEVERITY_PARAMETERS[name][severity - 1], generator)
    return out.clamp(0, 1).to(images.dtype)
