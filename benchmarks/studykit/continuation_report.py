"""The continuation study's report: study_<preset>.md (the decision by the pre-registered rule, paired differences,
detectable effects, per-arm summary with the floors, every run) and the corruption and PGD plots.

The floors are not trained again: the random encoder and the raw pixels are the same encoders through the same
evaluation as study v2's (its ``floors_from`` preset), so their records come from ``study_<floors_from>.json``,
with the random initialisation's few-label fine-tunes from the continuation pilot."""

from pathlib import Path

from advmim_pl.report import ReportTable, report_markdown

from .continuation import ARMS, CANDIDATES, COMPARISONS, CONTINUE_PRESETS, FLOOR, RULE
from .design import PGD_EPS, PIXELS
from .jobs import read_records
from .report import pct, plot, runs_of, summary
from .stats import comparison, decide, difference_text

SECONDARY = {
    "probe": "probe",
    "knn": "kNN",
    "mnist": "MNIST 5-fold",
    "corruption/mean": "corruptions (mean)",
    **{f"pgd/{e}": f"PGD-10 {e}/255" for e in PGD_EPS},
}
FEW = {"ft1": "ft 1% labels", "ft10": "ft 10% labels"}
DETECT = 0.01  # with a detectable effect over 1 point on the primary, seeds 3 and 4 are added before deciding


def metrics_of(primary: str) -> dict[str, str]:
    """Metric key -> column title, the primary first."""
    columns = FEW | SECONDARY
    return {primary: f"{columns[primary]} (primary)"} | {k: v for k, v in columns.items() if k != primary}


def cell(values: list[float]) -> str:
    """Mean ± std over seeds, "-" for a metric the arm does not have (the raw pixels cannot be fine-tuned)."""
    return summary(values) if values else "-"


def floor_records(preset: str, pilot: list[dict], out: Path) -> list[dict]:
    """The floors' records: study v2's random encoder (with the pilot's few-label fine-tunes of the same seed) and
    raw pixels, from ``study_<floors_from>.json`` in ``out``."""
    v2 = read_records(out / f"study_{CONTINUE_PRESETS[preset].floors_from}.json")
    few = {r["seed"]: {k: v for k, v in r["metrics"].items() if k in CANDIDATES} for r in pilot if r["arm"] == FLOOR}
    floors = []
    for r in v2:
        if r["arm"] == FLOOR:
            floors.append(r | {"metrics": r["metrics"] | few.get(r["seed"], {})})
        elif r["arm"] == PIXELS:
            floors.append(r)
    return floors


def decision_lines(records: list[dict], primary: str) -> list[str]:
    """The rule on the primary metric, the add-seeds condition, and the same rule on PGD per eps (descriptive)."""
    helps, reason = decide(records, primary, RULE)
    detect = [comparison(records, primary, *pair) for pair in RULE]
    too_wide = [c for c in detect if c and c["n"] >= 3 and c["mde"] > DETECT]
    lines = [
        f"- Primary metric ({primary}): MAE+AEMIM continued **{'helps' if helps else 'does not help'}** ({reason})."
    ]
    if too_wide:
        worst = max(c["mde"] for c in too_wide)
        lines.append(
            f"- The smallest detectable effect on the primary is {100 * worst:.2f} points (> 1): by the design, "
            "seeds 3 and 4 are added (up to 5 paired seeds) before the decision is final."
        )
    for eps in PGD_EPS:
        verdict, why = decide(records, f"pgd/{eps}", RULE)
        lines.append(f"- PGD-10 {eps}/255: **{'helps' if verdict else 'does not help'}** ({why})")
    return lines


def markdown(preset: str, records: list[dict], floors: list[dict]) -> str:
    spec = CONTINUE_PRESETS[preset]
    e0, primary = records[0]["base_epochs"], records[0]["primary"]
    columns = metrics_of(primary)
    everything = records + floors
    arms = [a for a in (*ARMS, FLOOR, PIXELS) if runs_of(everything, a)]
    diffs, mdes = [], []
    for arm, reference in COMPARISONS:
        cells = [comparison(everything, m, arm, reference) for m in columns]
        if any(cells):
            n = str(max(c["n"] for c in cells if c))
            diffs.append([f"{arm} − {reference}", n, *(difference_text(c) for c in cells)])
            mdes.append([f"{arm} − {reference}", n, *(pct(c["mde"]) if c else "" for c in cells)])
    summary_rows = [
        [arm, ", ".join(str(r["seed"]) for r in runs_of(everything, arm))]
        + [cell([r["metrics"][k] for r in runs_of(everything, arm) if k in r["metrics"]]) for k in columns]
        for arm in arms
    ]
    run_rows = [
        [arm, str(r["seed"]), f"{r.get('epochs') or 0:g}", *(pct(r["metrics"].get(k, float("nan"))) for k in columns)]
        + [f"{r.get('time_ratio') or 0:.2f}", f"{r['minutes'].get('pretrain', 0):.1f}", f"{r['minutes']['eval']:.1f}"]
        + [r["commit"], r["date"]]
        for arm in ARMS
        for r in runs_of(records, arm)
    ]
    lines = [
        f"Made by `python benchmarks/study.py --preset {preset}` (design and decision rule: benchmarks/README.md). "
        f"The base is MAE trained for E0 = {e0} epochs (the pilot's choice, fully annealed); each arm continues it "
        f"for E1 = {spec.continue_epochs} epoch(s) at base lr {spec.continue_lr:g}, warm-up {spec.continue_warmup:g} "
        "epoch, seeds paired across arms. Top-1 accuracy in % on Fashion-MNIST test: ft 1% / 10% labels = the fixed "
        "few-label fine-tune (all 10,000 images, evaluation seed = the arm's seed); probe (converged logistic "
        "regression) and kNN on frozen average-pooled features; MNIST 5-fold probe; corruptions (11 x 5) and PGD-10 "
        f"of the frozen encoder plus its probe on the first {spec.pretrain.robust_images} test images. The floors "
        f"(random encoder, raw pixels) are study v2's records of preset `{spec.floors_from}` (the same encoders "
        "through the same evaluation), the random initialisation's fine-tunes those of the continuation pilot.",
        "",
        "## Decision (pre-registered rule)",
        "",
        *decision_lines(records, primary),
    ]
    titles = ["difference", "seeds", *columns.values()]
    tables = [
        ReportTable(
            titles, diffs, "Paired differences, percentage points: mean over seeds [95% t-interval, n − 1 dof]"
        ),
        ReportTable(titles, mdes, "Smallest detectable effect (two-sided 5% test, 80% power, observed spread)"),
        ReportTable(["arm", "seeds", *columns.values()], summary_rows, "Per arm: mean ± std over seeds"),
        ReportTable(
            ["arm", "seed", "epochs", *columns.values(), "time ratio", "pre-train min", "eval min", "commit", "date"],
            run_rows,
            "Every run of this study",
        ),
    ]
    return report_markdown(
        tables, f"Continuation study, preset `{preset}`: does continuing MAE with AEMIM help?", lines
    )


def write_report(preset: str, records: list[dict], pilot: list[dict], out: Path) -> None:
    """study_<preset>.md and the plots (the floors dashed); skipped where scipy is missing."""
    if not records:
        return
    floors = floor_records(preset, pilot, out)
    try:
        text = markdown(preset, records, floors)
    except ModuleNotFoundError as err:
        print(f"[study {preset}] {err.name} is not installed: report skipped (rebuild it with --report)")
        return
    (out / f"study_{preset}.md").write_text(text)
    everything = records + floors
    plot(preset, everything, out, [a for a in (*ARMS, FLOOR, PIXELS) if runs_of(everything, a)])
