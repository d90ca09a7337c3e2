"""Sharded streaming: ``advmim prepare`` writes every file's bytes and label; ``StreamingImageDataModule`` reads each
sample once per epoch in full batches, gives ranks disjoint shares, resumes mid-epoch and at an epoch's end on the
batches of the uninterrupted run, skips and counts corrupt records, serves the evaluation views, and refuses bad
input in one line.

Every image is one flat colour whose red level names it (8 + 6 x index) and whose green level names its class, so
a batch says which samples it holds whatever the crop.
"""

import io
import json
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import boto3
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from litdata.utilities import env
from PIL import Image

import advmim_pl.data.prepare
from advmim_pl.cli import run
from advmim_pl.data.base import machine_cores
from advmim_pl.data.prepare import VERSION, prepare
from advmim_pl.data.streaming import StreamingImageDataModule
from advmim_pl.eval.extract import evaluation_batches
from tests.helpers.micro import trainer as quiet_trainer
from tests.helpers.recording import RecordBatches

CLASSES, PER_CLASS, BATCH = 3, 12, 4  # 36 images: 9 full batches of 4 on one process


def ids(images: torch.Tensor) -> list[int]:
    """The sample index each image of a batch (uint8 or float in [0, 1]) shows in its red level."""
    red = images[:, 0].float().mean(dim=(1, 2)) * (255 if images.is_floating_point() else 1)
    return ((red - 8) / 6).round().long().tolist()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(ImageFolder root, prepared shards of it), prepared once for the module (litdata's workers take ~20 s)."""
    root = tmp_path_factory.mktemp("imagefolder")
    for index in range(CLASSES * PER_CLASS):
        label = index // PER_CLASS
        pixels = np.empty((40 + index, 56 - index % 7, 3), dtype=np.uint8)
        pixels[...] = (8 + 6 * index, 100 * label, 128)
        (root / f"class{label}").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / f"class{label}" / f"{index:02d}.jpg", quality=95)
    shards = tmp_path_factory.mktemp("shards") / "train"
    assert prepare(str(root), str(shards), num_workers=1) == CLASSES * PER_CLASS
    return root, shards


def module(shards, **kwargs) -> StreamingImageDataModule:
    options = dict(batch_size=BATCH, num_workers=0, img_size=16, pin_memory=False, crop_scale=(0.3, 1.0)) | kwargs
    dm = StreamingImageDataModule(str(shards), **options)
    dm.setup("fit")
    return dm


def test_prepare_writes_every_file_and_its_label(folders):
    root, shards = folders
    dm = module(shards, val_dir=str(shards))
    assert dm.num_classes == CLASSES and len(dm.train_set) == CLASSES * PER_CLASS
    files = {path.read_bytes(): int(path.parent.name.removeprefix("class")) for path in root.rglob("*.jpg")}
    records = [dm.train_set.records[i] for i in range(len(dm.train_set))]
    assert {r["image"]: int(r["label"]) for r in records} == files  # the bytes as on disk, each file once
    meta = json.loads((shards / "index.json").read_text())["advmim"]
    assert meta["version"] == VERSION and meta["classes"] == ["class0", "class1", "class2"]


@pytest.mark.long
@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_reads_every_sample_once_in_full_uint8_batches(folders, workers):
    dm = module(folders[1], num_workers=workers)
    loader = dm.train_dataloader()
    epochs = [[(x, y) for x, y in loader] for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(loader) == 9
        assert all(x.dtype == torch.uint8 and x.shape == (BATCH, 3, 16, 16) for x, _ in batches)
        seen = [i for x, _ in batches for i in ids(x)]
        assert sorted(seen) == list(range(36))
        assert all(y.tolist() == [i // PER_CLASS for i in ids(x)] for x, y in batches)
    assert [ids(x) for x, _ in epochs[0]] != [ids(x) for x, _ in epochs[1]]  # a new shuffle each epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_read_disjoint_shares_of_equal_size(folders, workers, monkeypatch):
    """Two ranks (litdata's view of the process group, as under DDP): disjoint samples, the same number of full
    batches each, floor(floor(36 / 4) / 2) = 4, so 4 samples left out: fewer than world_size x batch_size, the
    docstring's bound."""
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(env._DistributedEnv, "detect", classmethod(lambda cls, r=rank: cls(2, r, 1)))
        loader = module(folders[1], num_workers=workers).train_dataloader()
        batches = [x for x, _ in loader]
        assert len(batches) == len(loader) and all(len(x) == BATCH for x in batches)
        shares.append([i for x in batches for i in ids(x)])
    assert len(shares[0]) == len(shares[1]) == 4 * BATCH
    assert not set(shares[0]) & set(shares[1]) and len(set(shares[0] + shares[1])) == len(shares[0] + shares[1])


def fit(shards, root: Path, workers: int, ckpt_path=None) -> list[torch.Tensor]:
    L.seed_everything(3)
    module_ = RecordBatches()
    checkpoints = [
        ModelCheckpoint(root / "step", "{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(root / "epoch", "{step}", save_on_train_epoch_end=True, save_top_k=-1),
    ]
    trainer = quiet_trainer(max_epochs=2, callbacks=checkpoints, enable_checkpointing=True, default_root_dir=root)
    trainer.fit(module_, datamodule=module(shards, num_workers=workers), ckpt_path=ckpt_path)
    return module_.seen


@pytest.mark.filterwarnings(
    "ignore:The dirpath has changed", "ignore:You're resuming from a checkpoint that ended", "ignore:You passed in a"
)
@pytest.mark.parametrize(
    "workers, checkpoints",
    [(0, ["step/step=4", "step/step=9", "epoch/step=9", "step/step=13"]), (2, ["step/step=6", "epoch/step=9"])],
)
@pytest.mark.long
def test_a_resumed_run_trains_on_the_uninterrupted_runs_batches(folders, tmp_path, workers, checkpoints):
    """Resumed mid-epoch (steps 4, 6, 13) and after an epoch's last batch (step 9, saved at the batch's end and at
    the epoch's end): the remaining batches are the uninterrupted run's, pixel for pixel."""
    straight = fit(folders[1], tmp_path / "straight", workers)
    assert len(straight) == 18 and sorted(i for x in straight[:9] for i in ids(x)) == list(range(36))
    for checkpoint in checkpoints:
        step = int(checkpoint.split("=")[1])
        resumed = fit(folders[1], tmp_path / checkpoint, workers, tmp_path / "straight" / f"{checkpoint}.ckpt")
        assert len(resumed) == 18 - step, checkpoint
        for x, x0 in zip(resumed, straight[step:], strict=True):
            assert torch.equal(x, x0), f"resumed from {checkpoint}"


def test_corrupt_records_are_skipped_warned_and_counted(folders, tmp_path):
    root, shards = folders
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    victim = (root / "class1" / "14.jpg").read_bytes()
    for chunk in broken.glob("*.bin"):  # the record's first bytes (JPEG and JFIF markers) zeroed: no format reads it
        data = chunk.read_bytes()
        if (at := data.find(victim)) >= 0:
            chunk.write_bytes(data[:at] + bytes(16) + data[at + 16 :])
    dm = module(broken)
    with pytest.warns(UserWarning, match="skipping unreadable image record"):
        seen = [i for x, _ in dm.train_dataloader() for i in ids(x)]
    assert dm.num_corrupt == 1 and 14 not in seen and len(seen) == 36
    assert sorted(set(seen)) == [i for i in range(36) if i != 14]  # its place taken by a readable record
    with pytest.warns(UserWarning, match="skipping unreadable image record"):
        views = [i for x, _ in evaluation_batches(dm.train_set, dm.eval_transform(), 8) for i in ids(x)]
    assert 14 not in views and len(views) == 36


def test_evaluation_views_and_validation_read_float_images(folders):
    dm = module(folders[1], val_dir=str(folders[1]))
    x, y = next(iter(evaluation_batches(dm.train_set, dm.eval_transform(), 8, indices=torch.tensor([0, 20, 35]))))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 16, 16) and ids(x) == [0, 20, 35] and y.tolist() == [0, 1, 2]
    val = [b for b in dm.val_dataloader()]
    assert sorted(i for x, _ in val for i in ids(x)) == list(range(36)) and val[0][0].dtype == torch.float32
    assert module(folders[1]).val_dataloader() == []  # no val_dir: no validation


def test_prepare_and_module_refuse_bad_input_in_one_line(folders, tmp_path):
    root, shards = folders
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="class folder 'cat' holds no image file"):
        prepare(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=f"advmim prepare: output_dir '{shards}' is not empty: choose a new folder"):
        run(["prepare", str(root), str(shards)])
    with pytest.raises(FileNotFoundError, match=f"train_dir '{root}' holds no index.json: write it with"):
        StreamingImageDataModule(str(root))
    old = tmp_path / "old"
    shutil.copytree(shards, old)
    index = json.loads((old / "index.json").read_text())
    index["advmim"]["version"] = VERSION + 1
    (old / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"holds format 'advmim-encoded-images' version {VERSION + 1}, but this"):
        StreamingImageDataModule(str(old))
    with pytest.warns(UserWarning, match=f"num_workers={machine_cores() + 1} is more than the {machine_cores()}"):
        module(shards, num_workers=machine_cores() + 1).train_dataloader()


class Refuse(BaseHTTPRequestHandler):
    """An object store that refuses every request, as S3 does for wrong credentials."""

    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self.send_response(403)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_unreachable_or_unauthorised_url_is_one_line(monkeypatch, tmp_path):
    for name, value in [("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "y"), ("AWS_EC2_METADATA_DISABLED", "1")]:
        monkeypatch.setenv(name, value)
    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    refused, closed = f"http://127.0.0.1:{server.server_port}", "http://127.0.0.1:9"
    try:
        for endpoint, reason in [(refused, r"ClientError: An error occurred \(403\)"), (closed, "EndpointConnection")]:
            options = dict(storage_options={"endpoint_url": endpoint, "region_name": "us-east-1"})
            with pytest.raises(ConnectionError, match=f"train_dir 's3://bucket/train': cannot read its index.json "
                               f"\\({reason}") as caught:  # fmt: skip
                StreamingImageDataModule("s3://bucket/train", cache_dir=str(tmp_path), **options)
            assert "\n" not in str(caught.value)
    finally:
        server.shutdown()


def test_gs_without_google_cloud_storage_names_the_package_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "google.cloud", None)  # as if google-cloud-storage were not installed
    monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
    with pytest.raises(ModuleNotFoundError) as caught:
        StreamingImageDataModule("gs://bucket/train", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert message.startswith("train_dir 'gs://bucket/train': streaming from gs:// needs the google-cloud-storage ")
    assert message.endswith(": pip install google-cloud-storage") and "\n" not in message
    assert "credentials" not in message and "network" not in message  # not blamed on the network or credentials
    config = ["-c", "quickstart.yaml", "-c", "data/streaming.yaml", "--data.init_args.train_dir", "gs://bucket/train"]
    with pytest.raises(SystemExit, match=r"invalid configuration: ModuleNotFoundError: .* pip install google-cloud"):
        run(["fit", *config, "--data.init_args.cache_dir", str(tmp_path)])


class FakeS3:
    """The two calls ``advmim prepare`` makes to an s3 client, on objects held in memory."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def get_object(self, Bucket: str, Key: str) -> dict:  # noqa: N803 (boto3's names)
        return {"Body": io.BytesIO(self.objects[(Bucket, Key)])}

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:  # noqa: N803
        self.objects[(Bucket, Key)] = Body


def test_prepare_writes_to_s3_through_litdata_and_tags_the_uploaded_index(folders, monkeypatch, capsys):
    root, shards = folders
    s3, seen = FakeS3(), {}
    litdata_index = {"chunks": [{"filename": "chunk-0-0.bin", "chunk_size": 36}], "config": {"data_format": []}}

    def optimize(fn, inputs, output_dir, **options):  # litdata's optimize, which uploads the chunks and index.json
        seen["output_dir"], seen["labels"] = output_dir, [fn(sample)["label"] for sample in inputs]
        s3.objects[("bucket", "imagenet/train/index.json")] = json.dumps(litdata_index).encode()

    monkeypatch.setattr(advmim_pl.data.prepare, "optimize", optimize)
    monkeypatch.setattr(boto3, "client", lambda service, **kwargs: s3 if service == "s3" else None)
    run(["prepare", str(root), "s3://bucket/imagenet/train/"])

    assert seen["output_dir"] == "s3://bucket/imagenet/train/"  # the URL as given, not made a local path
    assert seen["labels"] == [i // PER_CLASS for i in range(CLASSES * PER_CLASS)]
    index = json.loads(s3.objects[("bucket", "imagenet/train/index.json")])
    assert index["advmim"] == json.loads((shards / "index.json").read_text())["advmim"]  # as a local prepare tags it
    assert {k: v for k, v in index.items() if k != "advmim"} == litdata_index  # litdata's own fields kept
    assert capsys.readouterr().out.strip() == f"wrote {CLASSES * PER_CLASS} images to s3://bucket/imagenet/train/"
    with pytest.raises(SystemExit, match=r"output_dir 'gs://bucket/x': prepare writes to a local folder or an s3://"):
        run(["prepare", str(root), "gs://bucket/x"])


def test_the_streaming_config_builds_the_module(folders):
    data = yaml.safe_load((Path(__file__).parents[2] / "configs" / "data" / "streaming.yaml").read_text())["data"]
    assert data["class_path"] == "advmim_pl.data.StreamingImageDataModule"
    dm = StreamingImageDataModule(**(data["init_args"] | {"train_dir": str(folders[1])}))
    assert dm.num_classes == CLASSES and dm.val_dir is None
