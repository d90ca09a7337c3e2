"""The parts of ``benchmarks/device_check.sh`` that are Python: the bf16 AEMIM quickstart with its loss check, the
FSDP fit on one device with activation checkpointing off or on, the key figure of a throughput run, and the summary
table. The script runs each part under its own ``timeout`` and this file's ``summary`` prints one table at the end.

    python benchmarks/device_check.py quickstart --work DIR [--smoke]
    python benchmarks/device_check.py fsdp --checkpointing true --work DIR [--smoke]
    python benchmarks/device_check.py throughput --results DIR --log LOG --work DIR --part 2 [--compile]
    python benchmarks/device_check.py summary --out OUT --work DIR

Each part writes ``WORK/part<N>.json`` (status, key figure, details); the script writes ``WORK/times.tsv`` (part,
exit code, seconds). ``summary`` joins them into ``OUT/device_check.{json,md}``. The subcommands ``throughput`` and
``summary`` import only the standard library, so they cost no start-up.
"""

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = {
    "0": "install",
    "1": "AEMIM quickstart (bf16 on a GPU)",
    "2": "images/s eager",
    "3": "FSDP on one device, plug-in, checkpointing off / on",
    "4": "images/s compiled",
    "5": "images/s at progressive-resolution sizes",
    "6": "NCCL DDP",
}
EXIT = {0: "ok", 124: "timeout", 137: "timeout"}  # timeout's own code, and 128 + SIGKILL after its grace period
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def csv_logger(work: Path, name: str) -> str:
    return f"--trainer.logger={{class_path: CSVLogger, init_args: {{save_dir: {work}, name: {name}}}}}"


def logged(log_dir: str | Path, key: str) -> list[float]:
    """Every value of metric ``key`` in the CSVLogger file ``log_dir/metrics.csv``, in step order."""
    with open(Path(log_dir) / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(key) not in (None, "")]
    return [float(r[key]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def loss_check(losses: list[float]) -> tuple[bool, str]:
    """(passed, key figure): every loss finite, and the mean of the last fifth under that of the first fifth."""
    if not losses:
        return False, "no train/loss was logged"
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    finite = all(math.isfinite(v) for v in losses)
    falling = finite and last < first
    said = f"loss {first:.4f} -> {last:.4f} over {len(losses)} steps, {'no NaN' if finite else 'NON-FINITE'}"
    return falling, said + ("" if falling or not finite else ", not falling")


def write_part(work: Path, part: str, status: str, key: str, **details) -> None:
    (work / f"part{part}.json").write_text(json.dumps({"status": status, "key": key, **details}, indent=1) + "\n")
    print(f"[device check] part {part}: {status}: {key}", flush=True)


def quickstart(args) -> None:
    """Part 1: ``advmim fit -c quickstart_adv.yaml -c trainer/gpu.yaml`` for 2 epochs (smoke: 6 fp32 steps of batch
    8 on the CPU, no validation), loss logged every step; passes on a falling, finite loss."""
    from advmim_pl.cli import run

    argv = ["fit", "-c", "quickstart_adv.yaml", "-c", "trainer/gpu.yaml", "--trainer.max_epochs=2"]
    if args.smoke:
        argv += ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_epochs=1"]
        argv += ["--trainer.limit_train_batches=6", "--trainer.limit_val_batches=0", "--data.init_args.batch_size=8"]
    argv += [csv_logger(args.work, "quickstart"), "--trainer.log_every_n_steps=1", *QUIET]
    cli = run(argv)
    passed, key = loss_check(logged(cli.trainer.logger.log_dir, "train/loss"))
    write_part(args.work, "1", "ok" if passed else "fail", f"{cli.trainer.precision}: {key}")


def fsdp_version(config: Path) -> str:
    """The FSDP version of trainer config ``config``: "FSDP2" for Lightning's ModelParallelStrategy, "FSDP1" for
    its FSDPStrategy."""
    text = config.read_text()
    if "ModelParallelStrategy" in text:
        return "FSDP2"
    if "FSDPStrategy" in text:
        return "FSDP1"
    raise ValueError(f"{config} names neither ModelParallelStrategy nor FSDPStrategy")


def fsdp_command(version: str, checkpointing: bool, work: Path, smoke: bool) -> list[str]:
    """Part 3's ``advmim fit``: mae_adv.yaml (ViT-B/16, 224 px, the plug-in) with trainer/fsdp.yaml on one device, on
    synthetic batches of 64 for 8 steps; smoke: a 2-block ViT-Tiny at 32 px, batch 8, 2 fp32 steps on the CPU."""
    argv = [
        "fit",
        "-c",
        "mae_adv.yaml",
        "-c",
        "trainer/fsdp.yaml",
        "--trainer.devices=1",
        "--trainer.max_steps=8",
        "--data=advmim_pl.data.SyntheticDataModule",
        "--data.init_args.num_samples=640",
        "--data.init_args.img_size=224",
        "--data.init_args.batch_size=64",
        "--data.init_args.num_workers=0",
        f"--model.init_args.activation_checkpointing={str(checkpointing).lower()}",
        "--trainer.limit_val_batches=0",
        csv_logger(work, f"fsdp_ckpt_{checkpointing}"),
        "--trainer.log_every_n_steps=1",
    ]
    if version == "FSDP2":  # one rank: shard over the one data-parallel rank, no tensor parallelism
        argv += [
            "--trainer.strategy.init_args.data_parallel_size=1",
            "--trainer.strategy.init_args.tensor_parallel_size=1",
        ]
    if smoke:
        argv += [
            "--model.init_args.encoder=vit_tiny_patch16_224",
            "--model.init_args.encoder_kwargs={depth: 2}",
            "--data.init_args.img_size=32",
            "--model.init_args.patch_size=4",
            "--model.init_args.method.init_args.decoder_dim=32",
            "--model.init_args.method.init_args.decoder_depth=1",
            "--model.init_args.method.init_args.decoder_heads=2",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_samples=32",
            "--trainer.max_steps=2",
            "--trainer.accelerator=cpu",
            "--trainer.precision=32-true",
        ]
    return argv + QUIET


def peak_memory_mib(device_type: str) -> float:
    """The process's peak: ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set on a CPU (this
    process is fresh, so that is one configuration's)."""
    import resource

    import torch

    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fsdp(args) -> None:
    """Part 3, one of its two runs: ``fsdp_command`` with checkpointing off or on; writes ``WORK/fsdp_<on|off>.json``
    (peak memory, losses finite). The FSDP1 config refuses the CPU: in a smoke run (on the CPU) it is a skip."""
    version, on = fsdp_version(REPO / "configs" / "trainer" / "fsdp.yaml"), args.checkpointing == "true"
    out = args.work / f"fsdp_{'on' if on else 'off'}.json"
    if version == "FSDP1" and args.smoke:  # decided before torch is imported: a smoke run costs no start-up here
        out.write_text(json.dumps({"status": "skip", "version": version, "why": "FSDP1 needs CUDA devices"}) + "\n")
        return
    import time

    import torch

    from advmim_pl.cli import run

    start = time.perf_counter()
    cli = run(fsdp_command(version, on, args.work, args.smoke))
    seconds = time.perf_counter() - start
    losses = logged(cli.trainer.logger.log_dir, "train/loss")
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    result = {
        "status": "ok" if finite else "fail",
        "version": version,
        "checkpointing": on,
        "peak_mib": peak_memory_mib(cli.trainer.strategy.root_device.type),
        "peak_of": "max_memory_allocated" if torch.cuda.is_available() else "peak resident set (process)",
        "steps": len(losses),
        "losses_finite": finite,
        "fit_seconds": seconds,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")


def fsdp_part(work: Path) -> None:
    """Part 3's figure from its two runs' files (either may be missing: killed by its timeout)."""
    runs = {k: json.loads(p.read_text()) for k in ("off", "on") if (p := work / f"fsdp_{k}.json").exists()}
    if not runs:
        return
    if all(r["status"] == "skip" for r in runs.values()):
        version = next(iter(runs.values()))["version"]
        write_part(work, "3", "skip", f"{version} config ({next(iter(runs.values()))['why']}); no run on this machine")
        return
    cells = [f"ckpt {k}: {r['peak_mib']:,.0f} MiB" for k, r in runs.items() if r["status"] != "skip"]
    version = next(iter(runs.values()))["version"]
    ok = set(runs) == {"off", "on"} and all(r["status"] == "ok" for r in runs.values())
    key = f"{version}: " + ", ".join(cells) + ("" if ok else " (incomplete)")
    write_part(work, "3", "ok" if ok else "fail", key, runs=runs)


STEP_LINE = re.compile(r"^(?P<name>[^:\n]+): (?P<ms>[0-9.]+) ms/step", re.MULTILINE)


def newest_run(folder: Path, compiled: bool, img_size: int | None) -> dict | None:
    """The newest ``throughput.py`` JSON in ``folder`` made with (or without) ``--compile`` and, when given, at
    ``img_size``."""
    runs = []
    for path in folder.glob("throughput_*.json"):
        report = json.loads(path.read_text())
        setup = report.get("setup", {})
        if bool(setup.get("compile")) == compiled and img_size in (None, setup.get("img_size")):
            runs.append((path.stat().st_mtime, report))
    return max(runs, key=lambda r: r[0])[1] if runs else None


def rates_from_log(log: Path) -> dict[str, float]:
    """images/s of each configuration from the lines ``throughput.py`` prints as each ends (a run cut short)."""
    text = log.read_text() if log.exists() else ""
    batch = re.search(r"--batch-size (\d+)", text)
    return {m["name"].strip(): 1000 * int(batch[1]) / float(m["ms"]) for m in STEP_LINE.finditer(text)} if batch else {}


def throughput_part(args) -> None:
    """The key figure of ``throughput.py`` runs: images/s of each configuration, from the newest JSON in ``--results``
    with this ``--compile`` at each of ``--img-size`` (comma-separated; default: any), or, for a single run that was
    cut short, from the lines in ``--log``."""
    sizes = [int(s) for s in args.img_size.split(",")] if args.img_size else [None]
    cells, found, rates_of = [], 0, {}
    for size in sizes:
        report = newest_run(args.results, args.compile, size)
        if report is not None:
            found += 1
            rates = {name: r["images_per_s"] for name, r in report["results"].items()}
            setup = report["setup"]
            where = f"{setup['model']} {setup['img_size']} px, batch {setup['batch_size']}"
        else:
            rates = rates_from_log(args.log) if args.log is not None and len(sizes) == 1 else {}
            where = f"{size or ''} px (cut short)".lstrip()
        rates_of[str(size)] = rates
        cells.append(f"{where}: " + (", ".join(f"{n} {r:,.0f} img/s" for n, r in rates.items()) or "nothing finished"))
    status = "ok" if found == len(sizes) else "partial" if any(rates_of.values()) else "fail"
    write_part(args.work, args.part, status, "; ".join(cells), images_per_s=rates_of)


def summary(args) -> None:
    """One table over every part in order: status (the part's own, or the exit code's: timeout, fail), key figure,
    seconds; printed and written to ``OUT/device_check.{md,json}``."""
    fsdp_part(args.work)
    times = {}
    if (args.work / "times.tsv").exists():
        for line in (args.work / "times.tsv").read_text().splitlines():
            part, code, seconds = line.split("\t")
            times[part] = (int(code), float(seconds))
    rows = []
    for part, name in PARTS.items():
        info = json.loads(p.read_text()) if (p := args.work / f"part{part}.json").exists() else {}
        code, seconds = times.get(part, (None, 0.0))
        status = info.get("status") or ("not run" if code is None else EXIT.get(code, f"fail (exit {code})"))
        if code in (124, 137):
            status = "timeout" + (f", {info['status']}" if info.get("status") else "")
        elif code not in (None, 0) and status == "ok":
            status = f"fail (exit {code})"
        rows.append({"part": part, "what": name, "status": status, "key": info.get("key", ""), "seconds": seconds})
    total = sum(r["seconds"] for r in rows)
    header = ["part", "what", "status", "key figure", "s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---|---:|"]
    lines += [f"| {r['part']} | {r['what']} | {r['status']} | {r['key']} | {r['seconds']:.1f} |" for r in rows]
    lines.append(f"| | total | | | {total:.1f} |")
    print("\n".join(lines))
    (args.out / "device_check.md").write_text("# Device check\n\n" + "\n".join(lines) + "\n")
    (args.out / "device_check.json").write_text(json.dumps({"parts": rows, "seconds": total}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["quickstart", "fsdp", "throughput", "summary"])
    parser.add_argument("--work", type=Path, required=True, help="the parts' files (part<N>.json, times.tsv, logs)")
    parser.add_argument("--out", type=Path, help="summary: the folder the table goes to")
    parser.add_argument("--results", type=Path, help="throughput: the folder of throughput.py's JSON files")
    parser.add_argument("--img-size", help="throughput: the runs' image sides, comma-separated (default: any)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on a CPU")
    parser.add_argument("--checkpointing", choices=["true", "false"], default="false", help="fsdp: off or on")
    parser.add_argument("--log", type=Path, help="throughput: the run's log")
    parser.add_argument("--part", default="2", choices=["2", "4", "5"], help="throughput: which part")
    parser.add_argument("--compile", action="store_true", help="throughput: the compiled run")
    args = parser.parse_args()
    if args.command == "summary" and args.out is None:
        parser.error("summary needs --out, the folder the table goes to")
    if args.command == "throughput" and args.results is None:
        parser.error("throughput needs --results, the folder of throughput.py's JSON files")
    sys.argv[1:] = []  # the fits get their own argument lists
    {"quickstart": quickstart, "fsdp": fsdp, "throughput": throughput_part, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
