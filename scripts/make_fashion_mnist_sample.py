"""Regenerate advmim_pl/data/assets/fashion_mnist_sample.npz from the Fashion-MNIST IDX files.

The sample is class-balanced and picked without randomness: the first 400 images of each class in
the train file and the first 100 of each class in the t10k file, kept in file order. The arrays are
identical on every run (the zip's timestamps are not).

    python scripts/make_fashion_mnist_sample.py [--root /usr/share/datasets/fashion-mnist] [--out PATH]
"""

import argparse
from pathlib import Path

import numpy as np

from advmim_pl.data.fashion_mnist import DEFAULT_ROOT, SAMPLE_PATH, load_fashion_mnist

TRAIN_PER_CLASS = 400
VAL_PER_CLASS = 100
MAX_BYTES = 4_000_000


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Sorted indices of the first ``per_class`` samples of each class in labels (N,)."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def make_sample(root: str | Path = DEFAULT_ROOT) -> dict[str, np.ndarray]:
    """Sample arrays: train_images uint8 (4000, 28, 28), train_labels uint8 (4000,), val_* (1000, ...)."""
    arrays = {}
    for prefix, split, per_class in (("train", "train", TRAIN_PER_CLASS), ("val", "t10k", VAL_PER_CLASS)):
        images, labels = load_fashion_mnist(root, split)
        keep = first_per_class(labels, per_class)
        arrays[f"{prefix}_images"] = images[keep]
        arrays[f"{prefix}_labels"] = labels[keep]
    return arrays


def main() -> None:
    """Write the sample npz and check that it stays within 4 MB."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, default=SAMPLE_PATH, help="npz file to write")
    args = parser.parse_args()
    np.savez_compressed(args.out, **make_sample(args.root))
    size = args.out.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is {size} bytes, more than the {MAX_BYTES} allowed")
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
