"""The training order both data paths share, and which a resumed run continues exactly.

``TrainingOrder`` says which samples each training batch of a process holds: a permutation per (seed, epoch),
sharded by rank. The DataLoader path (``ResumableSampler`` over ``SeededSamples``) and the device-resident path
(``advmim_pl.data.device.DeviceBatches``) both read it, so they train on the same batches, and both start an
epoch at the position where training stands: a run resumed from a checkpoint skips the batches it already
trained on. On the DataLoader path each sample's augmentation is drawn from a seed of its own,
(seed, epoch, index), whichever worker loads it, so a resumed run also sees the same augmented images.
"""

import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from advmim_pl.data.resolution import ResolutionSchedule, announce, set_output_size

MASK63 = (1 << 63) - 1


def global_seed() -> int:
    """The seed ``lightning.seed_everything`` set for this run (0 if none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps), for independent seeds per tuple such as (seed, epoch):
    no two tuples collide the way ``seed + epoch`` would."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & ((1 << 64) - 1))) * 0xBF58476D1CE4E5B9 & ((1 << 64) - 1)
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & ((1 << 64) - 1)
    return h & MASK63


class TrainingOrder:
    """The training batches of one process, epoch by epoch, and where the next epoch's iteration starts.

    Epoch ``e`` permutes the ``size`` samples with a CPU generator seeded ``mix(seed, e)``, the same on every
    rank; rank ``r`` takes every ``world_size``-th sample from the ``r``-th and cuts its share into
    ``len(self)`` full batches (the rest of the share is dropped).

    Args:
        size: number of training samples.
        batch_size: samples per batch (per process).
        seed: base seed (the global seed).
        rank, world_size: this process's share of each epoch's permutation.
        position: called when an epoch's iteration starts; returns (epoch, batches of it already trained),
            e.g. the data module's, from the trainer and a restored checkpoint.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        position: Callable[[], tuple[int, int]],
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if size // world_size < batch_size:
            raise ValueError(
                f"{size} training images over {world_size} process(es) give fewer than "
                f"batch_size={batch_size} per process; with drop_last no batch would be produced"
            )
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.position = rank, world_size, position

    def __len__(self) -> int:
        return self.size // self.world_size // self.batch_size

    def start(self) -> tuple[int, int]:
        """(epoch, first batch) of the iteration that starts now. A position at the end of epoch ``e``, (e,
        len(self)), as checkpoints written after an epoch's last batch by earlier versions hold, is the start
        of epoch e + 1."""
        epoch, done = self.position()
        if not 0 <= done <= len(self):
            raise ValueError(
                f"resume position: {done} batches of epoch {epoch} done, but an epoch has {len(self)}; was the "
                "checkpoint written with another batch_size, dataset or number of processes?"
            )
        return (epoch + 1, 0) if done == len(self) else (epoch, done)

    def batches(self, epoch: int) -> Tensor:
        """Sample indices int64 (len(self), batch_size) on the CPU: this rank's batches of ``epoch``."""
        permutation = torch.randperm(self.size, generator=torch.Generator().manual_seed(mix(self.seed, epoch)))
        share = permutation[self.rank :: self.world_size][: len(self) * self.batch_size]
        return share.view(len(self), self.batch_size)


class ResumableSampler(DistributedSampler):
    """Yields (sample_seed, index) keys of this process's batches (``TrainingOrder``), from where training stands.

    A ``DistributedSampler`` so that Lightning, under DDP, leaves it as it is instead of wrapping it in one: it
    shards the order itself, and a wrapper would shard the resumed remainder of an epoch a second time.
    """

    def __init__(self, order: TrainingOrder, resolution: ResolutionSchedule | None = None) -> None:
        super().__init__(
            range(order.size), num_replicas=order.world_size, rank=order.rank, shuffle=False, drop_last=True
        )
        self.order, self.resolution = order, resolution

    def __len__(self) -> int:
        return len(self.order) * self.order.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, first = self.order.start()
        if self.resolution is None:
            for index in self.order.batches(epoch)[first:].flatten().tolist():
                yield mix(self.order.seed, epoch, index), index
            return
        announce(self.resolution, epoch)
        size = self.resolution.size(epoch)
        for index in self.order.batches(epoch)[first:].flatten().tolist():
            yield mix(self.order.seed, epoch, index), index, size


class SeededSamples(Dataset):
    """Wraps a dataset so that item (sample_seed, index) is ``dataset[index]`` with its random augmentation drawn
    from ``sample_seed`` (the process's own RNG state is restored afterwards); item (sample_seed, index, size) crops
    it to ``size`` pixels (progressive resolution)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, int]):
        sample_seed, index, *size = key
        if size:
            set_output_size(self.dataset.transform, size[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]
