"""ImageFolder-style image data (root/class_x/img.jpg), e.g. ImageNet, tolerant of corrupt files."""

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from advmim_pl.data.base import MapStyleDataModule
from advmim_pl.data.jpeg import JpegCropFlip
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD

T = TypeVar("T")


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


def check_class_folders(root: str, classes: list[str], arg: str) -> None:
    """FileNotFoundError naming the first class folder of ``root`` that holds no image file."""
    for name in classes:
        with os.scandir(Path(root, name)) as entries:  # stops at the first image: cheap even for ImageNet
            if not any(e.name.lower().endswith(IMG_EXTENSIONS) for e in entries):
                raise FileNotFoundError(
                    f"{arg} {root!r}: class folder {name!r} holds no image file "
                    f"(extensions {', '.join(IMG_EXTENSIONS)})"
                )


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
        return first_readable(index, self.corrupt, self._load, lambda i: self.samples[i][0], self.root)

    def _load(self, i: int) -> tuple[Any, int]:
        path, target = self.samples[i]
        if isinstance(self.transform, JpegCropFlip):  # the fast path reads and decodes the file itself
            return self.transform(path), target
        image = self.loader(path)
        return (self.transform(image) if self.transform else image), target


def first_readable(index: int, corrupt: Tensor, load: Callable[[int], T], name: Callable[[int], str], where: str) -> T:
    """``load(i)`` of the first sample from ``index`` on (wrapping around) that is not flagged in ``corrupt`` and
    loads; a sample whose ``load`` raises OSError (PIL's UnidentifiedImageError is one) or SyntaxError is flagged
    in ``corrupt`` (bool (N,), shared memory: one count across DataLoader workers) with a warning naming it
    (``name(i)``). Two workers failing on the same sample at the same moment may both warn; the count is exact."""
    for offset in range(len(corrupt)):
        i = (index + offset) % len(corrupt)
        if corrupt[i]:
            continue
        try:
            return load(i)
        except (OSError, SyntaxError) as err:
            if not corrupt[i]:
                corrupt[i] = True
                warnings.warn(f"skipping unreadable image {name(i)}: {err}", stacklevel=3)
    raise RuntimeError(f"no readable image under {where}")


class ImageFolderDataModule(MapStyleDataModule):
    """Images in class subfolders (train_root/class_x/img.jpg), e.g. ImageNet, with ImageNet statistics.

    ``num_classes`` is the number of class folders in ``train_root``; a class folder without an image file is an
    error naming it. ``val_root``, if given, must have the same class folders and serves validation and test;
    without it there is no validation (empty val/test loaders). Unreadable files are skipped, see
    SkipCorruptImageFolder. More ``num_workers`` than the machine has cores warns when training starts.

    ``decode`` chooses the training images' path (validation, test and the evaluation callbacks, which read the
    datasets with ``eval_transform``, always take the PIL path and get float32 images):

    - ``pil``: torchvision's loader decodes every image at full resolution, ``train_transform`` crops, resizes
      and converts it to float32 [0, 1] in the worker.
    - ``fast``: ``advmim_pl.data.jpeg.JpegCropFlip``: the same random-resized-crop distribution and flip, from a
      reduced JPEG decode (DCT scaling, ``simplejpeg``), resized with PIL's antialiased bicubic; the batch stays
      uint8 (4x fewer bytes to collate, pin and copy) and ``on_after_batch_transfer`` converts it to float32
      [0, 1] on the device, so the model receives what ``pil`` gives it. A file that is not a JPEG (or a CMYK JPEG)
      is decoded in full by PIL instead, with a warning naming it. ``benchmarks/input_pipeline.py`` measures both.
    """

    dataset_mean = IMAGENET_MEAN
    dataset_std = IMAGENET_STD

    def __init__(
        self,
        train_root: str,
        val_root: str | None = None,
        decode: Literal["pil", "fast"] = "pil",
        **kwargs,
    ) -> None:
        """``kwargs``: the shared options of ``ImageDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        if decode not in ("pil", "fast"):
            raise ValueError(f"decode must be pil or fast, got {decode!r}")
        self.decode = decode
        classes = check_image_root(train_root, "train_root")
        if val_root is not None:
            val_classes = check_image_root(val_root, "val_root")
            if val_classes != classes:
                raise ValueError(
                    f"val_root {val_root!r} must have the same class folders as train_root {train_root!r}: "
                    f"missing {sorted(set(classes) - set(val_classes))}, "
                    f"extra {sorted(set(val_classes) - set(classes))}"
                )
            check_class_folders(val_root, val_classes, "val_root")
        check_class_folders(train_root, classes, "train_root")
        self.train_root = train_root
        self.val_root = val_root
        self.num_classes = len(classes)

    def setup(self, stage: str | None = None) -> None:
        """Scan the folders once (this lists every file, which takes a while for ImageNet)."""
        if self.train_set is not None:
            return
        train_transform = self.fast_transform() if self.decode == "fast" else self.train_transform()
        self.train_set = SkipCorruptImageFolder(self.train_root, train_transform)
        if self.val_root is not None:
            self.val_set = SkipCorruptImageFolder(self.val_root, self.eval_transform())
            self.test_set = self.val_set

    def fast_transform(self) -> JpegCropFlip:
        """The ``decode: fast`` training transform: file path -> uint8 (channels, img_size, img_size)."""
        return JpegCropFlip(self.img_size, self.crop_scale, self.hflip, self.channels)
