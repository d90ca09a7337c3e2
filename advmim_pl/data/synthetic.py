"""Deterministic synthetic RGB images with per-class structure, for tests and benchmarks."""

import torch
from jsonargparse.typing import PositiveInt
from torch import Tensor
from torch.nn import functional as F

from advmim_pl.checks import require_positive
from advmim_pl.data.base import InMemoryDataModule

NATIVE_SIZE = 32  # resolution the images are generated at; the transforms resize them to img_size
GRID = 4  # side of the coarse random grid that is upsampled into a smooth pattern
GAIN = 1.35  # sigmoid gain, chosen so that pixel values have mean about 0.5 and std about 0.25


def smooth_class_images(num_samples: int, prototypes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images uint8 (N, 3, 32, 32) and labels int64 (N,); class c looks like prototypes[c] plus noise.

    ``prototypes`` (num_classes, 3, GRID, GRID) are coarse class patterns; each sample adds its own
    coarse noise at half their strength, upsamples bicubically and squashes with a sigmoid to [0, 1].
    """
    labels = torch.arange(num_samples) % len(prototypes)
    labels = labels[torch.randperm(num_samples, generator=generator)]
    noise = torch.randn(num_samples, 3, GRID, GRID, generator=generator)
    coarse = prototypes[labels] + 0.5 * noise
    smooth = F.interpolate(coarse, size=NATIVE_SIZE, mode="bicubic", align_corners=False)
    return (torch.sigmoid(GAIN * smooth) * 255).round().to(torch.uint8), labels


class SyntheticDataModule(InMemoryDataModule):
    """Smooth random RGB patterns, ``num_samples`` for training and ``num_val_samples`` for val and test.

    Classes are balanced and each has its own coarse pattern, so a classifier can learn them. The
    data depend only on ``seed``, ``num_samples``, ``num_val_samples`` and ``num_classes``.
    Statistics mean 0.5, std 0.25 per channel.
    """

    dataset_mean = (0.5,)
    dataset_std = (0.25,)

    def __init__(
        self,
        num_samples: PositiveInt = 256,
        num_classes: PositiveInt = 10,
        seed: int = 0,
        num_val_samples: PositiveInt = 64,
        **kwargs,
    ) -> None:
        """``kwargs``: the shared options of ``InMemoryDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        require_positive(num_samples=num_samples, num_val_samples=num_val_samples)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_samples = num_samples
        self.num_val_samples = num_val_samples
        self.num_classes = num_classes
        self.seed = seed

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Train and eval images uint8 (N, 3, 32, 32), labels int64 (N,), all from ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn(self.num_classes, 3, GRID, GRID, generator=generator)
        train = smooth_class_images(self.num_samples, prototypes, generator)
        val = smooth_class_images(self.num_val_samples, prototypes, generator)
        return *train, *val
