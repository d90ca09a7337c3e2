"""Common data-module options, transforms and the in-memory uint8 dataset.

Every data module yields batches ``(images, labels)``: images float32 in [0, 1] with shape
(B, channels, img_size, img_size), labels int64 (B,). Normalisation is left to the model
(``advmim_pl.models.normalize.Normalize`` with the module's ``mean``/``std``), so attack budgets
stay in pixel units.
"""

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from advmim_pl.checks import constructor_config, require_non_negative, require_positive
from advmim_pl.data.device import GREY_WEIGHTS, DeviceBatches
from advmim_pl.data.resolution import ResolutionSchedule
from advmim_pl.data.resumable import ResumableSampler, SeededSamples, TrainingOrder, global_seed


def stats_for_channels(
    mean: Sequence[float], std: Sequence[float], channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Adapt per-channel (mean, std) of a dataset to the ``channels`` the module outputs.

    Grey statistics (length 1) are replicated to 3 channels, like the images. RGB statistics
    (length 3) become luminance-weighted grey ones: exact for the mean, an upper bound for the std.
    """
    if len(mean) == channels:
        return tuple(mean), tuple(std)
    if len(mean) == 1:
        return tuple(mean) * channels, tuple(std) * channels
    return (sum(w * m for w, m in zip(GREY_WEIGHTS, mean, strict=True)),), (
        sum(w * s for w, s in zip(GREY_WEIGHTS, std, strict=True)),
    )


def machine_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TensorImageDataset(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) with int labels (N,).

    ``transform`` is applied per sample and maps a (C, H, W) uint8 image to the output image.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class ImageDataModule(LightningDataModule):
    """Options, transforms and evaluation loaders shared by all image data modules.

    Train transform (MAE augmentation): RandomResizedCrop(img_size, crop_scale, bicubic), then an
    optional random horizontal flip. Val/test transform: resize the shorter side to
    img_size / eval_crop_ratio (bicubic; 256 for 224 with ImageNet's 0.875), then center crop img_size.
    Grey images are replicated to 3 channels when ``channels=3`` and RGB images converted to grey when
    ``channels=1``.

    The training loader is a subclass's: ``MapStyleDataModule`` reads a map-style ``train_set`` in the resumable
    order of ``advmim_pl.data.resumable``; ``advmim_pl.data.streaming.StreamingImageDataModule`` streams litdata
    shards. Both keep ``train_set``, ``val_set`` and ``test_set`` as map-style datasets (``len``, indexing) with a
    ``transform`` attribute: the evaluation views (``KNNMonitor``, ``FeatureEvalModule``, the robustness floors)
    read them through a copy with ``eval_transform`` in its place (``advmim_pl.eval.features.evaluation_view``).

    Subclasses define ``num_classes`` and the dataset's per-channel statistics ``dataset_mean`` and
    ``dataset_std`` (length 1 or 3), from which ``__init__`` derives ``mean`` and ``std`` (length
    ``channels``, linked to the model's normalisation); their ``setup`` sets ``train_set``, ``val_set`` and
    ``test_set``. ``normalize_mean``/``normalize_std`` replace the dataset's statistics, e.g. to evaluate an encoder
    on another dataset with the normalisation it was pre-trained with.

    ``resolution`` (``advmim_pl.data.resolution``): progressive resolution. The training crops of epoch ``e`` are
    ``resolution.size(e)`` pixels wide on every data path (drawn per sample from the epoch, so persistent workers,
    resumed runs and every rank agree); validation and test stay at ``img_size``, where the schedule must end.
    """

    num_classes: int
    dataset_mean: tuple[float, ...]
    dataset_std: tuple[float, ...]

    def __init__(
        self,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 2,
        img_size: PositiveInt = 224,
        channels: Literal[1, 3] = 3,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = True,
        pin_memory: bool = True,
        normalize_mean: tuple[float, ...] | None = None,
        normalize_std: tuple[float, ...] | None = None,
        eval_crop_ratio: float = 1.0,
        resolution: ResolutionSchedule | None = None,
    ) -> None:
        super().__init__()
        require_positive(batch_size=batch_size, img_size=img_size)
        if resolution is not None and resolution.final != img_size:
            raise ValueError(
                f"the resolution schedule ends at {resolution.final} px but img_size is {img_size}: img_size is the "
                "final resolution (the model's, and its export's), so make the schedule end there"
            )
        require_non_negative(num_workers=num_workers)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.save_hyperparameters(ignore=["resolution"])
        self.hparams["resolution"] = None if resolution is None else constructor_config(resolution)
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.img_size = img_size
        self.channels = channels
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.pin_memory = pin_memory
        mean, std = normalize_mean, normalize_std
        if (mean is None) != (std is None) or (mean is not None and not len(mean) == len(std) in (1, 3)):
            raise ValueError(
                f"normalize_mean {mean} and normalize_std {std} must both be null or both lists of 1 or 3 values"
            )
        if std is not None and min(std) <= 0:
            raise ValueError(f"normalize_std {std} must be positive")
        if not 0 < eval_crop_ratio <= 1:
            raise ValueError(
                f"eval_crop_ratio must be in (0, 1], e.g. 0.875 for ImageNet's 256 -> 224; got {eval_crop_ratio}"
            )
        self.eval_crop_ratio = eval_crop_ratio
        stats = (self.dataset_mean, self.dataset_std) if mean is None else (mean, std)
        self.mean, self.std = stats_for_channels(*stats, channels)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._progress = (0, 0)  # (epoch, its training batches taken by the fit loop): see on_before_batch_transfer

    def _to_output(self) -> list[v2.Transform]:
        """Channel conversion and uint8 (C, H, W) -> float32 [0, 1] plain tensor."""
        to_channels = v2.RGB() if self.channels == 3 else v2.Grayscale(num_output_channels=1)
        return [to_channels, v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]

    def train_transform(self) -> v2.Compose:
        """PIL image or uint8 (C, H, W) -> augmented float32 (channels, img_size, img_size)."""
        crop = v2.RandomResizedCrop(
            self.img_size, scale=self.crop_scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
        flip = [v2.RandomHorizontalFlip()] if self.hflip else []
        return v2.Compose([v2.ToImage(), crop, *flip, *self._to_output()])

    def eval_transform(self) -> v2.Compose:
        """PIL image or uint8 (C, H, W) -> float32 (channels, img_size, img_size), deterministic: the shorter side
        resized to round(img_size / eval_crop_ratio), then the centre img_size crop."""
        side = round(self.img_size / self.eval_crop_ratio)
        resize = v2.Resize(side, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return v2.Compose([v2.ToImage(), resize, v2.CenterCrop(self.img_size), *self._to_output()])

    def check_workers(self) -> None:
        """Warn when ``num_workers`` exceeds the machine's cores (called when a training loader is made)."""
        cores = machine_cores()
        if self.num_workers > cores:
            warnings.warn(
                f"num_workers={self.num_workers} is more than the {cores} CPU cores of this machine: the workers "
                f"share them and loading gets no faster; set num_workers <= {cores}",
                stacklevel=3,
            )

    def loader_options(self) -> dict:
        """DataLoader keyword arguments every loader of the module shares."""
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.accelerator.is_available(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches of the epoch as the fit loop takes each one for its training step: after
        Lightning's prefetch (which runs a batch ahead), so the count is what a checkpoint's position needs. The
        batch passes unchanged."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            self._progress = (epoch, self.batches_done() + 1)
        return batch

    def batches_done(self) -> int:
        """Training batches of the trainer's current epoch taken by the fit loop so far (a restored position
        included); 0 without a trainer or before the epoch's first batch."""
        epoch, done = self._progress
        return done if self.trainer is not None and epoch == self.trainer.current_epoch else 0

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 batches (the fast JPEG paths of ImageFolder and streaming) -> float32 [0, 1], on the device after
        the copy; other batches (already float) pass unchanged."""
        images, *rest = batch
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return [images, *rest] if isinstance(batch, list) else (images, *rest)

    def _eval_loader(self, dataset: Dataset | None) -> DataLoader | list:
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before requesting a dataloader")
        if dataset is None:  # a module without a validation split (no val_root / val_dir)
            return []
        return DataLoader(dataset, persistent_workers=self.num_workers > 0, **self.loader_options())

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order, last batch possibly smaller; [] (no validation) without a validation split."""
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in order, last batch possibly smaller; [] without a test split."""
        return self._eval_loader(self.test_set)


class MapStyleDataModule(ImageDataModule):
    """An ``ImageDataModule`` whose training split is a map-style dataset (``train_set``), read in the resumable
    order of ``advmim_pl.data.resumable.TrainingOrder``: each epoch's permutation comes from the global seed
    (``PL_GLOBAL_SEED``, 0 if unset) and the epoch, under DDP each rank takes its own share of it, and a run resumed
    from a checkpoint (mid-epoch or at an epoch's end) trains on the batches the uninterrupted run would have.
    ``advmim_pl.data.streaming.StreamingImageDataModule`` is the iterable sibling."""

    def __init__(self, **kwargs) -> None:
        """``kwargs``: the shared options of ``ImageDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        self._resume_at: tuple[int, int] | None = None  # set by load_state_dict when resuming

    def _ranks(self) -> tuple[int, int]:
        """(this process's rank, the world size); (0, 1) without a trainer."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _training_order(self, size: int) -> TrainingOrder:
        """The order of this process's training batches over ``size`` samples in the epoch about to start, for
        either data path."""
        trainer = self.trainer
        if self.resolution is not None and self.resolution.scale_batch and trainer is not None:
            if trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(
                    "the resolution schedule scales the batch with the side (scale_batch: true), so each epoch needs "
                    "a training loader of its own batch size: set the trainer's reload_dataloaders_every_n_epochs "
                    f"to 1 (it is {trainer.reload_dataloaders_every_n_epochs})"
                )
        # the fit loop's epoch, also on a resume that starts with the end of an epoch: its loader must have that
        # epoch's length, so that the loop sees the epoch complete and moves on to the next (with a loader of its own)
        batch_size = self.epoch_batch_size(trainer.current_epoch if trainer is not None else 0)
        return TrainingOrder(size, batch_size, global_seed(), *self._ranks(), self._position)

    def epoch_batch_size(self, epoch: int) -> int:
        """Images per training batch (per process) in ``epoch``: ``batch_size``, or the resolution schedule's
        scaled batch (``ResolutionSchedule.batch``)."""
        return self.batch_size if self.resolution is None else self.resolution.batch(epoch, self.batch_size)

    def batches_per_epoch(self, epoch: int) -> int:
        """Training batches of this process in ``epoch`` (full batches only); after ``setup``."""
        _, world_size = self._ranks()
        return len(self.train_set) // world_size // self.epoch_batch_size(epoch)

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained) where an epoch's iteration starts: the restored checkpoint's
        position once, else the trainer's current epoch from its start."""
        if self._resume_at is not None:
            position, self._resume_at = self._resume_at, None
            return position
        return (self.trainer.current_epoch if self.trainer is not None else 0), 0

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints by Lightning: the position of the next training batch, (epoch, batches of it
        already trained). A checkpoint written after an epoch's last batch (at that batch's end, at validation
        or at the epoch's end) holds the start of the next epoch, where Lightning's fit loop resumes."""
        if self.trainer is None:
            return {}
        # a restored position (epoch, 0) already past the epoch the fit loop ends after resuming stays as it is
        epoch, done = max(self._progress, (self.trainer.current_epoch, 0))
        if done >= self.trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restored by Lightning before training starts; the first epoch iteration starts at this position."""
        if state_dict:
            self._resume_at = self._progress = (state_dict["epoch"], state_dict["batches_done"])

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches with drop_last=True, so every batch has batch_size images; each sample's augmentation
        drawn from its own seed (``SeededSamples``), so a resumed run continues exactly."""
        dataset = self.train_set
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before requesting a dataloader")
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} images, fewer than batch_size={self.batch_size}; "
                "with drop_last=True no batch would be produced"
            )
        self.check_workers()
        order = self._training_order(len(dataset))
        return DataLoader(
            SeededSamples(dataset),
            sampler=ResumableSampler(order, self.resolution),
            drop_last=True,
            persistent_workers=self.num_workers > 0,
            **{**self.loader_options(), "batch_size": order.batch_size},
        )


def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices (M,) of a class-balanced random subset: round(fraction * N / K) samples of each of the K classes
    present in ``labels`` (N,), drawn without replacement by ``seed`` (the same seed gives the same subset), in
    ascending order. ValueError when a class has fewer samples than its share."""
    classes = labels.unique()
    per_class = round(fraction * len(labels) / len(classes))
    if per_class < 1:
        raise ValueError(
            f"label_fraction {fraction} keeps no image of each of the {len(classes)} classes among {len(labels)} "
            f"training images: use at least {len(classes) / (2 * len(labels)):.2g}"
        )
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in classes:
        members = (labels == label).nonzero().squeeze(1)
        if len(members) < per_class:
            raise ValueError(
                f"label_fraction {fraction} asks for {per_class} images of class {int(label)}, which has {len(members)}"
            )
        picked.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picked).sort().values


def resident_on(device: torch.device, device_resident: bool | Literal["auto"]) -> bool:
    """Whether training batches are made on ``device``: always (true), never (false), or on accelerators (auto)."""
    return device.type != "cpu" if device_resident == "auto" else bool(device_resident)


class InMemoryDataModule(MapStyleDataModule):
    """Data module whose splits fit in memory as uint8 tensors; subclasses implement ``load_splits``.

    The train split is used for training, the eval split for both validation and test.

    With ``device_resident: true`` (or ``auto`` when the trainer's device is an accelerator, not the CPU) the
    train split's uint8 tensor is copied once to the trainer's device
    and ``train_dataloader`` returns a ``DeviceBatches`` iterable instead of a DataLoader: the batches hold
    the samples the DataLoader's would (the same ``TrainingOrder``, resumed at the same position), are sliced
    on the device and random-resized-crop, flip and channel conversion run batched there
    (``advmim_pl.data.device``; continuous crop boxes, no antialiasing, other random draws).
    ``num_workers`` and ``pin_memory`` then apply to validation and test only, which keep the DataLoader.

    ``label_fraction`` keeps a class-balanced subset of the training split (``balanced_subset``: e.g. 0.01 for the
    1%-of-labels fine-tuning protocol), drawn by ``label_seed``; validation and test keep every image.
    """

    def __init__(
        self,
        device_resident: bool | Literal["auto"] = False,
        label_fraction: OpenUnitInterval | None = None,
        label_seed: NonNegativeInt = 0,
        **kwargs,
    ) -> None:
        """``kwargs``: the shared options of ``ImageDataModule`` (batch_size, img_size, channels, ...)."""
        super().__init__(**kwargs)
        if device_resident not in (True, False, "auto"):
            raise ValueError(f"device_resident must be true, false or auto, got {device_resident!r}")
        if label_fraction is not None and not 0 < label_fraction < 1:
            raise ValueError(
                f"label_fraction must be in (0, 1) (e.g. 0.01 for 1% of the labels; null keeps them all), "
                f"got {label_fraction}"
            )
        self.device_resident = device_resident
        self.label_fraction = label_fraction
        self.label_seed = label_seed
        self._resident: tuple[Tensor, Tensor] | None = None

    def load_splits(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (train_images, train_labels, eval_images, eval_labels); images uint8 (N, C, H, W)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the splits once and wrap them in TensorImageDatasets."""
        if self.train_set is not None:
            return
        train_images, train_labels, eval_images, eval_labels = self.load_splits()
        if self.label_fraction is not None:
            keep = balanced_subset(train_labels, self.label_fraction, self.label_seed)
            train_images, train_labels = train_images[keep], train_labels[keep]
        self.train_set = TensorImageDataset(train_images, train_labels, self.train_transform())
        self.val_set = TensorImageDataset(eval_images, eval_labels, self.eval_transform())
        self.test_set = self.val_set

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled full batches: a DataLoader, or with ``device_resident`` batches made on the device."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if not resident_on(device, self.device_resident):
            return super().train_dataloader()
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before requesting a dataloader")
        if self._resident is None or self._resident[0].device != device:
            self._resident = (self.train_set.images.to(device), self.train_set.labels.to(device))
        return DeviceBatches(
            *self._resident,
            order=self._training_order(len(self.train_set)),
            out_size=self.img_size,
            channels=self.channels,
            scale=self.crop_scale,
            hflip=self.hflip,
            resolution=self.resolution,
        )
