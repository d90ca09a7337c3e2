"""Speed of the frozen-feature evaluation: extraction images/s, and the time of the kNN and logistic-regression fits.

A micro ViT (the study's cpu encoder: 96 wide, 4 blocks, 3 heads, 4-px patches at 32 px; randomly initialised, as
speed does not depend on the weights) on Fashion-MNIST (60,000 training and 10,000 test images), through the
functions ``advmim test -c eval/features.yaml`` runs: both poolings extracted in one pass, then kNN and the
logistic regression (C chosen on a held-out 10%, refit on all) on each pooling. Extraction is timed in fp32 and
under bf16 autocast; the fits use the bf16 features. The total (bf16 extraction + both fits on both poolings) is
the figure the 2-minute budget of a 2-core CPU is about.

    python benchmarks/features_speed.py --threads 2
    python benchmarks/features_speed.py --threads 2 --root /path/to/fashion-mnist --out benchmarks/results

Prints a table and writes benchmarks/results/features_speed_<device>.json and .md with the 1-minute load average
before and after (other processes on a small CPU distort timings: rerun when it is well above the core count).
"""

import argparse
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from provenance import REPO, device_info, git_commit

from advmim_pl.data import FashionMNISTDataModule
from advmim_pl.data.fashion_mnist import DEFAULT_ROOT
from advmim_pl.eval.extract import evaluation_batches, extract, pooled_features
from advmim_pl.eval.floors import random_encoder
from advmim_pl.eval.probes import FeatureSet, ProbeSettings, probe_counts, with_intervals
from advmim_pl.report import ReportTable, write_report

MICRO = dict(embed_dim=96, depth=4, num_heads=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="Fashion-MNIST IDX folder")
    parser.add_argument("--batch-size", type=int, default=1024, help="extraction batch")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for the JSON and Markdown"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()[0]
    data = FashionMNISTDataModule(root=args.root, img_size=32, channels=1, batch_size=args.batch_size, num_workers=0)
    data.setup("test")
    architecture = dict(encoder="vit_tiny_patch16_224", img_size=32, patch_size=4, in_chans=1, mean=data.mean,
                        std=data.std, encoder_kwargs=MICRO, sincos_pos_embed=True)  # fmt: skip
    encoder = random_encoder(architecture, seed=0).to(device).eval()
    transform = data.eval_transform()
    images = len(data.train_set) + len(data.test_set)

    def features(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return pooled_features(encoder, x)

    timings, splits = {}, {}
    for precision in ("fp32", "bf16"):
        autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if precision == "bf16" else nullcontext
        start = time.perf_counter()
        splits = {
            name: extract(features, evaluation_batches(split, transform, args.batch_size), device, autocast)
            for name, split in (("train", data.train_set), ("test", data.test_set))
        }
        timings[f"extract_{precision}_s"] = time.perf_counter() - start
        print(f"extraction {precision}: {images / timings[f'extract_{precision}_s']:.0f} images/s", flush=True)
    train, test = splits["train"], splits["test"]
    settings = ProbeSettings()
    results = {}
    for pooling in ("token", "avg"):
        start = time.perf_counter()
        one = probe_counts(FeatureSet({pooling: train.features[pooling]}, train.labels),
                           FeatureSet({pooling: test.features[pooling]}, test.labels), 10, settings)  # fmt: skip
        timings[f"fits_{pooling}_s"] = time.perf_counter() - start
        results.update(with_intervals(one))
    timings["total_s"] = timings["extract_bf16_s"] + timings["fits_token_s"] + timings["fits_avg_s"]
    load_after = os.getloadavg()[0]
    name, slug = device_info(device)
    commit, dirty = git_commit()
    rows = [
        ("extraction fp32", f"{timings['extract_fp32_s']:.1f} s", f"{images / timings['extract_fp32_s']:.0f} images/s"),
        ("extraction bf16 autocast", f"{timings['extract_bf16_s']:.1f} s",
         f"{images / timings['extract_bf16_s']:.0f} images/s"),
        *((f"kNN + logistic regression, {p}", f"{timings[f'fits_{p}_s']:.1f} s", "") for p in ("token", "avg")),
        ("total (bf16 extraction + fits)", f"{timings['total_s']:.1f} s", ""),
    ]  # fmt: skip
    heading = (f"{images:,} Fashion-MNIST images, micro ViT {MICRO}, {name}; load average {load_before:.1f} -> "
               f"{load_after:.1f}")  # fmt: skip
    record = {
        "device": name,
        "threads": torch.get_num_threads(),
        "commit": commit,
        "dirty": dirty,
        "images": images,
        "encoder": {"encoder": "vit_tiny_patch16_224", **MICRO, "patch_size": 4, "img_size": 32},
        "load_average_1min": [load_before, load_after],
        "timings": timings,
        "images_per_s": {p: images / timings[f"extract_{p}_s"] for p in ("fp32", "bf16")},
        "results": results,
        "versions": {"torch": torch.__version__},
    }
    table = ReportTable(["step", "time", "rate"], [list(row) for row in rows], align="lrr")
    path = write_report(args.out, f"features_speed_{slug}", [table], record, heading=heading)
    print(f"\nwrote {path} and .json")


if __name__ == "__main__":
    main()
