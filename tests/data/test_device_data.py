"""Device-resident training data: batched crop/flip against plain resizes, box statistics, and an epoch
through a Lightning Trainer (CPU) with device_resident=True."""

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from advmim_pl.data import BundledSampleDataModule, InMemoryDataModule
from advmim_pl.data.base import resident_on
from advmim_pl.data.device import (
    DeviceBatches,
    crop_resize,
    random_resized_crop_flip,
    sample_crop_boxes,
    to_channels,
)
from advmim_pl.data.resumable import ResumableSampler, TrainingOrder, mix
from tests.helpers.micro import trainer as quiet_trainer


def uint8_images(batch: int, channels: int = 1, height: int = 28, width: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, height, width), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("out_size", [16, 28, 32, 56])
def test_whole_image_crop_equals_plain_resize(mode, out_size):
    images = uint8_images(6, channels=3)
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop_flip(images, out_size, scale=(1, 1), ratio=(1, 1), generator=g, hflip=False, mode=mode)
    x = images.float() / 255
    expected = F.interpolate(x, size=out_size, mode=mode, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    resized = TF.resize(x, [out_size, out_size], interpolation=TF.InterpolationMode(mode), antialias=False)
    torch.testing.assert_close(out, resized.clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width", [(28, 28), (24, 40), (40, 24)])
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0), (0.5, 0.5)])
def test_boxes_within_scale_ratio_and_image(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(4096, height, width, scale, ratio, torch.Generator().manual_seed(1))
    assert boxes.shape == (4096, 4) and boxes.dtype == torch.float32
    top, left, h, w = boxes.unbind(1)
    area = h * w / (height * width)
    aspect = w / h
    tol = 1e-4
    # the largest box of allowed aspect that fits: the whole square image, or 24 x 32 in a 24 x 40 one; it is
    # also torchvision's centred fallback when no candidate fits, the only box allowed outside the scale range
    cap = 1.0 if height == width else 0.8
    in_scale = (area >= scale[0] - tol) & (area <= scale[1] + tol)
    assert bool((in_scale | ((area - cap).abs() < tol)).all())
    assert in_scale.float().mean() > 0.9
    assert aspect.min() >= ratio[0] - tol and aspect.max() <= ratio[1] + tol
    assert top.min() >= -tol and left.min() >= -tol
    assert (top + h).max() <= height + tol and (left + w).max() <= width + tol
    if scale[0] < scale[1]:  # boxes really are random: areas spread over the range, corners move
        assert area.min() < scale[0] + 0.05 and area.max() > min(scale[1], cap) - 0.1
        assert top.std() > 0.5 and left.std() > 0.5


def test_flip_half_the_samples_and_mirrors_the_crop():
    images = uint8_images(256, channels=3)
    flipped = random_resized_crop_flip(images, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(5))
    plain = random_resized_crop_flip(images, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(5), hflip=False)
    same = (flipped - plain).abs().flatten(1).amax(1) < 1e-5
    mirrored = (flipped - plain.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same ^ mirrored).all()), "every sample is either the crop or its mirror, never both"
    assert 0.4 < mirrored.float().mean() < 0.6


def test_crop_resize_flip_argument_mirrors_exactly():
    x = uint8_images(8).float() / 255
    boxes = sample_crop_boxes(8, 28, 28, (0.2, 1.0), generator=torch.Generator().manual_seed(2))
    flip = torch.tensor([True, False] * 4)
    out = crop_resize(x, boxes, 24, flip)
    plain = crop_resize(x, boxes, 24)
    torch.testing.assert_close(out, torch.where(flip.view(-1, 1, 1, 1), plain.flip(-1), plain), atol=1e-5, rtol=0)


def test_output_range_shape_dtype_and_channels():
    images = torch.where(uint8_images(16) > 127, 255, 0).to(torch.uint8)  # hard edges make bicubic overshoot
    out = random_resized_crop_flip(images, 40, (0.08, 1.0), generator=torch.Generator().manual_seed(3))
    assert out.shape == (16, 1, 40, 40) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    grey3 = to_channels(out, 3)
    assert grey3.shape == (16, 3, 40, 40) and torch.equal(grey3[:, 0], grey3[:, 2])
    rgb = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(to_channels(rgb, 1), TF.rgb_to_grayscale(rgb), atol=1e-6, rtol=0)


class Indexed(InMemoryDataModule):
    """50 random grey 28x28 images whose label is their index, so batches reveal which samples they hold."""

    num_classes = 50
    dataset_mean = (0.5,)
    dataset_std = (0.25,)

    def load_splits(self):
        return uint8_images(50), torch.arange(50), uint8_images(10, seed=1), torch.arange(10)


class Recorder(L.LightningModule):
    """Keeps every training batch (epoch, images, labels); learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.batches.append((self.current_epoch, images.clone(), labels.clone()))
        return self.weight * images.mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_two_epochs(seed: int, monkeypatch) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
    dm = Indexed(batch_size=8, num_workers=0, img_size=16, channels=3, device_resident=True)
    module = Recorder()
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(module, datamodule=dm)
    assert isinstance(dm.train_dataloader(), DeviceBatches) and isinstance(dm.val_dataloader(), DataLoader)
    return module.batches


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_device_resident_epochs_through_trainer(monkeypatch):
    batches = fit_two_epochs(3, monkeypatch)
    assert [epoch for epoch, _, _ in batches] == [0] * 6 + [1] * 6  # 50 // 8 full batches per epoch
    for images, labels in ((x, y) for _, x, y in batches):
        assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert labels.dtype == torch.int64 and 0 <= images.min() and images.max() <= 1
        assert torch.equal(images[:, 0], images[:, 1])
    epochs = [torch.cat([y for e, _, y in batches if e == epoch]) for epoch in (0, 1)]
    for seen in epochs:
        assert len(seen.unique()) == 48
    assert not torch.equal(epochs[0], epochs[1]), "each epoch draws a new permutation"

    again = fit_two_epochs(3, monkeypatch)
    for (_, x1, y1), (_, x2, y2) in zip(batches, again, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    other = fit_two_epochs(4, monkeypatch)
    assert not torch.equal(torch.cat([y for _, _, y in other]), torch.cat([y for _, _, y in batches]))


def test_bundled_sample_device_resident_without_trainer():
    dm = BundledSampleDataModule(batch_size=32, num_workers=0, img_size=32, channels=3, device_resident=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 4000 // 32
    images, labels = next(iter(loader))
    assert images.shape == (32, 3, 32, 32) and labels.shape == (32,)
    assert torch.equal(images[:, 0], images[:, 2]) and images.std() > 0.1


def test_auto_is_resident_on_accelerators_only():
    assert [resident_on(torch.device(d), "auto") for d in ("cpu", "cuda", "xla", "mps")] == [False, True, True, True]
    assert resident_on(torch.device("cpu"), True) and not resident_on(torch.device("cuda"), False)
    dm = BundledSampleDataModule(batch_size=32, num_workers=0, img_size=32, channels=1, device_resident="auto")
    dm.setup("fit")
    assert isinstance(dm.train_dataloader(), DataLoader)  # no trainer: the CPU
    with pytest.raises(ValueError, match="device_resident must be true, false or auto, got 'yes'"):
        BundledSampleDataModule(device_resident="yes")


def test_ranks_split_one_permutation():
    images, labels = uint8_images(40), torch.arange(40)
    orders = [TrainingOrder(40, 4, seed=7, rank=r, world_size=2, position=lambda: (0, 0)) for r in (0, 1)]
    shares = [torch.cat([y for _, y in DeviceBatches(images, labels, order, 8, 1, (0.5, 1.0))]) for order in orders]
    assert len(shares[0]) == len(shares[1]) == 20
    assert len(torch.cat(shares).unique()) == 40


@pytest.mark.parametrize("rank", [0, 1])
def test_both_paths_take_one_order_and_resume_at_one_position(rank):
    images, labels = uint8_images(40), torch.arange(40)
    order = TrainingOrder(40, 4, seed=7, rank=rank, world_size=2, position=lambda: (3, 2))  # 2 batches of epoch 3 done
    assert len(order) == 5
    keys = list(ResumableSampler(order))
    device = torch.cat([y for _, y in DeviceBatches(images, labels, order, 8, 1, (0.5, 1.0))])
    assert [index for _, index in keys] == device.tolist()
    # epoch 3's permutation of the 40 samples, this rank's every other one, from the third batch of 4 on
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(mix(7, 3)))
    assert device.tolist() == permutation[rank::2][2 * 4 : 5 * 4].tolist()
    assert [seed for seed, _ in keys] == [mix(7, 3, index) for index in device.tolist()]  # per-sample augmentation


def test_order_epochs_are_new_permutations_split_between_ranks():
    orders = [TrainingOrder(50, 4, seed=1, rank=r, world_size=2, position=lambda: (0, 0)) for r in (0, 1)]
    for epoch in (0, 1):
        shares = [order.batches(epoch) for order in orders]
        assert shares[0].shape == shares[1].shape == (6, 4)  # 25 per rank, 6 full batches
        assert len(torch.cat([share.flatten() for share in shares]).unique()) == 48
    assert not torch.equal(orders[0].batches(0), orders[0].batches(1))


def test_a_position_at_an_epochs_end_is_the_next_epochs_start():
    position = (2, 6)
    order = TrainingOrder(50, 8, seed=0, rank=0, world_size=1, position=lambda: position)
    assert order.start() == (3, 0)  # what checkpoints written after an epoch's last batch by earlier versions hold
    position = (2, 5)
    assert order.start() == (2, 5)
    position = (2, 7)
    with pytest.raises(ValueError, match="7 batches of epoch 2 done, but an epoch has 6"):
        order.start()
    with pytest.raises(ValueError, match="fewer than batch_size=8 per process"):
        TrainingOrder(12, 8, seed=0, rank=0, world_size=2, position=lambda: (0, 0))


@pytest.mark.parametrize("state, epoch, first", [({"epoch": 1, "batches_done": 4}, 1, 4), ({}, 0, 0)])
def test_data_module_resumes_both_paths_at_the_restored_position(state, epoch, first, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    order = TrainingOrder(50, 8, seed=5, rank=0, world_size=1, position=lambda: (0, 0))
    for device_resident in (False, True):
        dm = Indexed(batch_size=8, num_workers=0, img_size=16, channels=1, pin_memory=False,
                     device_resident=device_resident)  # fmt: skip
        dm.setup("fit")
        dm.load_state_dict(state)
        resumed = [y.tolist() for _, y in dm.train_dataloader()]
        assert resumed == order.batches(epoch)[first:].tolist(), f"device_resident={device_resident}"
        # the restored position is used once; without a trainer, later iterations are epoch 0 from its start
        assert [y.tolist() for _, y in dm.train_dataloader()] == order.batches(0).tolist()
