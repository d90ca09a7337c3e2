"""Fashion-MNIST (28x28 grey, 10 classes) from IDX files, and the small sample bundled with the package."""

import gzip
from pathlib import Path

import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor

from advmim_pl.checks import require_positive
from advmim_pl.data.base import InMemoryDataModule

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
SAMPLE_PATH = Path(__file__).parent / "assets" / "fashion_mnist_sample.npz"
IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed if the name ends in .gz) of unsigned bytes.

    Images files give uint8 (N, 28, 28), label files uint8 (N,).
    """
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(np.frombuffer(data, dtype=">u4", count=ndim, offset=4).tolist())
    header = 4 + 4 * ndim
    if len(data) - header != np.prod(shape):
        raise ValueError(f"{path}: header says shape {shape} but holds {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_file(root: str | Path, name: str) -> Path | None:
    """Path of IDX file ``name`` (.gz or uncompressed) in root or torchvision's root/FashionMNIST/raw."""
    for folder in (Path(root), Path(root) / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def require_idx_file(root: str | Path, name: str) -> Path:
    """``find_idx_file``, or FileNotFoundError naming the path and how to get the data."""
    path = find_idx_file(root, name)
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST file {Path(root) / name}(.gz) not found. On Debian/Ubuntu install it with "
            "'apt-get install dataset-fashion-mnist' (root /usr/share/datasets/fashion-mnist), "
            "or set download: true to fetch it with torchvision."
        )
    return path


def load_fashion_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels uint8 (N,) of ``split`` ("train" or "t10k") under root."""
    images, labels = (read_idx(require_idx_file(root, name)) for name in IDX_NAMES[split])
    return images, labels


def as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
    """uint8 (N, H, W) and (N,) arrays -> copied uint8 (N, 1, H, W) and int64 (N,) tensors."""
    return torch.tensor(images).unsqueeze(1), torch.tensor(labels, dtype=torch.int64)


class _FashionMNISTModule(InMemoryDataModule):
    """Fashion-MNIST classes and statistics; subclasses choose where the arrays come from."""

    num_classes = 10
    dataset_mean = (0.2860,)
    dataset_std = (0.3530,)


class BundledSampleDataModule(_FashionMNISTModule):
    """Class-balanced Fashion-MNIST sample shipped with the package (no download needed).

    4000 train images (the first 400 of each class in the train file) and 1000 eval images (the first
    100 of each class in the t10k file), used for validation and test. Made by
    scripts/make_fashion_mnist_sample.py.
    """

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Sample images as uint8 (N, 1, 28, 28), labels int64 (N,)."""
        with np.load(SAMPLE_PATH) as sample:
            train = as_tensors(sample["train_images"], sample["train_labels"])
            val = as_tensors(sample["val_images"], sample["val_labels"])
        return *train, *val


class FashionMNISTDataModule(_FashionMNISTModule):
    """Full Fashion-MNIST: the train file (60000 images) for training, t10k (10000) for val and test.

    ``root`` holds the four IDX files (.gz or not), as installed by Debian's dataset-fashion-mnist
    package, or torchvision's FashionMNIST/raw folder. ``limit_train`` keeps only the first N training
    images, for quick runs.
    """

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        download: bool = False,
        limit_train: PositiveInt | None = None,
        **kwargs,
    ) -> None:
        """``kwargs``: the shared options of ``InMemoryDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        if limit_train is not None:
            require_positive(limit_train=limit_train)
        if not download:  # fail at configuration time, before any training starts
            for name in (name for split_names in IDX_NAMES.values() for name in split_names):
                require_idx_file(root, name)
        self.root = root
        self.download = download
        self.limit_train = limit_train

    def prepare_data(self) -> None:
        """Download the IDX files with torchvision if ``download`` is set and they are missing."""
        names = [name for split_names in IDX_NAMES.values() for name in split_names]
        if self.download and any(find_idx_file(self.root, name) is None for name in names):
            from torchvision.datasets import FashionMNIST

            FashionMNIST(self.root, download=True)

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images as uint8 (N, 1, 28, 28), labels int64 (N,); FileNotFoundError if files are missing."""
        train_images, train_labels = load_fashion_mnist(self.root, "train")
        train = as_tensors(train_images[: self.limit_train], train_labels[: self.limit_train])
        return *train, *as_tensors(*load_fashion_mnist(self.root, "t10k"))
