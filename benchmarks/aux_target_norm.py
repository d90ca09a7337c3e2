"""How each auxiliary-target normalisation treats an eps-sized perturbation, measured on Fashion-MNIST.

MAE's per-patch normalisation divides each target patch by its own standard deviation. On a flat patch
(background, sky) an eps-sized perturbation then becomes unit-variance noise in the target. For each
candidate (``PretrainModule(aux_target_norm=..., aux_norm_floor=...)``) this prints:

- ``noise``: the MSE between the normalised targets of x + delta and of x, with delta a random +-eps sign
  pattern projected onto [0, 1]. It is the loss a model pays for a perturbation it cannot predict. Shown
  for flat patches (clean std < 1e-3), for the rest, and for all patches.
- ``distortion``: the MSE between the candidate's normalised clean target and MAE's, on non-flat patches:
  how far the floor moves the clean task away from MAE's target.
- ``sum``: noise on all patches plus distortion, both in the units of the normalised target. The library's
  default (``aux_target_norm: floor``, ``aux_norm_floor: 2``) is the candidate with the smallest sum.

    python benchmarks/aux_target_norm.py [--images 10000] [--eps 4] [--out benchmarks/results/aux_target_norm.md]
"""

import argparse
from pathlib import Path

import torch
from torch.nn import functional as F

from advmim_pl.adversarial.attack import random_sign
from advmim_pl.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from advmim_pl.mim.losses import normalize_patches, patchify

FLAT_STD = 1e-3
FLOORS = (1.0, 2.0, 4.0, 8.0)


def candidates(eps: float) -> list[tuple[str, float, bool]]:
    """(name, variance floor, statistics from the clean patch) for every normalisation measured."""
    rows = [("patch (MAE)", 0.0, False), ("clean, no floor", 0.0, True)]
    rows += [(f"floor {k:g} eps", (k * eps) ** 2, False) for k in FLOORS]
    rows += [(f"clean, floor {k:g} eps", (k * eps) ** 2, True) for k in FLOORS]
    return rows


def measure(images: torch.Tensor, eps: float, patch: int = 4) -> list[dict]:
    """images (N, 1, H, W) in [0, 1] -> one row of figures per candidate."""
    x_adv = random_sign(images, eps, torch.Generator().manual_seed(0))
    clean, adv = patchify(images, patch), patchify(x_adv, patch)
    flat = clean.std(dim=-1) < FLAT_STD  # (N, L)
    reference = normalize_patches(clean)
    rows = []
    for name, floor, from_clean in candidates(eps):
        target_clean = normalize_patches(clean, floor, clean if from_clean else None)
        target_adv = normalize_patches(adv, floor, clean if from_clean else None)
        noise = (target_adv - target_clean).pow(2).mean(dim=-1)
        distortion = (target_clean - reference).pow(2).mean(dim=-1)
        rows.append(
            {
                "candidate": name,
                "noise_flat": noise[flat].mean().item(),
                "noise_textured": noise[~flat].mean().item(),
                "noise_all": noise.mean().item(),
                "distortion": distortion[~flat].mean().item(),
            }
        )
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| candidate | noise, flat patches | noise, other patches | noise, all | distortion of clean target | sum |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['candidate']} | {r['noise_flat']:.4f} | {r['noise_textured']:.4f} | {r['noise_all']:.4f} | "
            f"{r['distortion']:.4f} | {r['noise_all'] + r['distortion']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="Fashion-MNIST train images to measure on")
    parser.add_argument("--eps", type=float, default=4.0, help="budget in 1/255 units")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()
    images, _ = load_fashion_mnist(args.root, "train")
    x = torch.tensor(images[: args.images]).unsqueeze(1).float().div(255)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)  # the 32-px configs
    eps = args.eps / 255
    rows = measure(x, eps)
    flat_share = (patchify(x, 4).std(dim=-1) < FLAT_STD).float().mean().item()
    text = table(
        rows,
        f"Fashion-MNIST train, first {len(x)} images at 32 px, 4-px patches ({flat_share:.0%} of them flat), "
        f"delta = random +-{args.eps:g}/255 signs projected onto [0, 1].",
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
