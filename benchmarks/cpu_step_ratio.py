"""AEMIM / host-method training-step time ratios on the CPU next to their FLOP ratios, measured in one run.

Every configuration of ``throughput.py`` (MAE, SimMIM, and the plug-in with each attack view and PGD-1 / PGD-3)
trains through the real PretrainModule, AEMIM plug-in and Lightning Trainer on one fixed batch.
The FLOP ratio (FlopCounterMode over one step) is the arithmetic floor of the time ratio; the target is a time
ratio within 1.15x of it. The configurations are timed in interleaved rounds and each keeps its best median,
so slow drifts of a shared machine hit all of them alike. Default: ViT-Tiny (192-d, 12 blocks), 32 px,
patch 4, batch 64, bf16 autocast.

    python benchmarks/cpu_step_ratio.py [--steps 8] [--rounds 2] [--configs "MAE,MAE+AEMIM PGD-1"] [--tag NAME]
"""

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from provenance import device_info, git_commit
from throughput import CONFIGS, REPO, StepClock, count_flops, decoder_choice, run_fit

TARGET = 1.15  # time ratio / FLOP ratio


def median_step(name: str, args: argparse.Namespace, decoder: dict) -> float:
    """Median seconds per training step of configuration ``name`` after ``args.warmup`` untimed steps."""
    clock = StepClock(torch.device("cpu"))
    run_fit(name, args, decoder, args.warmup + args.steps + 1, compile=False, clock=clock)
    intervals = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return statistics.median(intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best median is kept")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON figures")
    parser.add_argument("--tag", default="", help="appended to the file name (cpu_step_ratio_TAG.json)")
    args = parser.parse_args()
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    names = sorted({*names, *(CONFIGS[n][3] for n in names if CONFIGS[n][3])}, key=list(CONFIGS).index)
    args.accelerator, args.decoder_dim, args.decoder_depth, args.decoder_heads, args.depth = "cpu", *[None] * 4
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    decoder = decoder_choice(args)

    flops = {name: count_flops(name, args, decoder) for name in names}
    rounds = [{name: median_step(name, args, decoder) for name in names} for _ in range(args.rounds)]
    seconds = {name: min(r[name] for r in rounds) for name in names}

    description, _ = device_info(torch.device("cpu"))
    commit, dirty = git_commit()
    print(f"{description}; {args.model} {args.img_size} px, patch {args.patch_size}, batch {args.batch_size}, "
          f"{args.precision}; commit {commit}{' (+ local changes)' if dirty else ''}")  # fmt: skip
    print(f"{'configuration':<32}{'ms/step':>9}{'GFLOP':>8}{'time x':>8}{'FLOP x':>8}{'time/FLOP':>11}")
    rows = {}
    for name in names:
        base = CONFIGS[name][3]
        time_x = seconds[name] / seconds[base] if base else None
        flop_x = flops[name] / flops[base] if base else None
        over = time_x / flop_x if base else None
        rows[name] = {"seconds": seconds[name], "gflop": flops[name] / 1e9, "time_x": time_x, "flop_x": flop_x}
        ratios = f"{time_x:>8.2f}{flop_x:>8.2f}{over:>8.2f} {'ok' if over <= TARGET else 'OVER'}" if base else ""
        print(f"{name:<32}{1000 * seconds[name]:>9.1f}{flops[name] / 1e9:>8.2f}{ratios}")
    print(f"target: time x within {TARGET}x of FLOP x (the arithmetic floor)")
    out = Path(args.out) / f"cpu_step_ratio{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": description, "commit": commit, "args": vars(args), "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
