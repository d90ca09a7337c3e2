"""The ImageFolder fast path (decode: fast): crop-box distribution against torchvision's RandomResizedCrop, pixel
error of the reduced decode against a full-resolution one, uint8 batches converted on the device, resumption,
and bad input."""

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from sklearn.datasets import load_sample_image
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from advmim_pl.data import ImageFolderDataModule
from advmim_pl.data import jpeg as J
from advmim_pl.data.base import machine_cores
from advmim_pl.eval.extract import evaluation_batches
from tests.helpers.micro import trainer as quiet_trainer
from tests.helpers.recording import RecordBatches

SCALE = (0.2, 1.0)
DRAWS = 4000
# two-sample KS critical value at p = 0.001 for 4,000 draws each: 1.95 * sqrt(2 / 4000) = 0.0436
KS_TOLERANCE = 0.0436


def photo(name: str = "china.jpg", size: tuple[int, int] | None = None) -> np.ndarray:
    """A natural photograph (scikit-learn's bundled samples, 427 x 640) as RGB uint8 (H, W, 3), optionally resized
    to size (w, h)."""
    image = Image.fromarray(load_sample_image(name))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS) if size else image)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_folder(root: Path, count: int = 24, classes: int = 2, size: tuple[int, int] = (120, 90)) -> list[Path]:
    """``count`` JPEG crops of a photograph, w x h = ``size``, in ``classes`` class folders."""
    source = photo()
    paths = []
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        top, left = 7 * i, 11 * i
        crop = Image.fromarray(source[top : top + 300, left : left + 400]).resize(size)
        path = folder / f"{i:03d}.jpg"
        crop.save(path, quality=85)
        paths.append(path)
    return paths


def box_features(boxes: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T.astype(float)
    return {
        "area": h * w / (height * width),
        "log_aspect": np.log(w / h),
        "top": np.where(height > h, top / np.maximum(height - h, 1), 0.5),
        "left": np.where(width > w, left / np.maximum(width - w, 1), 0.5),
    }


@pytest.mark.parametrize(("height", "width"), [(350, 400), (224, 224), (90, 600)])
def test_crop_box_distribution_matches_random_resized_crop(height, width):
    """Area fraction, aspect ratio and placement of ``crop_box`` draws against independent draws of torchvision's
    ``RandomResizedCrop.get_params`` (other seeds): two-sample KS statistic below the p = 0.001 critical value.
    (90, 600) has aspect 6.7, outside (3/4, 4/3): most draws fail and take the centred fallback."""
    generator = torch.Generator().manual_seed(1)
    ours = np.array([J.crop_box(height, width, SCALE, generator=generator) for _ in range(DRAWS)])
    torch.manual_seed(2)
    image = torch.empty(3, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(SCALE), [3 / 4, 4 / 3]) for _ in range(DRAWS)])
    a, b = box_features(ours, height, width), box_features(theirs, height, width)
    for key in a:
        statistic = ks_2samp(a[key], b[key]).statistic
        assert statistic < KS_TOLERANCE, f"{key}: KS {statistic:.4f}"
    assert (ours[:, 2] <= height).all() and (ours[:, 3] <= width).all() and (ours[:, :2] >= 0).all()
    assert ((ours[:, 0] + ours[:, 2]) <= height).all() and ((ours[:, 1] + ours[:, 3]) <= width).all()


def test_crop_box_fallback_equals_torchvision():
    """An image no candidate fits (area range above the image after rounding): the same centred box."""
    image = torch.empty(3, 1, 500)
    torch.manual_seed(0)
    expected = T.RandomResizedCrop.get_params(image, [0.9, 1.0], [3 / 4, 4 / 3])
    assert J.crop_box(1, 500, (0.9, 1.0)) == tuple(expected)


@pytest.mark.parametrize(
    ("side", "out_size", "factor"),
    [(300, 224, 1), (895, 224, 1), (896, 224, 2), (1791, 224, 2), (1792, 224, 4), (3583, 224, 4), (3584, 224, 8),
     (100_000, 224, 8), (447, 112, 1), (448, 112, 2), (895, 112, 2), (896, 112, 4), (1792, 112, 8), (256, 128, 1),
     (512, 128, 2), (1024, 128, 4), (2048, 128, 8)],
)  # fmt: skip
def test_decode_factor_at_its_boundaries(side, out_size, factor):
    """The factor switches where the shorter side of the box reaches 2 x factor x out_size, for either side."""
    assert J.decode_factor(side, side + 500, out_size) == factor
    assert J.decode_factor(side + 500, side, out_size) == factor


def test_decode_factor_is_the_largest_that_keeps_a_2x_margin():
    """Over random boxes and output sides: after the reduction the box's shorter side is still at least
    2 x out_size, and the next factor up (up to 8) would have left less."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w, out = int(rng.integers(16, 6000)), int(rng.integers(16, 6000)), int(rng.integers(8, 300))
        factor = J.decode_factor(h, w, out)
        assert factor in (1, 2, 4, 8)
        assert factor == 1 or min(h, w) / factor >= 2 * out
        assert factor == 8 or min(h, w) / (2 * factor) < 2 * out


# Mean absolute error (levels of 255) of the fast path against a full-resolution decode of the same box, per decode
# factor. Measured on the cases below: under 0.05 at factor 1 (the decoders' rounding), 0.8-1.9 at factor 2, 1.2-1.9
# at factor 4 and 1.1 at factor 8 (the reduced DCT's blur and the box rounded to the reduced grid), each with its 2x
# margin; with half the margin a mean of 3.4-4.1 (benchmarks/results/input_pipeline_cpu-2core_lowres.md).
MAE_TOLERANCE = {1: 0.5, 2: 2.5, 4: 2.5, 8: 2.5}


@pytest.mark.parametrize(
    ("name", "size", "out_size", "factors"),
    [
        ("china.jpg", None, 224, {1}),
        ("china.jpg", (2400, 1602), 224, {1, 2}),
        ("flower.jpg", (2000, 1335), 224, {1, 2}),
        ("china.jpg", (2400, 1602), 112, {2, 4}),
        ("flower.jpg", (4000, 2670), 112, {4, 8}),
    ],
)
def test_reduced_decode_close_to_full_resolution(name, size, out_size, factors):
    """The fast path's output against a full-resolution PIL decode of the same file, cropped to the same box and
    resized with the same filter and flip: mean absolute pixel error within MAE_TOLERANCE at each decode factor
    the crops take (``factors``: 1 and 2 at 224 px, 2, 4 and 8 at 112 px from photographs of 2,400 and 4,000 px)."""
    data = jpeg_bytes(photo(name, size))
    full = torch.from_numpy(np.array(Image.open(BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    transform = J.JpegCropFlip(out_size, SCALE)
    errors: dict[int, list[float]] = {}
    for seed in range(40):
        torch.manual_seed(seed)
        fast = transform.from_jpeg(data)
        torch.manual_seed(seed)
        (top, left, h, w), flip = transform.draws(*full.shape[1:])
        ref = TF.resized_crop(full, top, left, h, w, [out_size] * 2, TF.InterpolationMode.BICUBIC, antialias=True)
        ref = TF.horizontal_flip(ref) if flip else ref
        assert fast.dtype == torch.uint8 and fast.shape == ref.shape == (3, out_size, out_size)
        errors.setdefault(J.decode_factor(h, w, out_size), []).append((fast.float() - ref.float()).abs().mean().item())
    assert set(errors) == factors
    for factor, values in errors.items():
        assert np.mean(values) < MAE_TOLERANCE[factor], f"factor {factor}: mean abs error {np.mean(values):.2f}"


def test_pil_draft_decoder_agrees_with_simplejpeg():
    data = jpeg_bytes(photo(size=(1280, 854)))
    for factor in (1, 2, 4, 8):
        a = J.decode_reduced(data, factor, 3, "simplejpeg")
        b = J.decode_reduced(data, factor, 3, "pil")
        assert a.shape == b.shape == (3, -(-854 // factor), -(-1280 // factor))
        assert (a.float() - b.float()).abs().mean() < 1.0


def fast_module(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(decode="fast", img_size=32, batch_size=4, num_workers=0, crop_scale=(0.3, 1.0)) | kwargs
    dm = ImageFolderDataModule(str(root), str(root), **options)
    dm.setup("fit")
    return dm


def test_fast_batches_uint8_then_float_on_device(tmp_path):
    jpeg_folder(tmp_path)
    dm = fast_module(tmp_path)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    x, y = dm.on_after_batch_transfer([images, labels], 0)
    assert x.dtype == torch.float32 and torch.equal(x, images.float() / 255) and y is labels
    # validation and the evaluation callbacks (KNNMonitor, features, robustness read the datasets with
    # eval_transform) get float32 [0, 1] images whatever the training path
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.dtype == torch.float32 and 0 <= val_images.min() and val_images.max() <= 1
    bank, _ = next(iter(evaluation_batches(dm.train_set, dm.eval_transform(), 8)))
    assert bank.dtype == torch.float32 and bank.shape == (8, 3, 32, 32)
    grey = fast_module(tmp_path, channels=1)
    assert next(iter(grey.train_dataloader()))[0].shape == (4, 1, 32, 32)


def test_trainer_steps_receive_float_images(tmp_path):
    jpeg_folder(tmp_path)
    dm = fast_module(tmp_path)
    module = RecordBatches()
    quiet_trainer(3).fit(module, datamodule=dm)
    assert len(module.seen) == 3
    for x in module.seen:
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(x, (x * 255).round() / 255)  # uint8 levels: converted after the batch was made


def test_resumed_run_reads_the_same_batches(tmp_path):
    """Mid-epoch resumption at (epoch 1, 2 batches done) yields the uninterrupted epoch's remaining batches,
    identical pixels (each sample's crop and flip come from its own seed), with 0 or 2 worker processes."""
    jpeg_folder(tmp_path)
    full = fast_module(tmp_path)
    full.load_state_dict({"epoch": 1, "batches_done": 0})
    uninterrupted = list(full.train_dataloader())
    for workers in (0, 2):
        resumed = fast_module(tmp_path, num_workers=workers)
        resumed.load_state_dict({"epoch": 1, "batches_done": 2})
        batches = list(resumed.train_dataloader())
        assert len(batches) == len(uninterrupted) - 2 == 4
        for (x, y), (x0, y0) in zip(batches, uninterrupted[2:], strict=True):
            assert torch.equal(x, x0) and torch.equal(y, y0)
    other = fast_module(tmp_path)
    other.load_state_dict({"epoch": 2, "batches_done": 0})
    assert not torch.equal(next(iter(other.train_dataloader()))[0], uninterrupted[0][0])


def test_empty_class_folder_is_named(tmp_path):
    jpeg_folder(tmp_path / "train")
    (tmp_path / "train" / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="class folder 'empty_class' holds no image file"):
        ImageFolderDataModule(str(tmp_path / "train"), decode="fast")


def test_non_jpeg_falls_back_to_pil_with_a_warning(tmp_path):
    paths = jpeg_folder(tmp_path, count=8)
    png = paths[0].with_suffix(".png")
    Image.open(paths[0]).save(png)
    paths[0].unlink()
    dm = fast_module(tmp_path, batch_size=8)
    with pytest.warns(UserWarning, match=f"{png}: not a JPEG; decoding it in full with PIL"):
        images, _ = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
    assert dm.train_set.num_corrupt == 0


def test_truncated_jpeg_is_skipped_on_the_fast_path(tmp_path):
    paths = jpeg_folder(tmp_path, count=8)
    paths[3].write_bytes(paths[3].read_bytes()[:300])
    dm = fast_module(tmp_path, batch_size=8)
    with pytest.warns(UserWarning, match=f"skipping unreadable image {paths[3]}"):
        images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and dm.train_set.num_corrupt == 1


def test_too_many_workers_warn(tmp_path):
    jpeg_folder(tmp_path)
    dm = fast_module(tmp_path, num_workers=machine_cores() + 1)
    with pytest.warns(UserWarning, match=f"num_workers={machine_cores() + 1} is more than the {machine_cores()}"):
        dm.train_dataloader()


def test_unknown_decode_is_refused(tmp_path):
    jpeg_folder(tmp_path)
    with pytest.raises(ValueError, match="decode must be pil or fast, got 'turbo'"):
        ImageFolderDataModule(str(tmp_path), decode="turbo")
