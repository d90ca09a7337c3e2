"""A training order that a resumed run continues exactly.

The permutation of an epoch depends only on (seed, epoch), and each sample's augmentation is drawn from a
seed of its own, (seed, epoch, index), whichever worker loads it. A run resumed from a mid-epoch checkpoint
therefore skips the batches it already trained on and sees the same images, augmented the same way, as the
run that was never interrupted.
"""

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

MASK63 = (1 << 63) - 1


def global_seed() -> int:
    """The seed ``lightning.seed_everything`` set for this run (0 if none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps), for independent per-(seed, epoch, index) seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & ((1 << 64) - 1))) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & ((1 << 64) - 1)
    return h & MASK63


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields (sample_seed, index) keys for one epoch, shuffled by (seed, epoch).

    ``position()`` is read when an epoch's iteration starts and gives (epoch, batches of it already trained):
    a resumed run starts after the ``batches * batch_size`` keys it consumed before the checkpoint.
    """

    def __init__(self, size: int, batch_size: int, seed: int, position: Callable[[], tuple[int, int]]) -> None:
        self.size, self.batch_size, self.seed, self.position = size, batch_size, seed, position

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.position()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix(self.seed, epoch)))
        for index in order[skip * self.batch_size :].tolist():
            yield mix(self.seed, epoch, index), index


class SeededSamples(Dataset):
    """Wraps a dataset so that item (sample_seed, index) is ``dataset[index]`` with its random augmentation drawn
    from ``sample_seed`` (the process's own RNG state is restored afterwards)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        sample_seed, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]
