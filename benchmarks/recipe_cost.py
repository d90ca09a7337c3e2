"""What a pre-training recipe costs: its total training FLOPs and its time on this machine, next to the plain 800-epoch
MAE-B/16 recipe at 224 px, from per-resolution measurements made in this one run.

Per resolution the script counts the FLOPs of one training step (FlopCounterMode, ``throughput.count_flops``) and
times it (median of a few steps, ``throughput.run_fit``) for MAE and for MAE with the default plug-in, on ViT-B/16
with a small fixed batch. A recipe's epoch e then costs, per image, MAE(size(e)) plus, when the plug-in runs in that
epoch on a share f of each batch, f x (plug-in - MAE)(size(e)): the plug-in's passes are per image, so its FLOPs are
linear in f exactly, and its time is taken as linear too. Totals are per image over all epochs (the dataset size and
the batch cancel in the ratios). The recipes:

- ``mae.yaml``: the plain 800-epoch MAE-B/16 recipe at 224 px, the reference;
- ``mae_adv.yaml``: the same with the default plug-in in every epoch;
- ``mae_adv_progressive.yaml`` without the plug-in: DailyMAE's progressive resolution;
- the same with the plug-in's window (batch fraction 1);
- ``mae_adv_progressive.yaml`` as shipped: window and batch fraction.

    python benchmarks/recipe_cost.py [--batch-size 4] [--steps 2] [--warmup 1]   # about 5 minutes on 2 cores
"""

import argparse
import importlib
import json
import os
import statistics
import time
import warnings

import lightning as L
import torch
import yaml
from provenance import device_info, git_commit
from throughput import REPO, StepClock, count_flops, decoder_choice, release, run_fit

from advmim_pl.data.resolution import ResolutionSchedule
from advmim_pl.report import ReportTable, write_report

CONFIGS = REPO / "configs"
CPU = torch.device("cpu")
TARGET = 1.0  # total FLOPs of a recipe with the plug-in, at most this times the plain MAE recipe's


def recipe(config: str, plugin: bool = True, fraction: float | None = None) -> dict:
    """The per-epoch plan of a shipped config: sizes, and the plug-in's share of each batch per epoch (0: off)."""
    settings = yaml.safe_load((CONFIGS / config).read_text())
    epochs = settings["trainer"]["max_epochs"]
    data = settings["data"]["init_args"]
    spec = data.get("resolution")
    if spec is None:
        sizes = [data["img_size"]] * epochs
    else:
        module, _, name = spec["class_path"].rpartition(".")
        schedule: ResolutionSchedule = getattr(importlib.import_module(module), name)(**spec["init_args"])
        sizes = schedule.sizes(epochs)
    block = settings["model"]["init_args"].get("plugin") if plugin else None
    if isinstance(block, str):  # the plug-in's block composed from its file (plugin/aemim.yaml)
        block = yaml.safe_load((CONFIGS / block).read_text())
    options = (block or {}).get("init_args", {})
    share = options.get("batch_fraction", 1.0) if fraction is None else fraction
    windows = options.get("epochs")
    active = [block is not None and (windows is None or any(a <= e < b for a, b in windows)) for e in range(epochs)]
    return {"epochs": epochs, "sizes": sizes, "shares": [share if on else 0.0 for on in active]}


RECIPES = {
    "MAE-B/16, 800 epochs, 224 px (mae.yaml)": lambda: recipe("mae.yaml"),
    "+ the plug-in in every epoch (mae_adv.yaml)": lambda: recipe("mae_adv.yaml"),
    "progressive resolution, no plug-in": lambda: recipe("mae_adv_progressive.yaml", plugin=False),
    "progressive + the plug-in's window": lambda: recipe("mae_adv_progressive.yaml", fraction=1.0),
    "progressive + window + batch fraction (mae_adv_progressive.yaml)": lambda: recipe("mae_adv_progressive.yaml"),
}


def median_step_ms(name: str, args: argparse.Namespace, decoder: dict) -> float:
    """Median milliseconds per training step of the ``throughput.py`` configuration ``name``."""
    clock = StepClock(CPU)
    run_fit(name, args, decoder, args.warmup + args.steps + 1, compile=False, clock=clock)
    intervals = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return 1000 * statistics.median(intervals)


def measure(size: int, args: argparse.Namespace) -> dict:
    """Per image at ``size`` px: GFLOP and ms of an MAE step and of an MAE + plug-in step."""
    args.img_size = size
    decoder = decoder_choice(args)
    figures = {}
    for key, name in (("mae", "MAE"), ("plugin", "MAE+AEMIM PGD-1")):
        figures[f"{key}_gflop"] = count_flops(name, args, decoder) / 1e9 / args.batch_size
        release(CPU)  # a finished fit's module and optimizer state sit in reference cycles until collected
        figures[f"{key}_ms"] = median_step_ms(name, args, decoder) / args.batch_size
        release(CPU)
    return figures


def cost(plan: dict, per_size: dict[int, dict]) -> dict:
    """A recipe's totals per image over all its epochs, and where its plug-in runs."""
    flops = seconds = 0.0
    for size, share in zip(plan["sizes"], plan["shares"], strict=True):
        f = per_size[size]
        flops += f["mae_gflop"] + share * (f["plugin_gflop"] - f["mae_gflop"])
        seconds += (f["mae_ms"] + share * (f["plugin_ms"] - f["mae_ms"])) / 1000
    on = {e for e, share in enumerate(plan["shares"]) if share}
    final, epochs = plan["sizes"][-1], plan["epochs"]
    last_tenth = range(epochs - epochs // 10, epochs)
    covered = bool(on) and all(e in on and plan["sizes"][e] == final for e in last_tenth)
    return {
        "gflop_per_image": flops,
        "cpu_seconds_per_image": seconds,
        "plugin_epoch_fraction": len(on) / epochs,
        "plugin_sizes": sorted({plan["sizes"][e] for e in on}),
        "plugin_batch_fraction": max(plan["shares"]),
        "plugin_in_last_tenth_at_final_size": covered,
        "sizes": sorted(set(plan["sizes"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="images per measured step (fixed, small on a CPU)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    options = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    if options.threads:
        torch.set_num_threads(options.threads)
    args = argparse.Namespace(
        model="vit_base_patch16_224", patch_size=16, depth=None, batch_size=options.batch_size,
        precision="32-true", accelerator="cpu", steps=options.steps, warmup=options.warmup,
        decoder_dim=None, decoder_depth=None, decoder_heads=None, img_size=224,
    )  # fmt: skip
    plans = {name: make() for name, make in RECIPES.items()}
    start, per_size = time.perf_counter(), {}
    for size in sorted({s for plan in plans.values() for s in plan["sizes"]}):
        per_size[size] = measure(size, args)
        print(f"{size} px: {json.dumps({k: round(v, 3) for k, v in per_size[size].items()})}", flush=True)
    rows = {name: cost(plan, per_size) for name, plan in plans.items()}
    reference = next(iter(rows.values()))
    for row in rows.values():
        row["flop_ratio"] = row["gflop_per_image"] / reference["gflop_per_image"]
        row["cpu_time_ratio"] = row["cpu_seconds_per_image"] / reference["cpu_seconds_per_image"]
        row["meets_target"] = (
            row["flop_ratio"] <= TARGET
            and row["plugin_epoch_fraction"] >= 0.2
            and row["plugin_in_last_tenth_at_final_size"]
        )
    description, slug = device_info(CPU)
    commit, dirty = git_commit()
    report = {
        "device": description, "torch": torch.__version__, "lightning": L.__version__, "commit": commit,
        "dirty": dirty, "setup": vars(options) | {"model": args.model}, "per_size": per_size, "recipes": rows,
        "minutes": (time.perf_counter() - start) / 60, "load_avg_1min": os.getloadavg()[0],
    }  # fmt: skip
    table = ReportTable(
        ["recipe", "sizes (px)", "plug-in epochs", "plug-in share", "GFLOP/img", "FLOP x", "CPU time x", "GPU time x",
         "target"],
        [
            [name, "/".join(map(str, r["sizes"])), f"{r['plugin_epoch_fraction']:.0%}",
             f"{r['plugin_batch_fraction']:g}" if r["plugin_epoch_fraction"] else "-", f"{r['gflop_per_image']:,.0f}",
             f"{r['flop_ratio']:.2f}", f"{r['cpu_time_ratio']:.2f}", "not measured",
             "met" if r["meets_target"] else "-"]
            for name, r in rows.items()
        ],
        align="llrrrrrrl",
    )  # fmt: skip
    lines = [
        f"- {description}; torch {torch.__version__}; commit {commit}{' (+ local changes)' if dirty else ''}",
        f"- ViT-B/16 (MAE decoder 512-d, 8 blocks), fp32, batch {args.batch_size} per measured step; "
        f"{report['minutes']:.1f} min; 1-min load {report['load_avg_1min']:.1f}",
        "- command: python benchmarks/recipe_cost.py" + (f" --threads {options.threads}" if options.threads else ""),
    ]
    notes = [
        "GFLOP/img: a whole recipe's training FLOPs per image (all epochs), matmuls, convolutions and attention, "
        "forward + attack + backward; FLOP x and CPU time x: over the plain MAE recipe, from this run's measurements.",
        "The plug-in on a share f of a batch costs f x (plug-in step - MAE step) on top of the MAE step: exact for "
        "FLOPs, a linear model for time.",
        "target: FLOPs at most 1.0x the plain recipe, the plug-in in at least 20% of the epochs, including the last "
        "10% at the final resolution.",
        "GPU time x: not measured here; benchmarks/device_check.sh measures images/s at these sizes on a GPU.",
        "Quality at these settings is untested: benchmarks/device_study.sh is the way to test it.",
    ]
    path = write_report(options.out, f"recipe_cost_{slug}", [table], report, heading="Recipe cost", lines=lines,
                        notes=notes)  # fmt: skip
    print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
