"""Corruption suite: contracts, growth with severity, and agreement with independent computations."""

import colorsys
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import advmim_pl
from advmim_pl.eval.corruptions import (
    CORRUPTIONS,
    ELASTIC_NOISE,
    ELASTIC_SIGMA,
    SEVERITIES,
    SEVERITY_PARAMETERS,
    corrupt,
    defocus_kernel,
)

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "elastic_transform")
FASHION_MNIST = Path(advmim_pl.__file__).parent / "data" / "assets" / "fashion_mnist_sample.npz"


def natural_images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth shading from sinusoids plus a few flat rectangles with sharp edges: (B, C, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    images = []
    for _ in range(batch):
        phase = torch.rand(3, generator=g) * 2 * math.pi
        columns = [torch.sin(2 * math.pi * (1.5 * xx + 0.3 * c) + phase[0]) for c in range(channels)]
        rows = torch.cos(2 * math.pi * 1.2 * yy + phase[1])
        waves = torch.sin(2 * math.pi * 3 * (xx + yy) + phase[2])
        image = 0.5 + 0.2 * torch.stack(columns) * rows + 0.1 * waves
        for _ in range(3):
            top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
            height, width = torch.randint(size // 8, size // 2, (2,), generator=g).tolist()
            image[:, top : top + height, left : left + width] = 0.1 + 0.8 * torch.rand(channels, 1, 1, generator=g)
        images.append(image)
    return torch.stack(images).clamp(0, 1)


def fashion_mnist(batch: int = 16) -> torch.Tensor:
    """The bundled Fashion-MNIST validation images: (B, 1, 28, 28) in [0, 1]."""
    with np.load(FASHION_MNIST) as data:
        return torch.from_numpy(data["val_images"][:batch]).float().div(255).unsqueeze(1)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_change(name: str, x: torch.Tensor, severity: int) -> float:
    return (corrupt(x, name, severity, seeded()) - x).abs().mean().item()


# ------------------------------------------------------------------------------------------ contracts


def test_names_severities_and_tables():
    required = {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "gaussian_blur",
        "defocus_blur",
        "contrast",
        "brightness",
        "jpeg_compression",
        "pixelate",
        "elastic_transform",
    }
    assert required <= set(CORRUPTIONS)
    assert len(set(CORRUPTIONS)) == len(CORRUPTIONS)
    assert SEVERITIES == (1, 2, 3, 4, 5)
    assert all(len(SEVERITY_PARAMETERS[name]) == 5 for name in CORRUPTIONS)
    # spot checks against make_imagenet_c.py
    assert SEVERITY_PARAMETERS["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert SEVERITY_PARAMETERS["defocus_blur"][4] == (10, 0.5)
    assert SEVERITY_PARAMETERS["jpeg_compression"] == (25, 18, 15, 10, 7)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_range(name):
    for channels in (1, 3):
        for size in (32, 64):
            x = natural_images(2, channels, size)
            x[0, :, :4, :4] = 0.0  # exact extremes must stay legal
            x[1, :, -4:, -4:] = 1.0
            clean = x.clone()
            for severity in SEVERITIES:
                y = corrupt(x, name, severity, seeded(severity))
                assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
                assert torch.isfinite(y).all()
                assert y.min() >= 0 and y.max() <= 1
            assert torch.equal(x, clean), "input modified in place"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_other_sizes_and_dtypes(name):
    for shape in [(1, 3, 224, 224), (2, 1, 28, 28), (2, 3, 32, 48)]:
        x = natural_images(shape[0], shape[1], max(shape[-2:]))[..., : shape[2], : shape[3]]
        y = corrupt(x, name, 5, seeded())
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    x = natural_images(2, 3, 32)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        y = corrupt(x.to(dtype), name, 3, seeded())
        assert y.dtype == dtype and y.shape == x.shape
        assert 0 <= y.min() and y.max() <= 1
    empty = torch.zeros(0, 3, 32, 32)
    assert corrupt(empty, name, 1).shape == empty.shape


# ------------------------------------------------------------------------------ growth with severity


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("images", ["smooth_rgb_32", "smooth_grey_64", "fashion_mnist_28"])
def test_change_grows_with_severity(name, images):
    x = {
        "smooth_rgb_32": lambda: natural_images(8, 3, 32),
        "smooth_grey_64": lambda: natural_images(4, 1, 64),
        "fashion_mnist_28": fashion_mnist,
    }[images]()
    change = [mean_change(name, x, severity) for severity in SEVERITIES]
    assert change[-1] > 1.2 * change[0] and change[-1] > 1e-3, change
    for weaker, stronger in zip(change, change[1:], strict=False):
        assert stronger >= weaker - 1e-3, change


@pytest.mark.parametrize(
    "name, severity",
    [
        ("gaussian_blur", 5),
        ("defocus_blur", 3),
        ("defocus_blur", 5),
        ("elastic_transform", 3),
        ("elastic_transform", 5),
    ],
)
def test_spatial_strength_scales_with_image_size(name, severity):
    # the same scene at 32 and 64 px changes by about the same amount: spatial parameters scale with the size.
    # (Not gaussian_blur below severity 5: at 32 px its sigmas, 0.14 to 0.57 px, are too narrow for a sampled
    # Gaussian kernel, which then blurs less than the downscaled 224-px blur would.)
    small, large = natural_images(4, 3, 32), natural_images(4, 3, 64)
    ratio = mean_change(name, small, severity) / mean_change(name, large, severity)
    assert 0.75 < ratio < 1.33


# ------------------------------------------------------------------------- independent computations


def test_gaussian_noise_std_matches_sigma():
    grey = torch.full((4, 3, 64, 64), 0.5)
    rng = np.random.default_rng(0)
    for severity, sigma in zip(SEVERITIES, (0.08, 0.12, 0.18, 0.26, 0.38), strict=True):
        noise = corrupt(grey, "gaussian_noise", severity, seeded(severity)) - grey
        assert abs(noise.mean().item()) < 0.01
        if severity <= 2:  # 0.5 is more than 4 sigma from 0 and 1: clipping is negligible
            assert noise.std().item() == pytest.approx(sigma, rel=0.03)
        clipped = np.clip(0.5 + sigma * rng.standard_normal(1_000_000), 0, 1) - 0.5
        assert noise.std().item() == pytest.approx(clipped.std(), rel=0.03)


def test_shot_noise_is_poisson():
    grey = torch.full((4, 3, 64, 64), 0.5)
    for severity, photons in zip(SEVERITIES, (60, 25, 12, 5, 3), strict=True):
        y = corrupt(grey, "shot_noise", severity, seeded(severity))
        counts = y * photons
        assert torch.allclose(counts, counts.round(), atol=1e-4)  # multiples of 1 / photons
        if severity <= 2:  # unclipped: mean x, variance x / photons
            assert y.mean().item() == pytest.approx(0.5, abs=0.005)
            assert y.var().item() == pytest.approx(0.5 / photons, rel=0.05)


def test_impulse_noise_salt_and_pepper_fractions():
    grey = torch.full((4, 3, 64, 64), 0.5)
    for severity, amount in zip(SEVERITIES, (0.03, 0.06, 0.09, 0.17, 0.27), strict=True):
        y = corrupt(grey, "impulse_noise", severity, seeded(severity))
        salt, pepper = (y == 1).float().mean().item(), (y == 0).float().mean().item()
        assert salt == pytest.approx(amount / 2, rel=0.1)
        assert pepper == pytest.approx(amount / 2, rel=0.1)
        assert torch.all((y == 0) | (y == 1) | (y == 0.5))


def test_contrast_formula():
    x = natural_images(3, 3, 32)
    for severity, factor in zip(SEVERITIES, (0.4, 0.3, 0.2, 0.1, 0.05), strict=True):
        mean = x.mean(dim=(2, 3), keepdim=True)
        torch.testing.assert_close(corrupt(x, "contrast", severity), (x - mean) * factor + mean)


def test_brightness_on_grey_and_against_hsv():
    for severity, shift in zip(SEVERITIES, (0.1, 0.2, 0.3, 0.4, 0.5), strict=True):
        for channels in (1, 3):
            for level in (0.0, 0.4, 0.7):
                grey = torch.full((2, channels, 8, 8), level)
                expected = torch.full_like(grey, min(level + shift, 1.0))
                torch.testing.assert_close(corrupt(grey, "brightness", severity), expected)
    # colour pixels: V channel of HSV + shift (stdlib colorsys, as skimage's rgb2hsv / hsv2rgb)
    x = torch.rand(1, 3, 4, 4, generator=seeded())
    for severity, shift in zip(SEVERITIES, (0.1, 0.2, 0.3, 0.4, 0.5), strict=True):
        y = corrupt(x, "brightness", severity)
        for i in range(4):
            for j in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
                expected = colorsys.hsv_to_rgb(h, s, min(v + shift, 1.0))
                assert y[0, :, i, j].tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("size", [32, 64])
def test_pixelate_is_average_pooling_then_nearest_for_exact_factors(size):
    x = natural_images(2, 3, size)
    for severity, factor in ((2, 2), (5, 4)):  # side fractions 0.5 and 0.25
        expected = F.avg_pool2d(x, factor).repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
        torch.testing.assert_close(corrupt(x, "pixelate", severity), expected)


def test_pixelate_fractional_factor_gives_flat_blocks():
    x = natural_images(1, 1, 32)
    y = corrupt(x, "pixelate", 1)[0, 0]  # 0.6: 19 blocks of 1 or 2 pixels per axis
    assert len(torch.unique_consecutive(y[:, 0])) <= 19
    assert len(torch.unique_consecutive(y[0, :])) <= 19
    assert y.mean().item() == pytest.approx(x.mean().item(), abs=1e-5)  # each block keeps its mean


@pytest.mark.parametrize("radius_alias", [(3, 0.1), (10, 0.5), (0.43, 0.014), (1.43, 0.07)])
def test_defocus_kernel_normalised_and_radially_symmetric(radius_alias):
    radius, alias = radius_alias
    k = defocus_kernel(radius, alias)
    size = k.shape[-1]
    assert k.shape == (size, size) and size % 2 == 1
    assert k.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (k >= 0).all()
    for symmetric in (k.flip(0), k.flip(1), k.T):
        torch.testing.assert_close(k, symmetric)
    # radial profile: never increases outward, and vanishes beyond radius + 1 px + 3 alias sigmas
    c = size // 2
    profile = k[c, c:]
    assert (profile[1:] <= profile[:-1] + 1e-7).all()
    yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    distance = (yy**2 + xx**2).float().sqrt()
    assert k[distance > radius + 1 + 3 * alias + 1].sum().item() < 1e-6


def test_defocus_kernel_is_flat_inside_a_large_disk():
    k = defocus_kernel(10, 0.5)
    c = k.shape[-1] // 2
    plateau = k[c, c].item()
    assert plateau == pytest.approx(1 / (math.pi * 100), rel=0.02)  # mass 1 spread over the disk's area
    # equal, whatever the direction, for pixels whose 1 px tent + 3 alias sigmas lie inside the disk
    for dy, dx in ((0, 5), (3, 4), (5, 0), (4, 4), (-2, 6)):
        assert k[c + dy, c + dx].item() == pytest.approx(plateau, rel=1e-3)


def test_defocus_blur_is_convolution_with_the_kernel():
    x = natural_images(2, 3, 224)
    radius, alias = SEVERITY_PARAMETERS["defocus_blur"][2]
    k = defocus_kernel(radius, alias)  # 224 px: no scaling
    pad = k.shape[-1] // 2
    expected = F.conv2d(x, k.expand(3, 1, *k.shape), groups=3)  # interior only
    torch.testing.assert_close(corrupt(x, "defocus_blur", 3)[..., pad:-pad, pad:-pad], expected.clamp(0, 1))


@pytest.mark.parametrize("size", [224, 64])
def test_gaussian_blur_spreads_a_point_by_sigma(size):
    x = torch.zeros(1, 1, size, size)
    x[..., size // 2, size // 2] = 1.0
    for severity, sigma in zip(SEVERITIES, (1, 2, 3, 4, 6), strict=True):
        expected_sigma = sigma * size / 224
        if expected_sigma < 0.5:  # too narrow to measure on the pixel grid
            continue
        y = corrupt(x, "gaussian_blur", severity)[0, 0].double()
        assert y.sum().item() == pytest.approx(1.0, abs=1e-4)
        offsets = torch.arange(size, dtype=torch.float64) - size // 2
        variance_x = (y.sum(0) * offsets**2).sum().item()
        assert math.sqrt(variance_x) == pytest.approx(expected_sigma, rel=0.03)


@pytest.mark.parametrize("size", [224, 64])
def test_elastic_displacement_std(size):
    # on a ramp, bilinear resampling reads the displacement directly: (out - in) * size = dx in pixels
    ramp = ((torch.arange(size) + 0.5) / size).expand(4, 1, size, size).contiguous()
    taps = np.arange(-7, 8)  # gaussian(sigma=2.24, truncate=3) as skimage samples it
    kernel = np.exp(-(taps**2) / (2 * ELASTIC_SIGMA**2))
    kernel /= kernel.sum()
    field_std = ELASTIC_NOISE / math.sqrt(3) * (kernel**2).sum()  # 2-D: (sum of 1-D squares) ** 2, then sqrt
    margin = size // 8
    for severity in (1, 5):
        alpha = SEVERITY_PARAMETERS["elastic_transform"][severity - 1]
        for image, axis_size in ((ramp, size), (ramp.transpose(2, 3), size)):
            y = corrupt(image, "elastic_transform", severity, seeded(severity))
            dx = ((y - image) * axis_size)[..., margin:-margin, margin:-margin]
            assert dx.mean().abs().item() < 0.1 * alpha * field_std * size / 224 + 0.02
            assert dx.std().item() == pytest.approx(alpha * field_std * size / 224, rel=0.12)


def test_elastic_keeps_a_constant_image():
    x = torch.full((2, 3, 32, 32), 0.3)
    torch.testing.assert_close(corrupt(x, "elastic_transform", 5, seeded()), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_pil(channels):
    x = (natural_images(2, channels, 32) * 255).round() / 255
    for severity, quality in zip(SEVERITIES, (25, 18, 15, 10, 7), strict=True):
        y = corrupt(x, "jpeg_compression", severity)
        for b in range(2):
            pixels = (x[b] * 255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
            decoded = np.array(Image.open(buffer), dtype=np.float32) / 255
            expected = torch.from_numpy(decoded).reshape(32, 32, channels).permute(2, 0, 1)
            assert (y[b] - expected).abs().max().item() <= 2 / 255 + 1e-6


# ------------------------------------------------------------------------------------------ randomness


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seeded_generator_is_deterministic(name):
    x = natural_images(2, 3, 32)
    a, b = corrupt(x, name, 3, seeded(7)), corrupt(x, name, 3, seeded(7))
    assert torch.equal(a, b)
    c = corrupt(x, name, 3, seeded(8))
    if name in RANDOM:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


def test_global_rng_when_no_generator():
    x = natural_images(2, 3, 32)
    torch.manual_seed(3)
    a = corrupt(x, "gaussian_noise", 2)
    torch.manual_seed(3)
    b = corrupt(x, "gaussian_noise", 2)
    c = corrupt(x, "gaussian_noise", 2)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_images_in_a_batch_get_independent_noise():
    x = natural_images(1, 3, 32).expand(2, -1, -1, -1)
    for name in RANDOM:
        y = corrupt(x, name, 5, seeded())
        assert not torch.equal(y[0], y[1]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_cuda_images_with_cpu_generator_match_cpu(name):
    x = natural_images(2, 3, 32)
    cpu = corrupt(x, name, 3, seeded(1))
    cuda = corrupt(x.cuda(), name, 3, seeded(1))
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=2e-2 if name == "jpeg_compression" else 1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'fog'") as info:
        corrupt(natural_images(1, 3, 32), "fog", 1)
    assert all(name in str(info.value) for name in CORRUPTIONS)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, True, "3"])
def test_bad_severity(severity):
    with pytest.raises(ValueError, match=r"1\.\.5") as info:
        corrupt(natural_images(1, 3, 32), "contrast", severity)
    assert repr(severity) in str(info.value)


@pytest.mark.parametrize("value", [1.5, -0.25, float("nan")])
def test_out_of_range_images(value):
    x = natural_images(1, 3, 32)
    x[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        corrupt(x, "contrast", 1)
    assert f"{value:.4g}" in str(info.value)


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.rand(3, 32, 32), r"\(3, 32, 32\)"),
        (torch.rand(1, 1, 3, 32, 32), r"\(1, 1, 3, 32, 32\)"),
        (torch.rand(1, 2, 32, 32), "got 2"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "torch.uint8"),
    ],
)
def test_bad_image_shapes_and_dtypes(images, message):
    with pytest.raises(ValueError, match=message):
        corrupt(images, "contrast", 1)
