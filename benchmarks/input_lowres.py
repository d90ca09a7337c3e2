"""The input pipeline at the progressive-resolution sizes: the GPU rates a data path has to keep up with at each
side, and whether reducing the JPEG decode further (DCT factors 4 and 8) pays there. Used by ``input_pipeline.py``.
"""

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from advmim_pl.data import jpeg as J

# Published training rates of the reference MAE implementation on one H200 (docs/method.md: ViT-B/16, 224 px,
# batch 256, bf16; AEMIM: PGD 1 step, attack_mask same, auxiliary branch), images/s
PUBLISHED_H200 = {"MAE eager": 3543, "MAE compiled": 4853, "MAE+AEMIM": 1448}
# An H100 at the device check's planning figure: the H200's 256-image MAE step (72 ms) taken as 85 ms on the H100's
# lower memory bandwidth (benchmarks/README.md, device_check.sh part 2)
H100_SCALE = (256 / PUBLISHED_H200["MAE eager"]) / 0.085
PATCH, FULL = 16, 224


def tokens(size: int, patch: int = PATCH) -> int:
    """Patch tokens of a size x size image."""
    return (size // patch) ** 2


def measured_rates(files: list[str]) -> dict[tuple[str, int], tuple[float, str]]:
    """(anchor name, img_size) -> (images/s, device) from ``throughput.py`` JSON records (the device check's):
    its ``MAE`` configuration is ``MAE eager`` or ``MAE compiled`` by the record's compile flag, ``MAE+AEMIM PGD-1``
    eager is ``MAE+AEMIM``; other configurations are not anchors."""
    rates = {}
    for file in files:
        record = json.loads(Path(file).read_text())
        setup, compiled = record["setup"], record["setup"]["compile"]
        names = {
            "MAE": "MAE compiled" if compiled else "MAE eager",
            "MAE+AEMIM PGD-1": None if compiled else "MAE+AEMIM",
        }
        for config, result in record["results"].items():
            if names.get(config) and result.get("images_per_s"):
                rates[(names[config], int(setup["img_size"]))] = (float(result["images_per_s"]), record["device"])
    return rates


def gpu_rates(sizes: list[int], files: list[str]) -> dict[str, dict[str, dict]]:
    """anchor -> str(size) -> {"images_per_s", "source"}: one GPU's training rate at each side.

    A rate measured at that side (``files``: ``throughput.py`` records) is taken as it is. Otherwise the rate at
    224 px (measured, or the published H200 rate x ``H100_SCALE``) is scaled by the token count, 196 / tokens(size):
    a step's cost taken as linear in the tokens. Attention's quadratic term would make a low-resolution step cheaper
    still (more images/s to feed), a GPU running less efficiently at fewer tokens a little dearer.
    """
    measured = measured_rates(files)
    out: dict[str, dict[str, dict]] = {}
    for anchor, published in PUBLISHED_H200.items():
        for size in sizes:
            scale = tokens(FULL) / tokens(size)
            if (anchor, size) in measured:
                rate, device = measured[(anchor, size)]
                source = f"measured ({device})"
            elif (anchor, FULL) in measured:
                base, device = measured[(anchor, FULL)]
                rate, source = base * scale, f"measured at {FULL} px ({device}) x {scale:.2f} (tokens)"
            else:
                rate = published * H100_SCALE * scale
                source = f"published H200 {published:,} x {H100_SCALE:.2f} (H100) x {scale:.2f} (tokens)"
            out.setdefault(anchor, {})[str(size)] = {"images_per_s": rate, "source": source}
    return out


Rule = Callable[[int, int, int], int]  # (box_h, box_w, out_size) -> decode factor


def margin_rule(margin: float, factors: tuple[int, ...]) -> Rule:
    """decode_factor's rule with another margin: the largest of ``factors`` leaving margin x out_size pixels."""
    return lambda h, w, out: next((f for f in sorted(factors, reverse=True) if min(h, w) >= margin * f * out), 1)


RULES: dict[str, Rule] = {
    "full decode": lambda h, w, out: 1,
    "1-2, 2x margin (before)": margin_rule(2, (2,)),
    "1-8, 2x margin (decode_factor)": J.decode_factor,
    "1-8, 1x margin": margin_rule(1, (2, 4, 8)),
}


def decode_scale(images: list[bytes], sizes: list[int], rounds: int, seed: int = 0) -> dict[str, dict[str, dict]]:
    """str(size) -> rule -> figures of the fast path's decode + crop-resize (no flip) under each ``RULES`` rule.

    The same crop box per image and size under every rule (seeded). Figures: ``ms_per_image`` (decode and resize
    only: per image the least of ``rounds`` timings, averaged over ``images``), ``factor_share`` (the fraction of crops
    decoded at each factor), ``mean_abs_error`` and ``p95_abs_error`` (per image, levels of 255, against the same
    box resized from a full decode).
    """
    boxes = {}
    for size in sizes:
        generator = torch.Generator().manual_seed(seed + size)
        boxes[size] = []
        for data in images:
            height, width = J.jpeg_size(data)
            boxes[size].append((J.crop_box(height, width, (0.2, 1.0), generator=generator), (height, width)))
    errors: dict[tuple[int, str], list[float]] = {}
    for i, data in enumerate(images):
        full = J.decode_reduced(data, 1, 3, "simplejpeg")
        reduced = {1: full}
        for size in sizes:
            box, shape = boxes[size][i]
            ref = J.resized_crop(full, box, shape, size, False).float()
            for name, rule in RULES.items():
                factor = rule(box[2], box[3], size)
                if factor not in reduced:
                    reduced[factor] = J.decode_reduced(data, factor, 3, "simplejpeg")
                got = J.resized_crop(reduced[factor], box, shape, size, False).float()
                errors.setdefault((size, name), []).append((got - ref).abs().mean().item())
    factors = {
        (size, name): [rule(b[2], b[3], size) for b, _ in boxes[size]] for size in sizes for name, rule in RULES.items()
    }
    # seconds per (size, rule) and image: the least of the rounds; the rules follow each other image by image, so
    # that another process's busy spell slows them alike, and the least of the rounds drops most of those spells
    best = {key: [math.inf] * len(images) for key in factors}
    for _ in range(rounds):
        for i, data in enumerate(images):
            for (size, name), chosen in factors.items():
                box, shape = boxes[size][i]
                start = time.perf_counter()
                J.resized_crop(J.decode_reduced(data, chosen[i], 3, "simplejpeg"), box, shape, size, False)
                best[(size, name)][i] = min(best[(size, name)][i], time.perf_counter() - start)
    out: dict[str, dict[str, dict]] = {}
    for (size, name), chosen in factors.items():
        err = errors[(size, name)]
        out.setdefault(str(size), {})[name] = {
            "ms_per_image": 1e3 * statistics.mean(best[(size, name)]),
            "factor_share": {str(f): chosen.count(f) / len(chosen) for f in (1, 2, 4, 8)},
            "mean_abs_error": statistics.mean(err),
            "p95_abs_error": float(np.percentile(err, 95)),
        }
    return out
