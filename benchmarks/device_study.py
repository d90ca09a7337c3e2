"""The study's question on one GPU in one short window: MAE, MAE+AEMIM and MAE+sign, paired seeds, GPU read-outs.

The design, its sizing and the decision rule are in benchmarks/README.md ("device_study.sh"), written before any
run. ``benchmarks/device_study.sh`` installs what is missing and runs this; by hand:

    python benchmarks/device_study.py --fashion-mnist-root DIR --out OUT [--minutes 6.5]
    python benchmarks/device_study.py --smoke --out OUT          # toy size on a CPU, about a minute
    python benchmarks/device_study.py --count-ops --out OUT      # kernels per training step of each job (sizing)

Seed by seed (seed-major: a run cut short leaves complete seeds), each seed's random encoder, MAE, MAE+AEMIM and
MAE+sign: pre-training through ``advmim fit`` (configs/study/gpu/, data resident on the device), then the frozen
encoder's converged logistic-regression probe and kNN, its export (``advmim export``, packed into tar files of at
most ``--pack-mib`` beside the records) and a fine-tune with 10% of the labels from that export. Every record is
written to ``OUT/device_study.json`` as its job ends, and the report (``device_study.md``) rebuilt.
"""

import argparse
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from device_study_report import ARMS, CHECKED, FLOOR, markdown, report_lines
from provenance import device_info, git_commit
from studykit.commands import attack_log, limit_arguments, pretrain
from studykit.design import QUIET, SMOKE_GPU_SIZES, Preset
from studykit.evaluate import EvalData, accuracy, encoder_features, eval_images, evaluate

from advmim_pl.cli import run
from advmim_pl.data import FashionMNISTDataModule
from advmim_pl.data.fashion_mnist import DEFAULT_ROOT
from advmim_pl.models.normalize import Normalize


@dataclass(frozen=True)
class Size:
    """One size of the study: pre-training (``pretrain``: the configs, their extra arguments and the evaluation
    limits; ``epochs`` per arm) and the fine-tune (label fraction, batch, epochs, lr per 256 images, extra
    arguments)."""

    pretrain: Preset
    epochs: int
    seeds: int
    ft_fraction: float
    ft_batch: int
    ft_epochs: int
    ft_base_lr: float
    ft_extra: tuple[str, ...] = ()


# the advmim command's checkpoint callback saves nothing: the study saves the one checkpoint it exports
NO_CHECKPOINTS = ("--checkpoint.save_top_k=0", "--checkpoint.save_last=false")
SMOKE_PRETRAIN = SMOKE_GPU_SIZES | {"extra": (*SMOKE_GPU_SIZES["extra"], *NO_CHECKPOINTS)}
SIZES = {
    # E = 8 at batch 512 (936 steps): the sizing and the reasons are in benchmarks/README.md
    "gpu": Size(
        Preset("gpu", epochs=8, time_ratio=None, seeds=3, arms=ARMS, eval_batch=2000, extra=NO_CHECKPOINTS),
        epochs=8,
        seeds=3,
        ft_fraction=0.1,  # 600 labelled images per class
        ft_batch=256,
        ft_epochs=14,  # 6,000 / 256 = 23 steps an epoch: 322 steps; the check at seed 0 runs 7 epochs (161)
        ft_base_lr=1e-3,  # 1e-3 at batch 256: the continuation study's fine-tuning lr (there at batch 64)
    ),
    # the same jobs at toy size on a CPU, in fp32 (bf16 autocast is several times slower without bf16 units)
    "smoke": Size(
        Preset("gpu", epochs=1, time_ratio=None, seeds=2, arms=ARMS, **SMOKE_PRETRAIN),
        epochs=1,
        seeds=2,
        ft_fraction=0.2,
        ft_batch=16,
        ft_epochs=2,
        ft_base_lr=1e-3,
        ft_extra=("--trainer.limit_train_batches=2", "--trainer.precision=32-true"),
    ),
}


def slug(arm: str) -> str:
    return arm.replace(" ", "_").replace("+", "_")


def load_data(size: Size, root: str, device: torch.device) -> EvalData:
    """Fashion-MNIST train (or its first ``limit_train``) and test (its first ``limit_test``) at 32 px in [0, 1],
    on ``device``, through the data module's deterministic evaluation transform."""
    module = FashionMNISTDataModule(root=root, limit_train=size.pretrain.limit_train, img_size=32, channels=1)
    train_x, train_y, test_x, test_y = eval_images(module, device)
    test = slice(None, size.pretrain.limit_test)
    none = torch.empty(0, device=device)
    normalize = Normalize(module.mean, module.std).to(device)
    return EvalData(train_x, train_y, test_x[test], test_y[test], none, none, normalize)


def finetune_command(
    size: Size, init_from: Path, seed: int, epochs: int, folder: Path, data_args: list[str]
) -> list[str]:
    """The ``advmim fit`` arguments of the few-label fine-tune (configs/study/gpu/finetune_few.yaml at ``size``'s
    label fraction, batch, lr and ``epochs``; warm-up the first 10%) of the encoder exported at ``init_from``; the
    labelled subset, head and data order follow ``seed``; it logs under ``folder``."""
    return [
        "fit",
        "-c",
        "study/gpu/finetune_few.yaml",
        f"--model.init_args.init_from={init_from}",
        f"--data.init_args.label_fraction={size.ft_fraction}",
        f"--data.init_args.label_seed={seed}",
        f"--data.init_args.batch_size={size.ft_batch}",
        f"--model.init_args.base_lr={size.ft_base_lr}",
        "--seed_everything",
        str(seed),
        f"--trainer.max_epochs={epochs}",
        f"--model.init_args.warmup_epochs={0.1 * epochs:g}",
        *NO_CHECKPOINTS,
        f"--trainer.logger={{class_path: TensorBoardLogger, init_args: {{save_dir: {folder}, name: ft_{epochs}}}}}",
        *QUIET,
        *size.ft_extra,
        *limit_arguments(size.pretrain),
        *data_args,
    ]


def finetune(size: Size, init_from: Path, seed: int, epochs: int, data: EvalData, data_args: list[str]) -> float:
    """Test top-1 (fraction, the test images of ``data``) of ``finetune_command``'s fine-tune, logged beside
    ``init_from``."""
    argv = finetune_command(size, init_from, seed, epochs, init_from.parent, data_args)
    model = run(argv).model.eval().to(data.test_x.device)  # Lightning leaves a fitted module on the CPU
    with torch.no_grad():
        logits = torch.cat([model.logits(chunk) for chunk in data.test_x.split(size.pretrain.eval_batch)])
    return accuracy(logits, data.test_y)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pack(out: Path, file: Path, limit_mib: float) -> str:
    """Append ``file`` to the last ``device_study_encoders_<k>.tar`` in ``out`` while that stays within
    ``limit_mib`` MiB, else to a new one; the tar's name."""
    tars = sorted(out.glob("device_study_encoders_*.tar"), key=lambda p: int(p.stem.rpartition("_")[2]))
    need = file.stat().st_size + 3 * 512  # the file's header and padding
    if not tars or tars[-1].stat().st_size + need > limit_mib * 2**20:
        tars.append(out / f"device_study_encoders_{len(tars) + 1}.tar")
    with tarfile.open(tars[-1], "a") as archive:
        archive.add(file, arcname=file.name)
    return tars[-1].name


def job(size: Size, arm: str, seed: int, work: Path, data: EvalData, data_args: list[str], args) -> dict:
    """Pre-train ``arm`` at ``seed``, score its frozen encoder, export it and fine-tune the export: its record."""
    folder, seconds, device = work / slug(arm) / f"seed{seed}", {}, data.test_x.device
    epochs = 0 if arm == FLOOR else size.epochs
    start = time.perf_counter()
    cli = pretrain(size.pretrain, arm, seed, folder, epochs, data_args)
    seconds["pretrain"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluate(encoder_features(cli.model.encoder.to(device)), data, size.pretrain, full=False)
    seconds["probe_knn"] = time.perf_counter() - start
    start = time.perf_counter()
    checkpoint, exported = folder / "last.ckpt", folder / f"{slug(arm)}_seed{seed}.safetensors"
    cli.trainer.save_checkpoint(checkpoint)
    run(["export", str(checkpoint), str(exported)])
    encoder = {"file": exported.name, "sha256": sha256(exported)}
    # the floor is the seed's untrained initialisation, which the same command rebuilds: exported for its
    # fine-tune, not kept
    encoder["tar"] = None if arm == FLOOR else pack(args.out, exported, args.pack_mib)
    seconds["export"] = time.perf_counter() - start
    lengths = {"ft": size.ft_epochs} | ({"ft_half": size.ft_epochs // 2} if seed == 0 and arm in CHECKED else {})
    for key, length in lengths.items():
        start = time.perf_counter()
        metrics[key] = finetune(size, exported, seed, length, data, data_args)
        seconds[key] = time.perf_counter() - start
    trained = cli.trainer.global_step * cli.datamodule.batch_size
    return {
        "arm": arm,
        "seed": seed,
        "epochs": epochs,
        "metrics": metrics,
        "seconds": seconds,
        "pretrain_images_per_s": trained / seconds["pretrain"] if trained else None,  # wall time, set-up included
        "attack": attack_log(cli.trainer),
        "encoder": encoder,
    }


def write(out: Path, records: list[dict], setup: dict) -> None:
    """``device_study.json`` (setup and records, replaced atomically) and ``device_study.md``."""
    path = out / "device_study.json"
    path.with_suffix(".tmp").write_text(json.dumps({"setup": setup, "records": records}, indent=1) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    (out / "device_study.md").write_text(markdown(records, setup))


def study(args, size: Size) -> list[dict]:
    """Every seed's jobs, seed-major; a seed after the first starts only if the longest seed so far still fits in
    ``args.minutes``. Returns the records."""
    begun = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    commit, dirty = git_commit()
    setup = {
        "size": "smoke" if args.smoke else "gpu",
        "epochs": size.epochs,
        "device": device_info(device)[0],
        "commit": commit + ("+local-changes" if dirty else ""),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    data_args = ["--data.init_args.root", args.fashion_mnist_root]
    data = load_data(size, args.fashion_mnist_root, device)
    setup["seconds_to_data"] = time.perf_counter() - begun
    records, longest = [], 0.0
    for index, seed in enumerate(range(args.seeds if args.seeds is not None else size.seeds)):
        elapsed = (time.perf_counter() - begun) / 60
        if index and args.minutes is not None and elapsed + longest > args.minutes:
            print(f"[device study] {elapsed:.1f} of {args.minutes} min used; seed {seed} would not end in time: stop")
            break
        started = time.perf_counter()
        for arm in ARMS:
            record = job(size, arm, seed, args.workdir, data, data_args, args)
            records.append(record)
            write(args.out, records, setup)
            m = record["metrics"]
            seconds = {k: round(v, 1) for k, v in record["seconds"].items()}
            scores = f"probe {100 * m['probe']:.2f}, kNN {100 * m['knn']:.2f}, fine-tune {100 * m['ft']:.2f}"
            print(f"[device study] {arm} seed {seed}: {scores}; seconds {json.dumps(seconds)}", flush=True)
        longest = max(longest, (time.perf_counter() - started) / 60)
    print("\n".join(report_lines(records, setup)))
    print(f"[device study] {(time.perf_counter() - begun) / 60:.2f} min; records: {args.out / 'device_study.json'}")
    return records


class OpCount(L.Callback):
    """Counts the kernels one training step dispatches: the leaf ``aten::`` operators (those that call no other,
    views and allocations excepted) between the starts of batches ``step`` and ``step + 1`` (the batch's making,
    forward, attack, backward, optimizer and Lightning's hooks)."""

    NO_KERNEL = set(
        "view _unsafe_view as_strided t transpose permute expand reshape unsqueeze squeeze select slice detach alias "
        "split split_with_sizes chunk unbind empty empty_like empty_strided resize_ lift_fresh _reshape_alias narrow "
        "_local_scalar_dense item is_nonzero set_ unfold view_as expand_as _has_compatible_shallow_copy_type "
        "result_type".split()
    )  # views, metadata and allocations: no kernel

    def __init__(self, step: int = 2) -> None:
        self.step, self.kernels, self.profiler = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        elif batch_idx == self.step + 1 and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.kernels = sum(
                1
                for e in self.profiler.events()
                if e.name.startswith("aten::")
                and e.name[6:] not in self.NO_KERNEL
                and not any(c.name.startswith("aten::") for c in e.cpu_children)
            )


def count_ops(args) -> dict[str, int]:
    """Kernels per training step of each arm's pre-training and of the fine-tune, at the smoke size on this machine
    (the count does not depend on the batch); written to ``OUT/device_study_ops.json``."""
    size = SIZES["smoke"]
    # 4 steps, none of them a logging step (which adds the plug-in's objective passes once every 50 at full size)
    keep = [a for a in size.pretrain.extra if "limit_train_batches" not in a and "log_every_n_steps" not in a]
    extra = (*keep, "--trainer.limit_train_batches=4", "--trainer.log_every_n_steps=50")
    preset = replace(size.pretrain, extra=extra)
    data_args, counts = ["--data.init_args.root", args.fashion_mnist_root], {}
    for arm in ARMS[1:]:
        cli = pretrain(preset, arm, 0, args.workdir / "ops" / slug(arm), 1, data_args, ["device_study.OpCount"])
        counts[arm] = next(c.kernels for c in cli.trainer.callbacks if type(c).__name__ == "OpCount")
    exported = args.workdir / "ops" / "mae.safetensors"
    cli.trainer.save_checkpoint(args.workdir / "ops" / "mae.ckpt")
    run(["export", str(args.workdir / "ops" / "mae.ckpt"), str(exported)])
    ft_extra = ("--trainer.limit_train_batches=4", "--trainer.log_every_n_steps=50", "--trainer.precision=32-true")
    ft = replace(size, ft_extra=ft_extra, ft_fraction=0.5)
    argv = finetune_command(ft, exported, 0, 1, exported.parent, data_args)
    cli = run([*argv, "--trainer.callbacks+=device_study.OpCount"])
    counts["fine-tune"] = next(c.kernels for c in cli.trainer.callbacks if type(c).__name__ == "OpCount")
    commit, dirty = git_commit()
    saved = {
        "kernels_per_step": counts,
        "what": "leaf aten operators of one training step, views and allocations excepted (OpCount)",
        "command": "python benchmarks/device_study.py --count-ops --out benchmarks/results",
        "device": device_info(torch.device("cpu"))[0],
        "commit": commit + ("+local-changes" if dirty else ""),
        "torch": torch.__version__,
    }
    (args.out / "device_study_ops.json").write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps(counts))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="toy size: every job of two seeds on a CPU")
    parser.add_argument("--count-ops", action="store_true", help="kernels per training step of each job (sizing)")
    parser.add_argument(
        "--fashion-mnist-root",
        default=os.environ.get("FASHION_MNIST", DEFAULT_ROOT),
        help=f"folder of the four Fashion-MNIST IDX files (.gz or not); default $FASHION_MNIST, else {DEFAULT_ROOT}",
    )
    parser.add_argument("--out", type=Path, required=True, help="records, report and encoders")
    parser.add_argument("--workdir", type=Path, help="logs and checkpoints (default: a new temporary folder)")
    parser.add_argument("--minutes", type=float, help="start no seed after the first that could end after this")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: the size's)")
    parser.add_argument("--pack-mib", type=float, default=15.0, help="largest encoder tar file, MiB")
    args = parser.parse_args()
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.minutes is not None and args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    args.out.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="device_study_"))
    sys.argv[1:] = []  # the fits get their own argument lists
    if args.count_ops:
        count_ops(args)
    else:
        study(args, SIZES["smoke" if args.smoke else "gpu"])


if __name__ == "__main__":
    main()
