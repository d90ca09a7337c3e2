"""Progressive resolution: the side of the training images per epoch, low early and the full ``img_size`` at the end
(DailyMAE, Wu et al. 2024, arXiv:2404.00509; FastMIM pre-trains at 128 px). A data module with a ``resolution``
schedule crops each training sample of epoch ``e`` to ``size(e)``; the model follows the size of what it is given.
The size is a function of the epoch alone, so a resumed run, any worker and every rank agree on it.

With ``scale_batch``, the batch grows as the side shrinks, ``batch_size * (final / size)^2`` images (rounded down),
so that every step sees about the pixels of a full-resolution batch: fewer, larger steps in the low-resolution
epochs. The steps per epoch then change with the epoch; the learning-rate schedule counts them epoch by epoch
(``advmim_pl.schedule.EpochSteps``), and the trainer must rebuild its training loader every epoch
(``reload_dataloaders_every_n_epochs: 1``).
"""

from typing import Any

from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torchvision.transforms import v2


class ResolutionSchedule:
    """The training images' side per 0-based epoch (``size``); the last one is the data module's ``img_size``.
    ``scale_batch``: whether the batch grows as the side shrinks (``batch``)."""

    scale_batch: bool = False

    def size(self, epoch: int) -> int:
        raise NotImplementedError

    @property
    def final(self) -> int:
        """The side the schedule ends at, which must be the data module's ``img_size``."""
        raise NotImplementedError

    @property
    def horizon(self) -> int:
        """The first epoch from which the size is ``final``."""
        raise NotImplementedError

    def batch(self, epoch: int, batch_size: int) -> int:
        """Images per batch (per process) in ``epoch`` for ``batch_size`` at the final side: ``batch_size`` as it is,
        or with ``scale_batch`` ``floor(batch_size * (final / size(epoch))^2)``, the final side's pixels per step."""
        if not self.scale_batch:
            return batch_size
        return batch_size * self.final**2 // self.size(epoch) ** 2

    def sizes(self, epochs: int) -> list[int]:
        """The side of each of the first ``epochs`` epochs."""
        return [self.size(epoch) for epoch in range(epochs)]

    def switch(self, epoch: int) -> str | None:
        """The log line for a size change at the start of ``epoch``, e.g. ``img_size 24 -> 32 at epoch 3``; None
        when the size stays."""
        if epoch == 0 or self.size(epoch) == self.size(epoch - 1):
            return None
        return f"img_size {self.size(epoch - 1)} -> {self.size(epoch)} at epoch {epoch}"


class StepResolution(ResolutionSchedule):
    """Sizes that hold from given epochs on: ``steps`` = [[0, 160], [320, 192], [640, 224]] trains epochs 0-319 at
    160 px, 320-639 at 192 px, and 224 px from epoch 640.

    Args:
        steps: [epoch, img_size] pairs, the first at epoch 0, epochs increasing.
        scale_batch: the batch grows as the side shrinks (module docstring).
    """

    def __init__(self, steps: list[tuple[NonNegativeInt, PositiveInt]], scale_batch: bool = False) -> None:
        epochs = [epoch for epoch, _ in steps]
        if not steps or epochs[0] != 0 or epochs != sorted(set(epochs)) or min(size for _, size in steps) < 1:
            raise ValueError(
                f"StepResolution steps {steps!r}: give [epoch, img_size] pairs, the first at epoch 0, epochs "
                "increasing and sizes positive, e.g. [[0, 160], [320, 192], [640, 224]]"
            )
        self.steps = [(int(epoch), int(size)) for epoch, size in steps]
        self.scale_batch = scale_batch

    def size(self, epoch: int) -> int:
        return next(size for start, size in reversed(self.steps) if epoch >= start)

    @property
    def final(self) -> int:
        return self.steps[-1][1]

    @property
    def horizon(self) -> int:
        return self.steps[-1][0]


class LinearResolution(ResolutionSchedule):
    """A linear ramp of the side from ``start_size`` at ``start_epoch`` to ``end_size`` at ``end_epoch`` (and on),
    rounded down to a multiple of ``multiple`` (the patch size, or SimMIM's mask square).

    Args:
        start_size: side up to ``start_epoch``.
        end_size: side from ``end_epoch`` on.
        end_epoch: first epoch at ``end_size``.
        start_epoch: last epoch at ``start_size``.
        multiple: every side is a multiple of this.
        scale_batch: the batch grows as the side shrinks (module docstring).
    """

    def __init__(
        self,
        start_size: PositiveInt,
        end_size: PositiveInt,
        end_epoch: PositiveInt,
        start_epoch: NonNegativeInt = 0,
        multiple: PositiveInt = 16,
        scale_batch: bool = False,
    ) -> None:
        if not 0 <= start_epoch < end_epoch:
            raise ValueError(f"LinearResolution: start_epoch {start_epoch} must be below end_epoch {end_epoch}")
        for name, value in (("start_size", start_size), ("end_size", end_size)):
            if value < 1 or value % multiple:
                raise ValueError(f"LinearResolution: {name} {value} must be a positive multiple of {multiple}")
        self.start_size, self.end_size, self.multiple = start_size, end_size, multiple
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.scale_batch = scale_batch

    def size(self, epoch: int) -> int:
        if epoch <= self.start_epoch:
            return self.start_size
        if epoch >= self.end_epoch:
            return self.end_size
        share = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        side = self.start_size + share * (self.end_size - self.start_size)
        return int(side // self.multiple * self.multiple)

    @property
    def final(self) -> int:
        return self.end_size

    @property
    def horizon(self) -> int:
        return self.end_epoch


def announce(schedule: ResolutionSchedule, epoch: int) -> None:
    """Log the schedule's switch line when ``epoch``'s training iteration starts at a new size."""
    if line := schedule.switch(epoch):
        rank_zero_info(line)


def set_output_size(transform: Any, size: int) -> None:
    """Make a training transform crop to ``size`` x ``size``: the ``out_size`` of the fast path's ``JpegCropFlip``,
    or the ``RandomResizedCrop`` of a torchvision ``Compose``."""
    if hasattr(transform, "out_size"):
        transform.out_size = size
        return
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, v2.RandomResizedCrop):
            step.size = (size, size)
            return
    raise TypeError(f"progressive resolution: {type(transform).__name__} has no random-resized crop to resize")
