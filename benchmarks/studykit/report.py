"""The report of a preset's records: study_<preset>.md (decision, paired differences, detectable effects,
per-arm summary, every run) and the corruption and PGD plots."""

import math
import statistics
from pathlib import Path

import torch

from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES
from advmim_pl.report import ReportTable, report_markdown

from .design import ARMS, COMPARISONS, FLOORS, METRICS, PGD_EPS, PIXELS, PRESETS
from .evaluate import CORRUPTION_SEEDING
from .stats import comparison, decide, difference_text


def arm_order(records: list[dict]) -> list[str]:
    present = {r["arm"] for r in records}
    return [a for a in (*ARMS, PIXELS) if a in present]


def runs_of(records: list[dict], arm: str) -> list[dict]:
    return sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])


def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def summary(values: list[float]) -> str:
    """Percent, with the standard deviation over seeds when there are several."""
    if len(values) == 1:
        return pct(values[0])
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def epochs_cell(record: dict) -> str:
    """A record's pre-training epochs ("-" for the raw pixels, which have none)."""
    return "-" if record.get("epochs") is None else f"{record['epochs']:g}"


def difference_rows(records: list[dict]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of paired differences (mean [95% t-interval]) and of detectable effects, one per comparison present."""
    diffs, mdes = [], []
    for arm, reference in COMPARISONS:
        cells = [comparison(records, m, arm, reference) for m in METRICS]
        if not any(cells):
            continue
        n = max(c["n"] for c in cells if c)
        diffs.append([f"{arm} − {reference}", str(n), *(difference_text(c) for c in cells)])
        mdes.append([f"{arm} − {reference}", str(n), *(pct(c["mde"]) if c else "" for c in cells)])
    return diffs, mdes


RUN_DETAILS = ["pre-train min", "eval min", "device", "commit", "date"]


def attack_cell(record: dict) -> str:
    """The attack objective at x_a over that at a random sign, at the run's last logging step ("-": no attack or
    a record made before it was kept)."""
    attack = record.get("attack", {})
    if "attack/objective_random" not in attack:
        return "-"
    return f"{attack['attack/objective_adv'] / attack['attack/objective_random']:.1f}"


def markdown(preset: str, records: list[dict]) -> str:
    """The results file: decision, paired differences, per-arm summary, every run."""
    spec, arms = PRESETS[preset], arm_order(records)
    keys, columns = list(METRICS), list(METRICS.values())
    helps, reason = decide(records)
    robust = []
    for eps in PGD_EPS:
        verdict, why = decide(records, f"pgd/{eps}")
        robust.append(f"- PGD-10 {eps}/255: **{'helps' if verdict else 'does not help'}** ({why})")
    diffs, mdes = difference_rows(records)
    summary_rows = [
        [arm, ", ".join(str(r["seed"]) for r in runs_of(records, arm)), epochs_cell(runs_of(records, arm)[0])]
        + [summary([r["metrics"][k] for r in runs_of(records, arm)]) for k in keys]
        for arm in arms
    ]
    run_rows = [
        [arm, str(r["seed"]), epochs_cell(r), *(pct(r["metrics"][k]) for k in keys), attack_cell(r)]
        + [f"{r['minutes'].get('pretrain', 0):.1f}", f"{r['minutes']['eval']:.1f}", r["device"], r["commit"], r["date"]]
        for arm in arms
        for r in runs_of(records, arm)
    ]
    former = [f"{r['arm']} seed {r['seed']}" for r in records if r.get("corruption_seeding") != CORRUPTION_SEEDING]
    lines = [
        f"Made by `python benchmarks/study.py --preset {preset}` (design and decision rule: benchmarks/README.md). "
        f"Pre-training for E = {spec.epochs} epoch(s) on Fashion-MNIST train; frozen encoders, average-pooled "
        "features. "
        "Top-1 accuracy in %: converged logistic-regression probe (primary) and kNN on the 10,000 Fashion-MNIST "
        f"test images; MNIST 5-fold probe; corruptions (11 x 5) and PGD-10 of the frozen encoder plus its probe on "
        f"the first {spec.robust_images} test images, by `advmim_pl.eval.robust.robust_accuracy` (corruption noise: "
        f"{CORRUPTION_SEEDING}). Attack adv / random: the attack objective at the adversarial "
        "example over that at an energy-matched random sign, at the last logging step of pre-training.",
        *(
            [
                "",
                f"Corruption numbers of {len(former)} record(s) still come from the study's former seeding (the "
                "noise generator reseeded with 0 for each corruption and severity), not comparable with the others: "
                f"{', '.join(former)}.",
            ]
            if former
            else []
        ),
        "",
        "## Decision (pre-registered rule)",
        "",
        f"- Primary metric (probe): MAE+AEMIM **{'helps' if helps else 'does not help'}** ({reason}).",
        *robust,
    ]
    tables = [
        ReportTable(
            ["difference", "seeds", *columns],
            diffs,
            "Paired differences, percentage points: mean over seeds [95% t-interval, n − 1 dof]",
        ),
        ReportTable(
            ["difference", "seeds", *columns],
            mdes,
            "Smallest detectable effect (two-sided 5% test, 80% power, from the observed spread of the differences)",
        ),
        ReportTable(["arm", "seeds", "epochs", *columns], summary_rows, "Per arm: mean ± std over seeds"),
        ReportTable(["arm", "seed", "epochs", *columns, "attack adv / random", *RUN_DETAILS], run_rows, "Every run"),
    ]
    return report_markdown(tables, f"Study v2, preset `{preset}`: does the AEMIM plug-in help?", lines)


def plot(preset: str, records: list[dict], out: Path, arms: list[str] | None = None) -> list[Path]:
    """Accuracy against corruption severity (0 = clean) and against the PGD eps (0 = clean): one line per arm of
    ``arms`` (default: study v2's, in order), std over seeds as error bars, the floors dashed. Skipped where
    matplotlib is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print(f"[study {preset}] matplotlib is not installed: plots skipped (redraw them with --report)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "corruptions": (
            [0, *SEVERITIES],
            lambda m: [
                m["clean_subset"],
                *(statistics.fmean(m[f"corruption/{c}/{s}"] for c in CORRUPTIONS) for s in SEVERITIES),
            ],
            "corruption severity (0 = clean; mean over 11 corruptions)",
        ),
        "pgd": (
            [0, *PGD_EPS],
            lambda m: [m["clean_subset"], *(m[f"pgd/{e}"] for e in PGD_EPS)],
            "PGD-10 L-inf eps (x/255; 0 = clean)",
        ),
    }
    paths = []
    for name, (xs, curve, xlabel) in figures.items():
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for arm in arms or arm_order(records):
            runs = runs_of(records, arm)
            ys = torch.tensor([curve(r["metrics"]) for r in runs]) * 100
            std = ys.std(dim=0) if len(runs) > 1 else torch.zeros(len(xs))
            style = dict(linestyle="--", color="grey" if arm == PIXELS else "black") if arm in FLOORS else {}
            ax.errorbar(xs, ys.mean(dim=0), yerr=std, marker="o", capsize=3, label=f"{arm} (n={len(runs)})", **style)
        ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title=f"Fashion-MNIST, frozen encoder + probe, {preset}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"study_{preset}_{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(preset: str, records: list[dict], out: Path) -> None:
    """study_<preset>.md and the plots; skipped where scipy is missing (``--report`` redraws them later)."""
    try:
        text = markdown(preset, records)
    except ModuleNotFoundError as err:
        print(f"[study {preset}] {err.name} is not installed: report skipped (rebuild it with --report)")
        return
    (out / f"study_{preset}.md").write_text(text)
    plot(preset, records, out)
