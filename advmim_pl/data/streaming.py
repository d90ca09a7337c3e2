"""Training from litdata shards (``advmim prepare``) in a local folder or object storage, for many nodes.

``StreamingImageDataModule`` is the iterable sibling of ``MapStyleDataModule``: the same options, transforms and
evaluation views (``ImageDataModule``), a litdata ``StreamingDataset`` for training. What it guarantees:

- **Shards under DDP.** litdata gives each rank (and each of its DataLoader workers) its own chunks' samples:
  ranks read disjoint samples. Under DDP it drops the remainder and pads nothing, so every rank trains on the same
  number of full batches, ``floor(floor(N / batch_size) / world_size)`` of them for N samples (split among its
  workers): an epoch is each sample at most once, and all but fewer than ``world_size x batch_size`` exactly once
  (which ones are left out changes with the epoch's shuffle), the bound of the map-style modules too. On one
  process, every sample once, in full batches (``drop_last``).
- **Resumption.** The loader's position is saved by the data module (``state_dict``: Lightning keeps it in the
  checkpoint) as the number of batches the fit loop trained this epoch, not as litdata counts them: Lightning's
  fit loop fetches one batch ahead, and it does not give a ``StreamingDataLoader`` its state back on every resume
  (litdata issue #775), so ``train_dataloader`` restores it itself. A run resumed from a checkpoint written
  mid-epoch or at an epoch's end trains on the batches the uninterrupted run would have, with the same
  augmentation: each sample's crop and flip are drawn from a seed of its own, (global seed, epoch, index), whichever
  worker reads it. Resuming needs the same number of processes, workers and batch size.
- **Corrupt records** are skipped with a warning naming them and replaced by the next readable record, counted in
  ``num_corrupt`` (per process), as the ImageFolder path does.

Training images take the fast path of ``advmim_pl.data.jpeg`` (reduced JPEG decode, uint8 batches converted on the
device); evaluation views and validation decode in full with PIL.
"""

import json
import os
from io import BytesIO
from pathlib import Path
from typing import Any

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request: an offline start does not stall

import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.sampler import ChunkedIndex
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from advmim_pl.data.base import ImageDataModule
from advmim_pl.data.image_folder import first_readable
from advmim_pl.data.jpeg import JpegCropFlip
from advmim_pl.data.prepare import FORMAT, VERSION
from advmim_pl.data.resolution import ResolutionSchedule, announce
from advmim_pl.data.resumable import global_seed, mix
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD

REMOTE = ("s3://", "gs://")
STORE_PACKAGES = {"s3": "boto3", "gs": "google-cloud-storage"}  # the client each object store's reader imports


def open_shards(data_dir: str, arg: str, **options: Any) -> tuple[StreamingDataset, dict]:
    """A StreamingDataset over ``data_dir`` and the ``advmim`` block of its index.json (format, version, classes,
    num_samples); one-line errors for a missing folder, an unreachable or unauthorised URL, another format or
    version."""
    if not data_dir.startswith(REMOTE) and not Path(data_dir, "index.json").is_file():
        raise FileNotFoundError(
            f"{arg} {data_dir!r} holds no index.json: write it with `advmim prepare IMAGEFOLDER {data_dir}`, or name "
            "an s3:// or gs:// URL"
        )
    if data_dir.startswith(REMOTE):
        try:  # litdata's own client retries a failed request 1,000 times: a wrong URL would hang, not fail
            probe_index(data_dir, options.get("storage_options") or {})
        except ImportError as err:  # not a network or credentials problem: say what to install
            package = STORE_PACKAGES[data_dir.split("://", 1)[0]]
            raise ModuleNotFoundError(
                f"{arg} {data_dir!r}: streaming from {data_dir.split('://', 1)[0]}:// needs the {package} package, "
                f"which is not installed ({err}): pip install {package}"
            ) from None
        except Exception as err:  # boto3 and google-cloud-storage raise their own errors for network and credentials
            lines = str(err).strip().splitlines()
            reason = type(err).__name__ + (f": {lines[0]}" if lines else "")
            raise ConnectionError(
                f"{arg} {data_dir!r}: cannot read its index.json ({reason}); check the URL, the network and the "
                "credentials (AWS_* variables or ~/.aws for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://)"
            ) from None
    records = StreamingDataset(data_dir, **options)
    meta = json.loads(Path(records.input_dir.path, "index.json").read_text()).get("advmim", {})
    if (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
        raise ValueError(
            f"{arg} {data_dir!r} holds format {meta.get('format')!r} version {meta.get('version')!r}, but this "
            f"version of advmim_pl reads {FORMAT!r} version {VERSION}: prepare it again with `advmim prepare`"
        )
    return records, meta


def probe_index(url: str, storage_options: dict[str, Any]) -> None:
    """Ask the object store for ``url``/index.json once (two attempts, 10 s to connect); raises the client's error
    when the store is unreachable, the credentials are refused or the file is missing."""
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    key = f"{prefix.rstrip('/')}/index.json" if prefix else "index.json"
    if url.startswith("s3://"):
        import boto3
        from botocore.config import Config

        bounded = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=10, read_timeout=30)
        boto3.client("s3", **{"config": bounded, **storage_options}).head_object(Bucket=bucket, Key=key)
    else:
        from google.cloud import storage  # litdata's gs:// reader needs google-cloud-storage too

        if not storage.Client(**storage_options).bucket(bucket).blob(key).exists(timeout=30):
            raise FileNotFoundError(f"no {key} in bucket {bucket}")


def to_pil(data: bytes, channels: int) -> Image.Image:
    """Encoded image bytes -> a decoded PIL image in RGB (3 channels) or L (1); OSError if unreadable."""
    try:
        with Image.open(BytesIO(data)) as image:
            return image.convert("RGB" if channels == 3 else "L")
    except SyntaxError as err:  # malformed headers
        raise OSError(str(err)) from err


def location(records: StreamingDataset) -> str:
    """The URL (or local folder) a StreamingDataset reads."""
    return records.input_dir.url or records.input_dir.path


def record_name(index: int) -> str:
    """How warnings name a record."""
    return f"record {index}"


class ShardRecords(Dataset):
    """Map-style view of prepared shards: item i is (``transform``(PIL image), class index) of record i, read by
    random access. Serves validation, test and the evaluation views, which replace ``transform``. Unreadable
    records are skipped (``first_readable``) and counted in ``corrupt``."""

    def __init__(self, records: StreamingDataset, size: int, transform: Any, channels: int) -> None:
        self.records, self.transform, self.channels = records, transform, channels
        self.corrupt = torch.zeros(size, dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.corrupt)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return first_readable(index, self.corrupt, self._load, record_name, location(self.records))

    def _load(self, i: int) -> tuple[Any, int]:
        record = self.records[i]
        return self.transform(to_pil(record["image"], self.channels)), int(record["label"])


class ShardStream(StreamingDataset):
    """The training stream: litdata's shuffled, sharded iteration over the records; item (uint8 (channels, S, S)
    from ``crop``, class index), with the crop and flip drawn from the seed (``seed``, epoch, record index).
    Unreadable records are replaced by the next readable one and counted in ``corrupt``."""

    def __init__(
        self,
        data_dir: str,
        crop: JpegCropFlip,
        corrupt: Tensor,
        resolution: ResolutionSchedule | None = None,
        **options: Any,
    ) -> None:
        super().__init__(data_dir, **options)
        self.crop, self.corrupt, self.resolution = crop, corrupt, resolution

    def __getitem__(self, index: ChunkedIndex | int) -> tuple[Tensor, int]:
        first = index.index if isinstance(index, ChunkedIndex) else index
        if self.resolution is not None:  # litdata counts epochs from 1
            self.crop.out_size = self.resolution.size(self.current_epoch - 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix(self.seed, self.current_epoch, first))
            load = lambda i: self._load(index if i == first else i)  # the scheduled read, or a replacement's
            return first_readable(first, self.corrupt, load, record_name, location(self))

    def _load(self, index: ChunkedIndex | int) -> tuple[Tensor, int]:
        record = super().__getitem__(index)
        name = record_name(index.index if isinstance(index, ChunkedIndex) else index)
        return self.crop.from_bytes(record["image"], name), int(record["label"])


class ProgressLoader(StreamingDataLoader):
    """A StreamingDataLoader whose saved position is ``batches_done()`` batches into its epoch (the fit loop's
    count), instead of the batches it handed out, which run one ahead of training under Lightning's prefetch; and
    whose restored position serves the next iteration only. litdata forgets it when an iteration runs to its end,
    but Lightning stops at the epoch's last batch without exhausting the iterator, so the next epoch would replay
    the restored one's end (no batches)."""

    def __init__(self, dataset: ShardStream, batches_done: Any, **kwargs: Any) -> None:
        # a plain int: litdata keeps the batch size in the saved state, and the CLI's jsonargparse PositiveInt there
        # would make the checkpoint one that weights-only reads refuse, so that --ckpt_path could not resume it
        kwargs["batch_size"] = int(kwargs["batch_size"])
        super().__init__(dataset, **kwargs)
        self.batches_done = batches_done
        self._restored = False  # a loaded mid-epoch position that the next iteration starts from

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        super().load_state_dict(obj)
        self._restored = self.restore

    def __iter__(self) -> Any:
        self.restore, self._restored = self._restored, False
        batches = super().__iter__()
        if self.dataset.resolution is None:
            return batches
        return self._announced(batches)

    def _announced(self, batches: Any) -> Any:
        """``batches``, with the resolution schedule's switch line once litdata has started the epoch."""
        for i, batch in enumerate(batches):
            if i == 0:
                announce(self.dataset.resolution, self.current_epoch - 1)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        done = self.batches_done()
        samples = done * self.batch_size
        world = self.dataset.distributed_env.world_size
        state["num_samples_yielded"] = samples
        state["latest_worker_idx"] = (done - 1) % max(self.num_workers, 1)
        state["dataset"] = {**state["dataset"], "num_samples_yielded": samples, "sample_in_epoch": samples * world}
        return state


class StreamingImageDataModule(ImageDataModule):
    """Images prepared by ``advmim prepare`` (litdata chunks of encoded JPEGs and labels), streamed from a local
    folder or an ``s3://`` / ``gs://`` URL, with ImageNet statistics. See the module docstring for what holds
    under DDP, on resume and for corrupt records.

    Args:
        train_dir: prepared training images (folder or URL).
        val_dir: prepared validation images, the same classes; serves validation and test. None: no validation.
        cache_dir: where chunks of a remote ``train_dir``/``val_dir`` are cached (litdata's default if None).
        storage_options: passed to the object-store client (e.g. ``{"endpoint_url": ...}`` for an S3-compatible
            store); credentials come from the environment, as for boto3 / gcsfs.
        kwargs: the shared options of ``ImageDataModule`` (batch_size, img_size, channels, ...).
    """

    dataset_mean = IMAGENET_MEAN
    dataset_std = IMAGENET_STD

    def __init__(
        self,
        train_dir: str,
        val_dir: str | None = None,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if self.resolution is not None and self.resolution.scale_batch:
            raise ValueError(
                "streaming data: the resolution schedule's scale_batch is not supported (litdata's resumable loader "
                "state holds one batch size for the run); use scale_batch: false, or an ImageFolder/in-memory data "
                "module"
            )
        self.train_dir, self.val_dir = train_dir, val_dir
        self.options = {"cache_dir": cache_dir, "storage_options": storage_options or {}}
        self.meta = open_shards(train_dir, "train_dir", **self.options)[1]
        if val_dir is not None:
            val_classes = open_shards(val_dir, "val_dir", **self.options)[1]["classes"]
            if val_classes != self.meta["classes"]:
                raise ValueError(
                    f"val_dir {val_dir!r} must have the classes of train_dir {train_dir!r}: "
                    f"missing {sorted(set(self.meta['classes']) - set(val_classes))}, "
                    f"extra {sorted(set(val_classes) - set(self.meta['classes']))}"
                )
        self.num_classes = len(self.meta["classes"])
        self.corrupt = torch.zeros(self.meta["num_samples"], dtype=torch.bool).share_memory_()
        self._train_loader: ProgressLoader | None = None
        self._resume: dict[str, Any] | None = None  # set by load_state_dict when resuming

    @property
    def num_corrupt(self) -> int:
        """Distinct training records found unreadable so far by this process's training stream and its workers."""
        return int(self.corrupt.sum())

    def setup(self, stage: str | None = None) -> None:
        """Open the shards (under DDP after the process group exists: litdata reads the ranks from it)."""
        if self.train_set is not None:
            return
        records, meta = open_shards(self.train_dir, "train_dir", **self.options)
        self.train_set = ShardRecords(records, meta["num_samples"], self.train_transform(), self.channels)
        if self.val_dir is not None:
            records, meta = open_shards(self.val_dir, "val_dir", **self.options)
            self.val_set = ShardRecords(records, meta["num_samples"], self.eval_transform(), self.channels)
            self.test_set = self.val_set

    def train_dataloader(self) -> ProgressLoader:
        """Shuffled full batches from litdata's shards of this rank, resumed at the restored position once."""
        self.check_workers()
        crop = JpegCropFlip(self.img_size, self.crop_scale, self.hflip, self.channels)
        stream = ShardStream(
            self.train_dir,
            crop,
            self.corrupt,
            self.resolution,
            shuffle=True,
            drop_last=True,
            seed=global_seed(),
            **self.options,
        )
        if self.meta["num_samples"] // stream.distributed_env.world_size < self.batch_size:
            raise ValueError(
                f"{self.meta['num_samples']} training images over {stream.distributed_env.world_size} process(es) "
                f"give fewer than batch_size={self.batch_size} per process; no full batch would be produced"
            )
        # workers are not kept across epochs: a resumed state and the epoch reach them when they start
        self._train_loader = ProgressLoader(stream, self.batches_done, drop_last=True, **self.loader_options())
        if self._resume is not None:
            self._train_loader.load_state_dict(self._resume)
            self._resume = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints by Lightning: the training loader's position (``ProgressLoader.state_dict``) and the
        batch count behind it, (epoch, batches of it taken)."""
        if self._train_loader is None:
            return {}
        return {"loader": self._train_loader.state_dict(), "progress": list(self._progress)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored by Lightning before training starts; the next ``train_dataloader`` starts there."""
        if state_dict:
            self._resume = state_dict["loader"]
            self._progress = tuple(state_dict["progress"])
