"""Progressive resolution with a batch scaled to the side (``scale_batch``): the batch per epoch, the steps per
epoch that the learning-rate schedule and the attack's epoch count, an exact resume across a switch, and the
refusals."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from advmim_pl.data import BundledSampleDataModule, StreamingImageDataModule
from advmim_pl.data.resolution import LinearResolution, StepResolution
from advmim_pl.schedule import EpochSteps, warmup_cosine
from tests.helpers.micro import micro_module, trainer

SCHEDULE = [[0, 16], [1, 24], [2, 32]]
# The bundled sample's 4000 images at 1% per epoch: batches of 32, 14 and 8 images give 1, 2 and 5 steps.
BATCHES, STEPS = {0: 32, 1: 14, 2: 8}, (1, 2, 5)


def test_the_batch_grows_as_the_side_shrinks():
    scaled = StepResolution(SCHEDULE, scale_batch=True)
    assert [scaled.batch(e, 8) for e in range(4)] == [32, 14, 8, 8]  # 8 * (32/16)^2, floor(8 * (32/24)^2)
    assert [StepResolution(SCHEDULE).batch(e, 8) for e in range(3)] == [8, 8, 8]
    ramp = LinearResolution(64, 128, end_epoch=2, multiple=32, scale_batch=True)
    assert [ramp.batch(e, 10) for e in range(3)] == [40, 17, 10]  # 96 px at epoch 1: floor(10 * (128/96)^2)


def test_epoch_steps_count_fractional_epochs_both_ways():
    steps = EpochSteps((1, 2), 5)
    assert [steps.of(e) for e in range(4)] == [1, 2, 5, 5]
    assert [steps.before(e) for e in (0, 1, 1.5, 2, 2.4, 4)] == [0, 1, 2, 3, 5, 13]
    for step in range(14):
        assert steps.before(steps.epoch_at(step)) == pytest.approx(step)
    assert [steps.epoch_at(s) for s in (0, 1, 2, 3, 4)] == [0, 1, 1.5, 2, 2.2]
    constant = EpochSteps((), 4)
    assert constant.before(2.5) == 10 and constant.epoch_at(10) == 2.5


class Record(L.Callback):
    """Per optimizer step: the epoch, the batch's size and side, the learning-rate factor and the module's epoch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        factor = scheduler.get_last_lr()[0] / scheduler.base_lrs[0]
        epoch = pl_module.epoch_steps().epoch_at(trainer.global_step)
        self.rows.append((trainer.current_epoch, len(batch[0]), batch[0].shape[-1], factor, epoch))


def data(resident: bool = True, scale_batch: bool = True) -> BundledSampleDataModule:
    return BundledSampleDataModule(
        img_size=32, channels=1, batch_size=8, num_workers=0, pin_memory=False, device_resident=resident,
        resolution=StepResolution(SCHEDULE, scale_batch=scale_batch),
    )  # fmt: skip


def fit(module, datamodule, callbacks=(), ckpt_path=None, **options) -> L.Trainer:
    run = trainer(-1, callbacks, max_epochs=3, limit_train_batches=0.01, reload_dataloaders_every_n_epochs=1, **options)
    run.fit(module, datamodule, ckpt_path=ckpt_path)
    return run


@pytest.mark.parametrize("resident", [True, False], ids=["device", "dataloader"])
def test_each_epoch_trains_its_batch_and_the_schedule_counts_the_real_steps(resident):
    record = Record()
    run = fit(micro_module(warmup_epochs=1.5, min_lr=0.0), data(resident), [record])
    assert run.global_step == sum(STEPS)
    rows = record.rows
    assert [(epoch, batch, side) for epoch, batch, side, *_ in rows] == [
        (epoch, BATCHES[epoch], SCHEDULE[epoch][1]) for epoch, steps in enumerate(STEPS) for _ in range(steps)
    ]
    # warm-up of 1.5 epochs = 1 + 2/2 = 2 steps, then the cosine over all 8 real steps (not 3 epochs x 5 steps)
    assert [row[3] for row in rows] == pytest.approx([warmup_cosine(s, 2, 8) for s in range(8)])
    assert [row[4] for row in rows] == pytest.approx([0, 1, 1.5, 2, 2.2, 2.4, 2.6, 2.8])


def test_a_run_resumes_exactly_across_a_switch_of_size_and_batch(tmp_path):
    def resumed(ckpt_path=None) -> L.LightningModule:
        L.seed_everything(0)
        module = micro_module()
        every_step = ModelCheckpoint(tmp_path / "step", "{step}", every_n_train_steps=1, save_top_k=-1)
        every_epoch = ModelCheckpoint(tmp_path / "epoch", "{epoch}", save_on_train_epoch_end=True, save_top_k=-1)
        callbacks = [every_step, every_epoch]
        fit(module, data(resident=False), callbacks, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module

    straight = resumed()
    # mid-epoch 1 (after the first switch), mid-epoch 2 (after the second), at the ends of epochs 0 and 1 (the
    # switches themselves)
    for checkpoint in ("step/step=2.ckpt", "step/step=4.ckpt", "epoch/epoch=0.ckpt", "epoch/epoch=1.ckpt"):
        again = resumed(tmp_path / checkpoint)
        for name, value in straight.state_dict().items():
            assert torch.equal(value, again.state_dict()[name]), (checkpoint, name)
    # written at an epoch's last batch, before its end, where the next epoch is longer: Lightning 2.6 would resume
    # that epoch short, so the resume is refused
    with pytest.raises(ValueError, match="last batch of epoch 0, before the epoch's end.*from 1 to 2 batches"):
        resumed(tmp_path / "step/step=1.ckpt")


def test_a_scaled_batch_needs_a_loader_per_epoch():
    run = trainer(-1, max_epochs=1, limit_train_batches=0.01)
    with pytest.raises(ValueError, match=r"reload_dataloaders_every_n_epochs\s+to 1 \(it is 0\)"):
        run.fit(micro_module(), data())


def test_streaming_refuses_a_scaled_batch(tmp_path):
    with pytest.raises(ValueError, match="scale_batch is not supported"):
        StreamingImageDataModule(str(tmp_path), img_size=32, resolution=StepResolution(SCHEDULE, scale_batch=True))
