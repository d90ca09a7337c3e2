"""``advmim prepare``: an ImageFolder (root/class_x/img.jpg) as litdata chunks for ``StreamingImageDataModule``.

Each record holds a file's encoded bytes as they are on disk (JPEG for ImageNet; no re-encoding, so no quality is
lost and a chunk is as large as the files) and its class index. litdata's ``optimize`` reads the files in
parallel worker processes, shows a progress bar and writes the chunks and their ``index.json``; the format's name,
version and the class names go into that ``index.json`` under ``"advmim"``, which the data module checks.

The output is a local folder or an ``s3://bucket/prefix`` URL: litdata's ``optimize`` uploads the chunks itself, and
the ``advmim`` block is then added to the uploaded ``index.json`` with boto3 (credentials from the environment, as
for the AWS CLI). A local folder can be uploaded as it is later (e.g. ``aws s3 sync out/ s3://bucket/train``).
"""

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # litdata would ask PyPI for a newer version

from jsonargparse.typing import PositiveInt
from litdata import optimize
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from advmim_pl.data.image_folder import check_class_folders, check_image_root

FORMAT = "advmim-encoded-images"
VERSION = 1  # bump when a record's fields change; readers refuse other versions


def read_record(sample: tuple[str, int]) -> dict:
    """One record: the file's bytes (``image``) and its class index (``label``)."""
    path, label = sample
    return {"image": Path(path).read_bytes(), "label": label}


def prepare(root: str, output_dir: str, num_workers: PositiveInt | None = None, chunk_bytes: str = "64MB") -> int:
    """Write the images of the ImageFolder ``root`` as litdata chunks of at most ``chunk_bytes`` into the new or
    empty local folder or ``s3://`` URL ``output_dir`` (litdata checks that the URL is empty), read by
    ``num_workers`` processes (default: every core); returns the number of records. A class folder without an image
    file is an error naming it, as for ``ImageFolderDataModule``; another URL scheme is a ValueError."""
    remote = "://" in output_dir
    if remote and not output_dir.startswith("s3://"):
        raise ValueError(
            f"output_dir {output_dir!r}: prepare writes to a local folder or an s3:// URL; for another store, prepare "
            "a local folder and upload it with the store's own tool"
        )
    classes = check_image_root(root, "root")
    check_class_folders(root, classes, "root")
    out = Path(output_dir)
    if not remote and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output_dir {output_dir!r} is not empty: choose a new folder")
    samples = make_dataset(root, {name: i for i, name in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    optimize(
        fn=read_record,
        inputs=samples,
        output_dir=output_dir if remote else str(out.resolve()),
        chunk_bytes=chunk_bytes,
        num_workers=num_workers or os.cpu_count() or 1,
        keep_data_ordered=True,
    )
    block = {"format": FORMAT, "version": VERSION, "classes": classes, "num_samples": len(samples)}
    if remote:
        tag_s3_index(output_dir, block)
    else:
        index = json.loads((out / "index.json").read_text())
        (out / "index.json").write_text(json.dumps(index | {"advmim": block}))
    return len(samples)


def tag_s3_index(url: str, block: dict) -> None:
    """Add ``block`` under ``"advmim"`` to the ``index.json`` that litdata uploaded to ``url`` (``s3://bucket/prefix``),
    with boto3's default credentials."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    key = f"{prefix.strip('/')}/index.json" if prefix.strip("/") else "index.json"
    s3 = boto3.client("s3")
    index = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(index | {"advmim": block}).encode())


def main(argv: list[str]) -> None:
    """``advmim prepare ROOT OUTPUT_DIR [--num-workers N] [--chunk-bytes 64MB]``; errors are one line."""
    parser = argparse.ArgumentParser(
        prog="advmim prepare",
        description="Write an ImageFolder (ROOT/class_x/img.jpg) as litdata chunks for StreamingImageDataModule.",
    )
    parser.add_argument("root", help="ImageFolder root: one subfolder per class")
    parser.add_argument("output_dir", help="new or empty local folder, or s3://bucket/prefix URL, for the chunks")
    parser.add_argument("--num-workers", type=int, default=None, help="reader processes (default: every core)")
    parser.add_argument("--chunk-bytes", default="64MB", help="largest chunk size (default: 64MB)")
    args = parser.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 1:
        parser.error(f"--num-workers must be >= 1, got {args.num_workers}")
    try:
        count = prepare(args.root, args.output_dir, args.num_workers, args.chunk_bytes)
    except (OSError, ValueError) as err:
        raise SystemExit(f"advmim prepare: {err}") from None
    except Exception as err:  # boto3's and litdata's errors for the network and the credentials of an s3:// URL
        if "://" not in args.output_dir:
            raise
        lines = str(err).strip().splitlines()
        raise SystemExit(
            f"advmim prepare: writing to {args.output_dir!r} failed ({type(err).__name__}"
            f"{': ' + lines[0] if lines else ''}); check the URL, the network and the credentials"
        ) from None
    print(f"wrote {count} images to {args.output_dir}")
