"""ImageFolder-style image data (root/class_x/img.jpg), e.g. ImageNet, tolerant of corrupt files."""

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from advmim_pl.data.base import ImageDataModule

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_image_root(root: str, arg: str) -> list[str]:
    """Class names (sorted subfolders) of an ImageFolder root; FileNotFoundError explaining the layout."""
    if not Path(root).is_dir():
        raise FileNotFoundError(
            f"{arg} {root!r} is not a directory. Expected one subfolder per class holding its images, "
            f"e.g. {root}/class_x/img1.jpg and {root}/class_y/img2.png. For ImageNet, download "
            "ILSVRC2012 from https://image-net.org (registration required) and arrange train/ and val/ "
            "into class (synset) subfolders."
        )
    return find_classes(root)[0]


class SkipCorruptImageFolder(ImageFolder):
    """torchvision ImageFolder that skips image files PIL cannot decode; items (image, class index).

    Files are checked lazily, when loaded: a file raising OSError (truncated data; PIL's
    UnidentifiedImageError is one) or SyntaxError (malformed headers) is flagged, reported with a
    warning naming it, and replaced by the next readable sample (index + 1, wrapping around), so an
    epoch keeps its length and batches their shapes. Checking every file up front would cost a full
    decode pass over the dataset. The flags live in a shared-memory tensor, so ``num_corrupt`` counts
    each bad file once across DataLoader worker processes, and a flagged file is not read again.
    """

    def __init__(self, root: str, transform: Callable | None = None) -> None:
        super().__init__(root, transform=transform)
        self.corrupt = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    @property
    def num_corrupt(self) -> int:
        """Number of distinct files found unreadable so far, by any process."""
        return int(self.corrupt.sum())

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """(transformed image, class index) of sample ``index``, or of the next readable one."""
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if self.corrupt[i]:
                continue
            path, target = self.samples[i]
            try:
                image = self.loader(path)
            except (OSError, SyntaxError) as err:
                # Two workers failing on the same file at the same moment may both warn; the count is exact.
                if not self.corrupt[i]:
                    self.corrupt[i] = True
                    warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=1)
                continue
            return (self.transform(image) if self.transform else image), target
        raise RuntimeError(f"no readable image under {self.root}")


class ImageFolderDataModule(ImageDataModule):
    """Images in class subfolders (train_root/class_x/img.jpg), e.g. ImageNet, with ImageNet statistics.

    ``num_classes`` is the number of class folders in ``train_root``. ``val_root``, if given, must have
    the same class folders and serves validation and test; without it there is no validation (empty
    val/test loaders). Unreadable files are skipped, see SkipCorruptImageFolder.
    """

    dataset_mean = IMAGENET_MEAN
    dataset_std = IMAGENET_STD

    def __init__(
        self,
        train_root: str,
        val_root: str | None = None,
        **kwargs,
    ) -> None:
        """``kwargs``: the shared options of ``ImageDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        classes = check_image_root(train_root, "train_root")
        if val_root is not None:
            val_classes = check_image_root(val_root, "val_root")
            if val_classes != classes:
                raise ValueError(
                    f"val_root {val_root!r} must have the same class folders as train_root {train_root!r}: "
                    f"missing {sorted(set(classes) - set(val_classes))}, "
                    f"extra {sorted(set(val_classes) - set(classes))}"
                )
        self.train_root = train_root
        self.val_root = val_root
        self.num_classes = len(classes)

    def setup(self, stage: str | None = None) -> None:
        """Scan the folders once (this lists every file, which takes a while for ImageNet)."""
        if self.train_set is not None:
            return
        self.train_set = SkipCorruptImageFolder(self.train_root, self.train_transform())
        if self.val_root is not None:
            self.val_set = SkipCorruptImageFolder(self.val_root, self.eval_transform())
            self.test_set = self.val_set

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order, or [] (no validation) without val_root."""
        return super().val_dataloader() if self.val_root is not None else []

    def test_dataloader(self) -> DataLoader | list:
        """Test batches (the val_root images) in order, or [] without val_root."""
        return super().test_dataloader() if self.val_root is not None else []
