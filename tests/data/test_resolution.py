"""Progressive resolution: the schedules, every data path cropping each epoch to its size (persistent workers
included), the model following the size with unchanged parameters, and exact resumes across a switch."""

import json
import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import resample_abs_pos_embed

from advmim_pl.adversarial import AEMIM
from advmim_pl.cli import run
from advmim_pl.data import BundledSampleDataModule, ImageFolderDataModule, StreamingImageDataModule
from advmim_pl.data.prepare import prepare
from advmim_pl.data.resolution import LinearResolution, StepResolution
from advmim_pl.models.pos_embed import sincos_2d
from tests.data.test_jpeg import jpeg_folder
from tests.helpers.micro import MICRO_MAE_FLAGS, micro_module, trainer

SCHEDULE = [[0, 16], [1, 24], [2, 32]]  # epochs 0, 1 and 2 at 16, 24 and 32 px


class BatchSides(L.Callback):
    """The side of every training batch, by epoch."""

    def __init__(self) -> None:
        self.sides: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sides.setdefault(trainer.current_epoch, set()).add(batch[0].shape[-1])


def test_step_and_linear_schedules():
    steps = StepResolution([[0, 160], [320, 192], [640, 224]])
    assert [steps.size(e) for e in (0, 319, 320, 639, 640, 799)] == [160, 160, 192, 192, 224, 224]
    assert (steps.final, steps.horizon) == (224, 640)
    assert steps.switch(320) == "img_size 160 -> 192 at epoch 320" and steps.switch(321) is None
    ramp = LinearResolution(start_size=112, end_size=224, end_epoch=100, start_epoch=20, multiple=16)
    assert [ramp.size(e) for e in (0, 20, 21, 60, 99, 100, 500)] == [112, 112, 112, 160, 208, 224, 224]
    assert all(size % 16 == 0 for size in ramp.sizes(120))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: StepResolution([[1, 16], [2, 32]]), "the first at epoch 0"),
        (lambda: StepResolution([[0, 16], [0, 32]]), "epochs increasing"),
        (lambda: LinearResolution(16, 32, end_epoch=3, start_epoch=3, multiple=8), "start_epoch 3 must be below"),
        (lambda: LinearResolution(20, 32, end_epoch=3, multiple=8), "start_size 20 must be a positive multiple of 8"),
        (lambda: BundledSampleDataModule(img_size=32, resolution=StepResolution([[0, 16], [1, 24]])), "ends at 24"),
    ],
)
def test_bad_schedules_are_one_line_errors(build, message):
    with pytest.raises(ValueError, match=message) as err:
        build()
    assert "\n" not in str(err.value)


def test_a_size_off_the_patch_grid_stops_before_the_first_step():
    data = BundledSampleDataModule(
        img_size=32, channels=1, batch_size=8, num_workers=0, resolution=StepResolution([[0, 18], [1, 32]])
    )
    with pytest.raises(ValueError, match=r"img_size \[18\] not divisible by 4"):
        trainer(1).fit(micro_module(), data)


def fit_sides(data: L.LightningDataModule, epochs: int = 3, batches: int = 2) -> dict[int, set[int]]:
    sides = BatchSides()
    trainer(-1, [sides], max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0).fit(
        micro_module(plugin=AEMIM(), encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}), data
    )
    return sides.sides


@pytest.mark.parametrize("resident, workers", [(False, 2), (True, 0)], ids=["dataloader-2-workers", "device"])
def test_the_in_memory_paths_crop_each_epoch_to_its_size(resident, workers, caplog):
    data = BundledSampleDataModule(
        img_size=32, channels=1, batch_size=8, num_workers=workers, pin_memory=False, device_resident=resident,
        resolution=StepResolution(SCHEDULE),
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert fit_sides(data) == {0: {16}, 1: {24}, 2: {32}}  # persistent workers follow the size too
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("img_size")]
    assert lines == ["img_size 16 -> 24 at epoch 1", "img_size 24 -> 32 at epoch 2"]


@pytest.mark.parametrize("decode", ["pil", "fast"])
def test_the_image_folder_paths_crop_each_epoch_to_its_size(decode, tmp_path):
    jpeg_folder(tmp_path / "train", count=16)
    data = ImageFolderDataModule(
        str(tmp_path / "train"), decode=decode, img_size=32, channels=1, batch_size=4, num_workers=1,
        pin_memory=False, resolution=StepResolution(SCHEDULE),
    )  # fmt: skip
    assert fit_sides(data) == {0: {16}, 1: {24}, 2: {32}}


def test_the_streaming_path_crops_each_epoch_to_its_size(tmp_path):
    jpeg_folder(tmp_path / "train", count=16)
    prepare(str(tmp_path / "train"), str(tmp_path / "shards"), num_workers=1)
    data = StreamingImageDataModule(
        str(tmp_path / "shards"), img_size=32, channels=1, batch_size=4, num_workers=0, pin_memory=False,
        resolution=StepResolution(SCHEDULE),
    )  # fmt: skip
    assert fit_sides(data) == {0: {16}, 1: {24}, 2: {32}}


@pytest.mark.parametrize("sincos", [True, False], ids=["sincos", "learned"])
def test_positions_follow_the_grid_and_parameters_keep_their_shapes(sincos):
    module = micro_module(sincos_pos_embed=sincos, plugin=AEMIM())
    shapes = {name: p.shape for name, p in module.named_parameters()}
    module.follow_input_size(24)
    encoder = module.encoder
    assert (encoder.grid_size, encoder.num_patches) == ((6, 6), 36)
    table = encoder.position_table()
    expected = (
        sincos_2d(64, (6, 6), 1).unsqueeze(0)
        if sincos
        else resample_abs_pos_embed(encoder.vit.pos_embed, [6, 6], [8, 8], num_prefix_tokens=1)
    )
    torch.testing.assert_close(table, expected)
    torch.testing.assert_close(module.decoder.position_table(), sincos_2d(32, (6, 6), 1).unsqueeze(0))
    x = torch.rand(4, 1, 24, 24)
    step = module.host_step(x, torch.Generator().manual_seed(0))
    assert step.latent.shape == (4, 1 + 9, 64) and step.pred.shape == (4, 36, 16) and torch.isfinite(step.loss)
    assert {name: p.shape for name, p in module.named_parameters()} == shapes
    module.follow_input_size(32)
    assert encoder.position_table() is encoder.vit.pos_embed  # back at the built grid: the parameter itself


def test_a_run_resumes_exactly_before_at_and_after_a_switch(tmp_path):
    def fit(ckpt_path=None) -> L.LightningModule:
        L.seed_everything(0)
        module = micro_module(plugin=AEMIM())
        data = BundledSampleDataModule(
            img_size=32, channels=1, batch_size=8, num_workers=0, pin_memory=False,
            resolution=StepResolution([[0, 24], [1, 32]]),
        )  # fmt: skip
        every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)
        run = trainer(-1, [every_step], enable_checkpointing=True, max_epochs=2, limit_train_batches=3)
        run.fit(module, data, ckpt_path=ckpt_path)
        return module

    straight = fit()
    for step in (2, 3, 4):  # mid-epoch before the switch, at it (epoch 1's first batch), after it
        resumed = fit(tmp_path / f"step={step}.ckpt")
        for name, value in straight.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[name]), (step, name)


QUICKSTART = [  # quickstart_adv_progressive.yaml with the micro ViT, 6 steps per epoch, a checkpoint after every step
    "fit", "-c", "quickstart_adv_progressive.yaml", *MICRO_MAE_FLAGS,
    "--data.init_args.num_workers", "0",
    "--trainer.limit_train_batches", "6",
    "--trainer.limit_val_batches", "0",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--checkpoint.monitor", "null",
    "--checkpoint.save_top_k", "-1",
    "--checkpoint.every_n_train_steps", "1",
]  # fmt: skip


@pytest.mark.long
def test_the_progressive_quickstart_switches_lowers_the_loss_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO):
        straight = run(QUICKSTART)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("img_size")] == [
        "img_size 24 -> 32 at epoch 1"
    ]
    events = EventAccumulator(str(tmp_path / "runs" / "advmim" / "version_0"))
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")]
    assert len(loss) == 12 and sum(loss[-3:]) < 0.75 * sum(loss[:3]), loss
    checkpoints = tmp_path / "runs" / "advmim" / "version_0" / "checkpoints"
    # the export is at the final side, and its metadata and card say how it got there
    run(["export", str(checkpoints / "last.ckpt"), "encoder"])
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert config["advmim"]["resolution"] == {
        "final": 32,
        "schedule": {
            "class_path": "advmim_pl.data.resolution.StepResolution",
            "init_args": {"steps": [[0, 24], [1, 32]], "scale_batch": False},
        },
    }
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32]
    assert "trained with progressive resolution (StepResolution" in (tmp_path / "encoder" / "README.md").read_text()
    final = straight.model.state_dict()
    for step in (4, 7):  # mid-epoch at 24 px; the first step after the switch to 32 px
        (ckpt,) = checkpoints.glob(f"*-{step}.ckpt")
        resumed = run([*QUICKSTART, "--ckpt_path", str(ckpt)]).model.state_dict()
        for name, value in final.items():
            assert torch.equal(value, resumed[name]), (step, name)
