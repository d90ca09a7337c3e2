"""Data modules: batch contract, Fashion-MNIST reading, bundled sample, corrupt files, argument checks."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from advmim_pl.data import (
    BundledSampleDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
)
from advmim_pl.data.fashion_mnist import DEFAULT_ROOT, SAMPLE_PATH, load_fashion_mnist, read_idx

REPO = Path(__file__).resolve().parents[2]
needs_fashion_mnist = pytest.mark.skipif(
    not Path(DEFAULT_ROOT, "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)",
)
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def make_image_folder(root: Path) -> list[Path]:
    """Two classes of 16x24 solid-colour images under root: 3 PNGs in 'a', 2 JPEGs in 'b'."""
    paths = []
    for i, colour in enumerate(COLOURS):
        folder = root / ("a" if i < 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.{'png' if i < 3 else 'jpg'}"
        Image.new("RGB", (24, 16), colour).save(path)
        paths.append(path)
    return paths


def check_batch(batch: tuple[torch.Tensor, torch.Tensor], dm: ImageDataModule, batch_size: int) -> None:
    images, labels = batch
    assert images.shape == (batch_size, dm.channels, dm.img_size, dm.img_size)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == (batch_size,)
    assert 0 <= images.min() and images.max() <= 1
    assert 0 <= labels.min() and labels.max() < dm.num_classes
    assert len(dm.mean) == len(dm.std) == dm.channels


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: SyntheticDataModule(num_samples=32, num_val_samples=10, **kw),
        lambda **kw: BundledSampleDataModule(**kw),
        pytest.param(lambda **kw: FashionMNISTDataModule(limit_train=64, **kw), marks=needs_fashion_mnist),
    ],
    ids=["synthetic", "bundled", "fashion_mnist"],
)
def test_batches(make, channels):
    dm = make(batch_size=8, num_workers=0, img_size=32, channels=channels)
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), dm, 8)
    check_batch(next(iter(dm.val_dataloader())), dm, 8)
    check_batch(next(iter(dm.test_dataloader())), dm, 8)


def test_loaders_drop_last_only_for_training():
    dm = SyntheticDataModule(num_samples=20, num_val_samples=20, batch_size=8, num_workers=0, img_size=8)
    dm.setup("fit")
    assert [len(x) for x, _ in dm.train_dataloader()] == [8, 8]
    assert [len(x) for x, _ in dm.val_dataloader()] == [8, 8, 4]


def test_grey_replicated_to_identical_channels():
    dm = BundledSampleDataModule(batch_size=4, num_workers=0, img_size=32, channels=3)
    dm.setup("fit")
    for images, _ in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
        assert images.std() > 0.1
    assert dm.mean == (0.2860,) * 3 and dm.std == (0.3530,) * 3


def test_eval_transform_keeps_native_pixels():
    """At native size the val images are the stored bytes / 255."""
    dm = BundledSampleDataModule(batch_size=5, num_workers=0, img_size=28, channels=1)
    dm.setup("validate")
    images, labels = next(iter(dm.val_dataloader()))
    with np.load(SAMPLE_PATH) as sample:
        expected = torch.from_numpy(sample["val_images"][:5]).float().unsqueeze(1) / 255
        assert torch.equal(labels, torch.from_numpy(sample["val_labels"][:5]).long())
    assert torch.allclose(images, expected)


def test_eval_crop_ratio_resizes_then_takes_the_centre():
    """ImageNet's protocol at small scale: resize 28 -> 32 (28 / 0.875), then the centre 28 x 28."""
    cropped = BundledSampleDataModule(batch_size=5, num_workers=0, img_size=28, channels=1, eval_crop_ratio=0.875)
    cropped.setup("validate")
    images = next(iter(cropped.val_dataloader()))[0]
    with np.load(SAMPLE_PATH) as sample:
        stored = torch.from_numpy(sample["val_images"][:5]).unsqueeze(1)
    resized = TF.resize(stored, [32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(images, resized[..., 2:30, 2:30].float() / 255)
    with pytest.raises(ValueError, match="eval_crop_ratio must be in"):
        BundledSampleDataModule(eval_crop_ratio=1.2)


@needs_fashion_mnist
def test_idx_reader_matches_raw_bytes_and_known_counts():
    test_images = read_idx(Path(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz"))
    with gzip.open(Path(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    assert test_images.shape == (10000, 28, 28)
    assert test_images.tobytes() == raw[16:]
    images, labels = load_fashion_mnist(DEFAULT_ROOT, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10


@needs_fashion_mnist
def test_uncompressed_idx_and_limit_train(tmp_path):
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(Path(DEFAULT_ROOT, f"{name}.gz")) as f:
            (tmp_path / name).write_bytes(f.read())
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).symlink_to(Path(DEFAULT_ROOT, name))
    dm = FashionMNISTDataModule(root=str(tmp_path), limit_train=100, batch_size=10, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 100 and len(dm.val_set) == len(dm.test_set) == 10000


def test_bundled_sample_small_and_balanced():
    assert SAMPLE_PATH.stat().st_size <= 4_000_000
    with np.load(SAMPLE_PATH) as sample:
        assert sample["train_images"].shape == (4000, 28, 28) and sample["val_images"].shape == (1000, 28, 28)
        assert sample["train_images"].dtype == sample["val_images"].dtype == np.uint8
        assert np.bincount(sample["train_labels"]).tolist() == [400] * 10
        assert np.bincount(sample["val_labels"]).tolist() == [100] * 10


@needs_fashion_mnist
def test_regeneration_script_reproduces_sample():
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "scripts/make_fashion_mnist_sample.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    arrays = script.make_sample(DEFAULT_ROOT)
    with np.load(SAMPLE_PATH) as sample:
        assert sorted(sample.files) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(sample[key], value)


def test_synthetic_is_deterministic_and_learnable():
    def splits(seed):
        return SyntheticDataModule(num_samples=200, num_val_samples=100, seed=seed).load_splits()

    first = splits(0)
    assert all(torch.equal(a, b) for a, b in zip(first, splits(0), strict=True))
    assert not torch.equal(first[0], splits(1)[0])
    train_x, train_y, val_x, val_y = (t.float().flatten(1) if t.ndim == 4 else t for t in first)
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(val_x, centroids).argmin(1) == val_y).float().mean()
    assert accuracy > 0.8


def test_missing_fashion_mnist_root_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nowhere"), num_workers=0)


@pytest.mark.parametrize("arg", ["train_root", "val_root"])
def test_missing_image_folder_root_names_path(tmp_path, arg):
    make_image_folder(tmp_path / "train")
    roots = {"train_root": str(tmp_path / "train"), "val_root": str(tmp_path / "train"), arg: "/no/such/dir"}
    with pytest.raises(FileNotFoundError, match=f"{arg} '/no/such/dir'.*class_x/img1.jpg"):
        ImageFolderDataModule(**roots)


def test_image_folder_val_classes_must_match(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "val")
    (tmp_path / "val" / "c").mkdir()
    with pytest.raises(ValueError, match=r"extra \['c'\]"):
        ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"))


def test_image_folder_skips_truncated_image(tmp_path):
    paths = make_image_folder(tmp_path / "train")
    bad = paths[3]  # a JPEG in class 'b'
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "train"), img_size=8, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 2 and dm.mean == (0.485, 0.456, 0.406)
    with pytest.warns(UserWarning, match=str(bad)) as record:
        batches = list(dm.val_dataloader())
        batches += list(dm.val_dataloader())  # the flagged file is neither read nor reported again
    assert len([w for w in record if str(bad) in str(w.message)]) == 1
    assert dm.val_set.num_corrupt == 1
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (10, 3, 8, 8)
    colours = {tuple(round(v) for v in (img.mean((1, 2)) * 255).tolist()) for img in images}
    assert len(colours) == 4  # every valid image, the bad one replaced by its successor
    assert labels.tolist()[:5] == [0, 0, 0, 1, 1]


def test_image_folder_grey_and_no_val(tmp_path):
    make_image_folder(tmp_path / "train")
    dm = ImageFolderDataModule(str(tmp_path / "train"), batch_size=4, num_workers=0, img_size=16, channels=1)
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), dm, 4)
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"img_size": -4}, "img_size"),
        ({"channels": 2}, "channels"),
        ({"crop_scale": (0.0, 1.0)}, "crop_scale"),
        ({"crop_scale": (0.8, 0.5)}, "crop_scale"),
        ({"crop_scale": (0.5, 1.5)}, "crop_scale"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_classes": 1}, "num_classes"),
        ({"normalize_mean": (0.5,)}, "normalize_mean"),
        ({"normalize_mean": (0.5,), "normalize_std": (0.2, 0.2)}, "normalize_mean"),
        ({"normalize_mean": (0.5,), "normalize_std": (0.0,)}, "normalize_std"),
    ],
)
def test_invalid_arguments_raise(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        SyntheticDataModule(**kwargs)


def test_invalid_limit_train_and_small_train_set():
    with pytest.raises(ValueError, match="limit_train"):
        FashionMNISTDataModule(limit_train=0)
    dm = SyntheticDataModule(num_samples=4, batch_size=8, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="batch_size=8"):
        dm.train_dataloader()


def test_mean_and_std_replace_the_dataset_statistics_and_reach_the_model():
    own = BundledSampleDataModule(channels=3)
    assert own.mean == (0.2860,) * 3
    replaced = BundledSampleDataModule(channels=3, normalize_mean=(0.1,), normalize_std=(0.4,))
    assert (replaced.mean, replaced.std) == ((0.1,) * 3, (0.4,) * 3)
    assert BundledSampleDataModule(
        channels=1, normalize_mean=(0.3, 0.6, 0.9), normalize_std=(0.1,) * 3
    ).mean == pytest.approx((0.2989 * 0.3 + 0.587 * 0.6 + 0.114 * 0.9,))
