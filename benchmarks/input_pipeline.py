"""Input-pipeline throughput: training images/s per worker process of each ImageFolder data path, with a per-stage
profile, on ImageNet-like JPEGs built once from the natural photographs shipped in scikit-image and foolbox.

Pipelines (each a DataLoader over the same files, batch 64, the same random-resized-crop 224 px, scale
(0.2, 1), bicubic, and flip):

- ``reference``: torchvision's ImageFolder with its PIL loader and the classic transforms
  (``RandomResizedCrop(224, (0.2, 1), BICUBIC)``, ``RandomHorizontalFlip``, ``ToTensor``: float32 out);
- ``shipped``: ``ImageFolderDataModule(decode="pil")``'s training loader (PIL decode, torchvision v2 on tensors,
  float32 out);
- ``fast``: ``ImageFolderDataModule(decode="fast")``'s training loader (reduced JPEG decode, crop then resize,
  uint8 out; the float conversion happens on the device and is not timed here);
- ``streaming``: ``StreamingImageDataModule``'s training loader over the same files as litdata chunks (``advmim
  prepare``, built once beside them): the fast path's decode from records instead of files, uint8 out.

    python benchmarks/input_pipeline.py                      # build the images (once), measure, write results
    python benchmarks/input_pipeline.py --workers 1,2,4,8    # on a machine with more cores

The images are built under ``.cache/input_pipeline`` (ignored by git). Results go to
``benchmarks/results/input_pipeline_<machine>.{json,md}``.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from provenance import git_commit
from torch.utils.data import DataLoader, default_collate
from torchvision import datasets
from torchvision import transforms as T

from advmim_pl.data import ImageFolderDataModule, StreamingImageDataModule
from advmim_pl.data import jpeg as J
from advmim_pl.data.prepare import prepare
from advmim_pl.report import ReportTable, write_report

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "input_pipeline"
SIZE, SCALE = 224, (0.2, 1.0)
# Reference training rates on one H200 (MAE ViT-B/16, 224 px; AEMIM with the plug-in's defaults), images/s
ANCHORS = {"MAE eager": 3543, "MAE compiled": 4853, "MAE+AEMIM": 1448}
SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
SKIMAGE_PHOTOS += ["motorcycle_right.png", "hubble_deep_field.jpg"]


# ---- the images ------------------------------------------------------------------------------------------------
def package_data(package: str) -> Path:
    """The data folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install -e '.[bench]' (the benchmark's photographs)")
    return Path(spec.submodule_search_locations[0]) / "data"


def source_photos() -> list[np.ndarray]:
    """RGB uint8 (H, W, 3) natural photographs: scikit-image's colour photographs and foolbox's ImageNet samples."""
    paths = [package_data("skimage") / name for name in SKIMAGE_PHOTOS]
    paths += sorted(package_data("foolbox").glob("imagenet_*.jpg"))
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def build_images(root: Path, count: int, classes: int = 10, seed: int = 0) -> dict:
    """``count`` JPEGs in ``classes`` class folders under ``root``, with ImageNet-like statistics.

    Each is a random crop of a source photograph (35-100% of its area) at a random aspect (85% landscape
    w/h in [1.1, 1.6], 15% portrait in [0.65, 0.9]), resized (Lanczos) to a width of 400 x exp(N(0, 0.2)) px,
    given sensor-like Gaussian noise (sigma 22 levels: the sources are cleaner and smoother than ImageNet's
    photographs, and without it the files are half ImageNet's size), and encoded at quality 75-95, half with 4:2:0
    chroma subsampling and half 4:4:4. Returns the statistics of what it wrote.
    """
    sources = source_photos()
    rng = np.random.default_rng(seed)
    for i in range(count):
        source = sources[rng.integers(len(sources))]
        height, width = source.shape[:2]
        low, high = (1.1, 1.6) if rng.random() < 0.85 else (0.65, 0.9)  # landscape or portrait
        aspect = math.exp(rng.uniform(math.log(low), math.log(high)))
        area = rng.uniform(0.35, 1.0) * height * width
        ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if ch > height:
            ch, cw = height, round(height * aspect)
        if cw > width:
            ch, cw = round(width / aspect), width
        top, left = rng.integers(0, height - ch + 1), rng.integers(0, width - cw + 1)
        out_w = round(400 * math.exp(rng.normal(0, 0.2)))
        out_h = round(out_w / aspect)
        crop = Image.fromarray(source[top : top + ch, left : left + cw]).resize(
            (out_w, out_h), Image.Resampling.LANCZOS
        )
        pixels = np.asarray(crop).astype(np.float32) + rng.normal(0, 22, (out_h, out_w, 3))
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.jpg"
        quality, subsampling = int(rng.integers(75, 96)), int(rng.choice([0, 2]))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=quality, subsampling=subsampling)
    return image_stats(root)


def image_stats(root: Path) -> dict:
    """Count, mean file size and mean / range of the sides of the JPEGs under ``root``."""
    paths = sorted(root.glob("*/*.jpg"))
    sizes = [p.stat().st_size for p in paths]
    dims = np.array([J.jpeg_size(p.read_bytes()) for p in paths])
    aspects = dims[:, 1] / dims[:, 0]
    return {
        "images": len(paths),
        "classes": len({p.parent.name for p in paths}),
        "mean_kb": statistics.mean(sizes) / 1e3,
        "mean_height": float(dims[:, 0].mean()),
        "mean_width": float(dims[:, 1].mean()),
        "aspect_w_over_h_range": [float(aspects.min()), float(aspects.max())],
        "portrait_fraction": float((aspects < 1).mean()),
    }


def dataset_root(count: int) -> Path:
    """The cached image folder of ``count`` images, built on first use."""
    root = CACHE / f"train_{count}"
    if not (root / "done").is_file():
        print(f"building {count} JPEGs under {root} ...", flush=True)
        build_images(root, count)
        (root / "done").write_text("complete\n")
    return root


# ---- the pipelines ---------------------------------------------------------------------------------------------
def reference(root: Path, workers: int, batch_size: int) -> Iterable:
    """(a) torchvision ImageFolder + PIL + classic transforms, float32 out."""
    crop = T.RandomResizedCrop(SIZE, SCALE, interpolation=T.InterpolationMode.BICUBIC)
    dataset = datasets.ImageFolder(str(root), transform=T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor()]))
    pin = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers, pin_memory=pin)


def data_module(decode: str) -> Callable[[Path, int, int], Iterable]:
    """(b) / (c): the project's ImageFolderDataModule training loader with ``decode``."""

    def make(root: Path, workers: int, batch_size: int) -> Iterable:
        dm = ImageFolderDataModule(
            str(root), decode=decode, img_size=SIZE, crop_scale=SCALE, batch_size=batch_size, num_workers=workers
        )
        dm.setup("fit")
        return dm.train_dataloader()

    return make


def streaming(root: Path, workers: int, batch_size: int) -> Iterable:
    """(d) StreamingImageDataModule's training loader over the folder's chunks, prepared on first use."""
    shards = root.with_name(f"{root.name}_shards")
    if not (shards / "index.json").is_file():  # after an interrupted preparation, delete the folder
        prepare(str(root), str(shards))
    options = dict(img_size=SIZE, crop_scale=SCALE, batch_size=batch_size, num_workers=workers)
    dm = StreamingImageDataModule(str(shards), **options)
    dm.setup("fit")
    return dm.train_dataloader()


# name -> (description, loader factory (root, workers, batch_size) -> iterable of (images, labels) batches)
PIPELINES: dict[str, tuple[str, Callable[[Path, int, int], Iterable]]] = {
    "reference": ("torchvision ImageFolder, PIL, RandomResizedCrop + flip + ToTensor (float32)", reference),
    "shipped": ("ImageFolderDataModule decode: pil (PIL decode, v2 transforms, float32)", data_module("pil")),
    "fast": ("ImageFolderDataModule decode: fast (reduced JPEG decode, crop then resize, uint8)", data_module("fast")),
    "streaming": ("StreamingImageDataModule (litdata chunks of the same JPEGs, fast decode, uint8)", streaming),
}


def images_per_second(make: Callable, root: Path, workers: int, batch_size: int) -> dict:
    """One pass over the folder; images/s from the first batch's arrival (workers started, one batch each in
    flight) to the last batch's, over the images of the batches after the first ``workers``."""
    loader = make(root, workers, batch_size)
    stamps, counts = [], []
    start = time.perf_counter()
    for images, _ in loader:
        stamps.append(time.perf_counter())
        counts.append(len(images))
        dtype = str(images.dtype).removeprefix("torch.")
    skip = max(1, workers)
    seconds = stamps[-1] - stamps[skip - 1]
    images = sum(counts[skip:])
    rate = images / seconds
    return {
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(1, workers),
        "first_batch_s": stamps[0] - start,
        "timed_images": images,
        "batch_dtype": dtype,
    }


# ---- the per-stage profile -------------------------------------------------------------------------------------
def profile(root: Path, count: int, batch_size: int, seed: int = 0) -> dict:
    """Seconds per image of each stage (read, decode, crop/resize, to tensor, collate) of the reference and of the
    fast path (with each decoder), in this process, on the first ``count`` files in a seeded order."""
    torch.manual_seed(seed)
    paths = [str(p) for p in sorted(root.glob("*/*.jpg"))]
    paths = [paths[i] for i in torch.randperm(len(paths))[:count].tolist()]
    crop = T.RandomResizedCrop(SIZE, SCALE, interpolation=T.InterpolationMode.BICUBIC)
    flip, to_tensor = T.RandomHorizontalFlip(), T.ToTensor()
    stages = ("read", "decode", "crop/resize", "to tensor", "collate")
    results = {}
    for name in ("reference", "fast simplejpeg", "fast pil-draft"):
        totals = dict.fromkeys(stages, 0.0)
        pending = []
        for path in paths:
            t0 = time.perf_counter()
            data = Path(path).read_bytes()
            t1 = time.perf_counter()
            if name == "reference":
                image = Image.open(BytesIO(data)).convert("RGB")
                t2 = time.perf_counter()
                image = flip(crop(image))
                t3 = time.perf_counter()
                tensor = to_tensor(image)
            else:
                decoder = "simplejpeg" if "simplejpeg" in name else "pil"
                height, width = J.jpeg_size(data)
                box = J.crop_box(height, width, SCALE)
                do_flip = bool(torch.rand(1) < 0.5)
                decoded = J.decode_reduced(data, J.decode_factor(box[2], box[3], SIZE), 3, decoder)
                t2 = time.perf_counter()
                tensor = J.resized_crop(decoded, box, (height, width), SIZE, do_flip)
                t3 = time.perf_counter()
            t4 = time.perf_counter()
            pending.append((tensor, 0))
            if len(pending) == batch_size:
                t5 = time.perf_counter()
                default_collate(pending)
                totals["collate"] += time.perf_counter() - t5
                pending = []
            for stage, (a, b) in zip(stages, [(t0, t1), (t1, t2), (t2, t3), (t3, t4)], strict=False):
                totals[stage] += b - a
        per_image = {stage: 1e3 * seconds / len(paths) for stage, seconds in totals.items()}
        per_image["total"] = sum(per_image.values())
        results[name] = per_image
    return {"ms_per_image": results, "images": len(paths)}


# ---- report ----------------------------------------------------------------------------------------------------
def machine_slug() -> tuple[str, str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    description = f"{cores} CPU cores ({cpu})" + (f", host of {gpu}" if gpu else "")
    slug = (gpu.lower().replace(" ", "-") + "-host-" if gpu else "cpu-") + f"{cores}core"
    return description, slug


def write_markdown(folder: str, stem: str, report: dict) -> None:
    """Print the three tables (throughput, per-stage profile, cores to feed) and write ``<stem>.md`` and
    ``<stem>.json`` (``report``) to ``folder``."""
    data, names = report["images"], list(report["pipelines"])
    ref = report["pipelines"]["reference"]["1"]["images_per_s_per_worker"]
    fast = report["pipelines"]["fast"]["1"]["images_per_s_per_worker"]
    lines = [
        f"- machine: {report['machine']}; torch {report['torch']}, torchvision {report['torchvision']}, "
        f"Pillow {report['pillow']}, simplejpeg {report['simplejpeg']}; commit {report['commit']}"
        f"{' (+ local changes)' if report['dirty'] else ''}",
        f"- images: {data['images']} JPEGs in {data['classes']} classes, mean {data['mean_width']:.0f} x "
        f"{data['mean_height']:.0f} px (w x h), {data['mean_kb']:.0f} KB, aspect w/h "
        f"{data['aspect_w_over_h_range'][0]:.2f} to {data['aspect_w_over_h_range'][1]:.2f} "
        f"({100 * data['portrait_fraction']:.0f}% portrait)",
        f"- every pipeline: RandomResizedCrop {SIZE} px, scale {SCALE}, bicubic, flip; batch {report['batch_size']}; "
        f"best of {report['rounds']} interleaved passes over all images (other processes only slow a pass down); "
        "one thread per worker",
        f"- machine load (1-min average) during the passes: {report['load_avg'][0]:.1f} to {report['load_avg'][1]:.1f}",
        f"- fast / reference per worker (1 worker): {fast / ref:.2f}x",
    ]
    rows = []
    for name in names:
        for workers, r in report["pipelines"][name].items():
            base = report["pipelines"]["reference"][workers]["images_per_s"]
            rows.append([name, workers, f"{r['images_per_s']:,.0f}", f"{r['images_per_s_per_worker']:,.0f}",
                         f"{r['images_per_s'] / base:.2f}", r["batch_dtype"]])  # fmt: skip
    columns = ["pipeline", "workers", "images/s", "images/s per worker", "x reference (same workers)", "batch dtype"]
    throughput = ReportTable(columns, rows, align="lrrrrl")
    prof = report["profile"]["ms_per_image"]
    stages = list(next(iter(prof.values())))
    profile = ReportTable(
        ["path", *stages],
        [[name, *(f"{ms[s]:.2f}" for s in stages)] for name, ms in prof.items()],
        title="Per-stage profile, ms per image (one process)",
        align="l" + "r" * len(stages),
    )
    cores = ReportTable(
        ["pipeline", *(f"{k} ({v:,} img/s)" for k, v in ANCHORS.items())],
        [
            [name, *(f"{v / report['pipelines'][name]['1']['images_per_s_per_worker']:.1f}" for v in ANCHORS.values())]
            for name in names
        ],
        title="Cores to feed one H200",
        align="l" + "r" * len(ANCHORS),
    )
    heading = "Input-pipeline throughput: training images per second per worker process"
    tables = [throughput, profile, cores]
    path = write_report(folder, stem, tables, report, heading=heading, lines=lines, notes=report["notes"])
    print(f"wrote {path} and .json")


NOTES = [
    "images/s: images after each worker's first batch over the time from the first batch's arrival to the last's "
    "(worker start-up excluded); per worker = images/s / workers.",
    "fast: uint8 batches; the conversion to float32 [0, 1] runs on the device after the copy "
    "(ImageFolderDataModule.on_after_batch_transfer) and is not a CPU cost. reference and shipped: float32 batches.",
    "Profile: the stages of one image in one process, timed with perf_counter; decode of the fast path includes "
    "reading the header and drawing the box (the decode scale depends on it); collate per image is a 64-image "
    "batch's default_collate over 64.",
    "Cores to feed one H200: worker processes (one core each) for the reference training rates on one H200 "
    "(ViT-B/16, 224 px), anchor rate / 1-worker images/s per worker; the main training process and the GPU's own "
    "host work need cores beyond these.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the cached folder (built once)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved passes per (pipeline, workers)")
    parser.add_argument("--profile-images", type=int, default=400)
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"subset of {list(PIPELINES)}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n.strip() for n in args.pipelines.split(",") if n.strip()]
    if "reference" not in names or any(n not in PIPELINES for n in names):
        parser.error(f"--pipelines must include reference and name only {list(PIPELINES)}")
    workers = [int(w) for w in args.workers.split(",")]
    if 1 not in workers:
        parser.error("--workers must include 1 (the per-core figures and the cores to feed come from it)")
    root = dataset_root(args.images)
    stats = image_stats(root)
    print(json.dumps(stats), flush=True)

    runs: dict[tuple[str, int], list[dict]] = {}
    loads = []
    for r in range(args.rounds):
        for w in workers:
            for name in names:
                result = images_per_second(PIPELINES[name][1], root, w, args.batch_size)
                runs.setdefault((name, w), []).append(result)
                loads.append(os.getloadavg()[0])
                print(f"round {r} {name} workers={w}: {result['images_per_s_per_worker']:.1f} img/s/worker", flush=True)
    pipelines: dict[str, dict[str, dict]] = {}
    for (name, w), results in runs.items():
        rates = [x["images_per_s"] for x in results]
        rate = max(rates)  # the least disturbed pass: other processes only ever slow a pass down
        pipelines.setdefault(name, {})[str(w)] = {
            "images_per_s": rate,
            "images_per_s_per_worker": rate / w,
            "images_per_s_all_rounds": rates,
            "batch_dtype": results[0]["batch_dtype"],
        }
    prof = profile(root, args.profile_images, args.batch_size)
    print(json.dumps(prof, indent=1), flush=True)

    import PIL
    import simplejpeg
    import torchvision

    description, slug = machine_slug()
    commit, dirty = git_commit()
    ref = pipelines["reference"]["1"]["images_per_s_per_worker"]
    report = {
        "machine": description,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "simplejpeg": simplejpeg.__version__,
        "commit": commit,
        "dirty": dirty,
        "images": stats,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "load_avg": [min(loads), max(loads)],
        "pipelines": {name: pipelines[name] for name in names},
        "ratios_to_reference_1_worker": {name: pipelines[name]["1"]["images_per_s_per_worker"] / ref for name in names},
        "cores_to_feed": {
            name: {k: v / pipelines[name]["1"]["images_per_s_per_worker"] for k, v in ANCHORS.items()} for name in names
        },
        "anchors_images_per_s": ANCHORS,
        "profile": prof,
        "notes": NOTES,
    }
    write_markdown(args.out, f"input_pipeline_{slug}", report)


if __name__ == "__main__":
    main()
