"""The device study's report: pure functions of its records (``device_study.json``) that apply the rule written in
benchmarks/README.md ("device_study.sh") before any run: the gate (MAE beats the random encoder by 3 points on the
probe), the fine-tune's convergence check, and the decision on the primary metric from complete seeds only.

A record is a dict with ``arm``, ``seed`` and ``metrics`` (fractions: ``probe``, ``knn``, ``ft``, and at seed 0
for MAE and the random encoder also ``ft_half``, the same fine-tune at half the steps), and ``seconds`` (phases).
"""

import math
import statistics

from studykit.stats import comparison, difference_text

ARMS = ("random encoder", "MAE", "MAE+AEMIM", "MAE+sign")  # every seed's jobs, in this order
FLOOR = "random encoder"
PRIMARY = "probe"
METRICS = {"probe": "probe (primary)", "knn": "kNN", "ft": "fine-tune 10% labels"}
RULE = (("MAE+AEMIM", "MAE"), ("MAE+AEMIM", "MAE+sign"))  # "helps" needs both intervals above zero
PAIRS = (*RULE, ("MAE+sign", "MAE"), ("MAE", FLOOR))  # the paired differences printed
GATE = 0.03  # MAE - random encoder on the probe, mean over complete seeds, at least 3 points
CONVERGED = 0.005  # |ft - ft_half| at most 0.5 points, for MAE and the random encoder of seed 0
ROUNDING = 1e-6  # accuracies are float32 fractions: a difference of exactly 3 points may read 0.0299999
CHECKED = ("MAE", FLOOR)  # the encoders whose fine-tune runs at half length too (seed 0)


def complete_seeds(records: list[dict]) -> list[int]:
    """Seeds that have a record of every arm of ``ARMS``, ascending."""
    arms_of: dict[int, set[str]] = {}
    for r in records:
        arms_of.setdefault(r["seed"], set()).add(r["arm"])
    return sorted(s for s, arms in arms_of.items() if set(ARMS) <= arms)


def of_complete_seeds(records: list[dict]) -> list[dict]:
    """The records of complete seeds only: a seed cut short by the time budget takes no part in any difference."""
    keep = set(complete_seeds(records))
    return [r for r in records if r["seed"] in keep]


def gate(records: list[dict]) -> tuple[bool, str]:
    """(passed, reason): MAE - random encoder on the probe, mean over the complete seeds, >= ``GATE``."""
    c = comparison(of_complete_seeds(records), PRIMARY, "MAE", FLOOR)
    if c is None:
        return False, "no complete seed: MAE - random encoder is unknown"
    passed = c["mean"] >= GATE - ROUNDING
    return passed, (
        f"MAE - random encoder on the probe = {100 * c['mean']:+.2f} points over {c['n']} seed(s) "
        f"({'at least' if passed else 'under'} {100 * GATE:.0f})"
    )


def fine_tune_converged(records: list[dict]) -> tuple[bool | None, str]:
    """(converged, reason): at seed 0, the fine-tune of each of ``CHECKED`` moved by at most ``CONVERGED`` between
    half and full length. None when the check has not run (seed 0 of both is missing)."""
    moves = {}
    for r in records:
        if r["seed"] == 0 and r["arm"] in CHECKED and "ft_half" in r["metrics"]:
            moves[r["arm"]] = r["metrics"]["ft"] - r["metrics"]["ft_half"]
    if set(moves) != set(CHECKED):
        return None, "the half-length fine-tunes of seed 0 have not run"
    converged = all(abs(m) <= CONVERGED + ROUNDING for m in moves.values())
    said = ", ".join(f"{arm} {100 * m:+.2f}" for arm, m in moves.items())
    return converged, (
        f"full - half length, seed 0: {said} points ({'each within' if converged else 'not each within'} "
        f"{100 * CONVERGED:.1f})"
    )


def decision(records: list[dict]) -> tuple[str, list[str]]:
    """The verdict on the primary metric and the lines that say why, by the pre-registered rule: no verdict without
    two complete seeds or without the gate; otherwise "helps" only if every pair of ``RULE`` has its 95% t-interval
    above zero."""
    complete = of_complete_seeds(records)
    seeds = complete_seeds(records)
    passed, gate_reason = gate(records)
    lines = [f"complete seeds: {seeds or 'none'}", f"gate: {gate_reason}"]
    if len(seeds) < 2:
        return "no verdict: fewer than two complete seeds, no interval", lines
    if not passed:
        return "no verdict: the gate failed, so the runs are too short to speak to the representation", lines
    helps = True
    for arm, reference in RULE:
        c = comparison(complete, PRIMARY, arm, reference)
        above = c["low"] > 0
        helps &= above
        lines.append(f"{arm} - {reference}: {interval(c)} ({'above zero' if above else 'not above zero'})")
    return ("MAE+AEMIM helps" if helps else "MAE+AEMIM does not help"), lines


def interval(c: dict | None) -> str:
    """A paired difference in points: mean [95% t-interval] (n seeds); "-" where there is none."""
    return difference_text(c, missing="-")


def difference_rows(records: list[dict]) -> list[list[str]]:
    """One row per pair of ``PAIRS``: the paired differences over the complete seeds, every metric."""
    complete = of_complete_seeds(records)
    return [
        [f"{arm} − {reference}", *(interval(comparison(complete, m, arm, reference)) for m in METRICS)]
        for arm, reference in PAIRS
    ]


def mean_sd(values: list[float]) -> str:
    """Percent, ± the standard deviation when there are several values."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def arm_rows(records: list[dict]) -> list[list[str]]:
    """Per arm over its recorded seeds: seeds, mean ± sd of every metric, pre-training seconds."""
    rows = []
    for arm in ARMS:
        runs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        if runs:
            cells = [mean_sd([r["metrics"][m] for r in runs if m in r["metrics"]]) for m in METRICS]
            seconds = statistics.fmean(r["seconds"]["pretrain"] for r in runs)
            rows.append([arm, ", ".join(str(r["seed"]) for r in runs), *cells, f"{seconds:.1f}"])
    return rows


def time_ratios(records: list[dict]) -> dict[int, float]:
    """{seed: MAE+AEMIM pre-training seconds / MAE's}, both measured in one process at one commit."""
    seconds = {(r["arm"], r["seed"]): r["seconds"]["pretrain"] for r in records}
    return {
        s: seconds["MAE+AEMIM", s] / seconds["MAE", s]
        for (arm, s) in seconds
        if arm == "MAE" and ("MAE+AEMIM", s) in seconds and seconds["MAE", s] > 0
    }


def report_lines(records: list[dict], setup: dict) -> list[str]:
    """The report as plain lines (printed, and the Markdown file's body)."""
    verdict, why = decision(records)
    converged, ft_reason = fine_tune_converged(records)
    ft_state = {True: "converged", False: "NOT converged: its numbers speak to its step count only", None: "unknown"}
    ratios = time_ratios(records)
    lines = [
        f"Device study: {setup['epochs']} epoch(s) of pre-training per arm, {setup['device']}, commit "
        f"{setup['commit']}, torch {setup['torch']}",
        f"Decision (primary: the probe): **{verdict}**",
        *(f"- {line}" for line in why),
        f"- fine-tune: {ft_state[converged]} ({ft_reason})",
        "- MAE+AEMIM / MAE pre-training time, same process and commit: "
        + (", ".join(f"seed {s} {r:.2f}" for s, r in sorted(ratios.items())) or "-"),
    ]
    if any(math.isnan(r["metrics"].get(PRIMARY, 0.0)) for r in records):
        lines.append("- a probe accuracy is NaN: a run diverged")
    return lines


def markdown(records: list[dict], setup: dict) -> str:
    """The report file: the decision, the paired differences, the arms."""
    diff_header = "| difference (points, complete seeds) | " + " | ".join(METRICS.values()) + " |"
    arm_header = "| arm | seeds | " + " | ".join(METRICS.values()) + " | pre-training s |"
    table = [diff_header, "|---" * (1 + len(METRICS)) + "|"]
    table += ["| " + " | ".join(row) + " |" for row in difference_rows(records)]
    arms = [arm_header, "|---" * (3 + len(METRICS)) + "|"]
    arms += ["| " + " | ".join(row) + " |" for row in arm_rows(records)]
    return "\n".join(["# Device study: MAE, MAE+AEMIM, MAE+sign", "", *report_lines(records, setup), "", *table, "",
                      *arms, ""])  # fmt: skip
