"""The JPEGs ``input_pipeline.py`` reads: ImageNet-like files built once from the natural photographs shipped in
scikit-image and foolbox (``pip install -e '.[bench]'``), cached under ``.cache/input_pipeline`` (ignored by git).
"""

import importlib.util
import math
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from advmim_pl.data import jpeg as J

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "input_pipeline"
SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
SKIMAGE_PHOTOS += ["motorcycle_right.png", "hubble_deep_field.jpg"]


def package_data(package: str) -> Path:
    """The data folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install -e '.[bench]' (the benchmark's photographs)")
    return Path(spec.submodule_search_locations[0]) / "data"


def source_photos() -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) natural photographs: scikit-image's colour photographs and foolbox's ImageNet samples."""
    paths = [package_data("skimage") / name for name in SKIMAGE_PHOTOS]
    paths += sorted(package_data("foolbox").glob("imagenet_*.jpg"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def build_images(root: Path, count: int, classes: int = 10, seed: int = 0, width: int = 400, noise: float = 22) -> dict:
    """``count`` JPEGs in ``classes`` class folders under ``root``, with ImageNet-like statistics by default.

    Each is a random crop of a source photograph (35-100% of its area) at a random aspect (85% landscape
    w/h in [1.1, 1.6], 15% portrait in [0.65, 0.9]), resized (Lanczos) to a width of ``width`` x exp(N(0, 0.2)) px,
    given sensor-like Gaussian noise (sigma ``noise`` levels; at the default 22 the files are as large as ImageNet's:
    the sources are cleaner and smoother than ImageNet's photographs, and without it the files are half that size),
    and encoded at quality 75-95, half with 4:2:0 chroma subsampling and half 4:4:4. Returns the statistics of what
    it wrote.
    """
    sources = source_photos()
    rng = np.random.default_rng(seed)
    for i in range(count):
        source = sources[rng.integers(len(sources))]
        height, src_width = source.shape[:2]
        low, high = (1.1, 1.6) if rng.random() < 0.85 else (0.65, 0.9)  # landscape or portrait
        aspect = math.exp(rng.uniform(math.log(low), math.log(high)))
        area = rng.uniform(0.35, 1.0) * height * src_width
        ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if ch > height:
            ch, cw = height, round(height * aspect)
        if cw > src_width:
            ch, cw = round(src_width / aspect), src_width
        top, left = rng.integers(0, height - ch + 1), rng.integers(0, src_width - cw + 1)
        out_w = round(width * math.exp(rng.normal(0, 0.2)))
        out_h = round(out_w / aspect)
        crop = Image.fromarray(source[top : top + ch, left : left + cw]).resize(
            (out_w, out_h), Image.Resampling.LANCZOS
        )
        pixels = np.asarray(crop).astype(np.float32) + rng.normal(0, noise, (out_h, out_w, 3))
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.jpg"
        quality, subsampling = int(rng.integers(75, 96)), int(rng.choice([0, 2]))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality, subsampling=subsampling)
    return image_stats(root)


def image_stats(root: Path) -> dict:
    """Count, mean file size, bits per pixel and mean / range of the sides of the JPEGs under ``root``."""
    paths = sorted(root.glob("*/*.jpg"))
    sizes = [p.stat().st_size for p in paths]
    dims = np.array([J.jpeg_size(p.read_bytes()) for p in paths])
    aspects = dims[:, 1] / dims[:, 0]
    return {
        "images": len(paths),
        "classes": len({p.parent.name for p in paths}),
        "mean_kb": statistics.mean(sizes) / 1e3,
        "bits_per_pixel": float(8 * np.sum(sizes) / np.sum(dims[:, 0] * dims[:, 1])),
        "mean_height": float(dims[:, 0].mean()),
        "mean_width": float(dims[:, 1].mean()),
        "aspect_w_over_h_range": [float(aspects.min()), float(aspects.max())],
        "portrait_fraction": float((aspects < 1).mean()),
    }


def dataset_root(count: int, width: int = 400, noise: float = 22) -> Path:
    """The cached image folder of ``count`` images (``build_images``' ``width`` and ``noise``), built on first use."""
    root = CACHE / (f"train_{count}" if (width, noise) == (400, 22) else f"train_{count}_w{width}_noise{noise:g}")
    if not (root / "done").is_file():
        print(f"building {count} JPEGs under {root} ...", flush=True)
        build_images(root, count, width=width, noise=noise)
        (root / "done").write_text("complete\n")
    return root


def describe(stats: dict) -> str:
    """One line for a record: count, classes, mean sides, size, bits per pixel, aspects."""
    return (
        f"{stats['images']} JPEGs in {stats['classes']} classes, mean {stats['mean_width']:.0f} x "
        f"{stats['mean_height']:.0f} px (w x h), {stats['mean_kb']:.0f} KB ({stats['bits_per_pixel']:.1f} bits per "
        f"pixel), aspect w/h {stats['aspect_w_over_h_range'][0]:.2f} to {stats['aspect_w_over_h_range'][1]:.2f} "
        f"({100 * stats['portrait_fraction']:.0f}% portrait)"
    )
