"""The study's statistics, pure functions of the records: paired differences, t-intervals, the smallest
detectable effect and the pre-registered decision rule."""

import math
import statistics

from .design import PRIMARY, RULE


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (scipy, imported here: the study's records
    need no scipy, only its report)."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided ``level`` t-interval of the mean of ``values`` (n - 1 degrees of freedom);
    the bounds are nan for fewer than two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def detectable_effect(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true paired difference that a two-sided t-test at 1 - ``level`` detects with probability
    ``power``, for n pairs whose differences have standard deviation ``sd``: (t_{1-a/2} + t_power) sd / sqrt(n),
    n - 1 degrees of freedom (the usual approximation); nan for n < 2."""
    if n < 2:
        return math.nan
    df = n - 1
    return (t_quantile(0.5 + level / 2, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def paired_differences(records: list[dict], metric: str, arm: str, reference: str) -> dict[int, float]:
    """{seed: metric(arm) - metric(reference)} over the seeds both arms have; for a corruption metric, only the
    seeds whose two records share their ``corruption_seeding`` (the same corrupted images)."""
    by_seed = {(r["arm"], r["seed"]): r for r in records if metric in r["metrics"]}
    seeds = sorted({s for a, s in by_seed if a == arm} & {s for a, s in by_seed if a == reference})
    pairs = [(s, by_seed[arm, s], by_seed[reference, s]) for s in seeds]
    if metric.startswith("corruption/"):
        pairs = [(s, a, b) for s, a, b in pairs if a.get("corruption_seeding") == b.get("corruption_seeding")]
    return {s: a["metrics"][metric] - b["metrics"][metric] for s, a, b in pairs}


def comparison(records: list[dict], metric: str, arm: str, reference: str) -> dict | None:
    """Paired difference of ``arm`` over ``reference``: n, mean, 95% t-interval, sd and detectable effect (None
    when no seed has both)."""
    diffs = list(paired_differences(records, metric, arm, reference).values())
    if not diffs:
        return None
    mean, low, high = t_interval(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return {"n": len(diffs), "mean": mean, "low": low, "high": high, "sd": sd, "mde": detectable_effect(sd, len(diffs))}


def decide(records: list[dict], metric: str = PRIMARY, rule=RULE) -> tuple[bool, str]:
    """The pre-registered rule: the plug-in's arm helps on ``metric`` only if its paired differences against each
    reference of ``rule`` ((arm, reference) pairs; study v2's: MAE and the noise control MAE+sign) all have 95%
    t-intervals above zero. (verdict, reason)."""
    reasons, helps = [], True
    for arm, reference in rule:
        c = comparison(records, metric, arm, reference)
        if c is None or c["n"] < 2:
            return False, f"{arm} - {reference}: fewer than two paired seeds, no interval"
        above = c["low"] > 0
        helps &= above
        reasons.append(
            f"{arm} - {reference} = {100 * c['mean']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}] "
            f"({'above zero' if above else 'not above zero'})"
        )
    return helps, "; ".join(reasons)


def difference_text(c: dict | None, missing: str = "") -> str:
    """A paired difference (``comparison``'s dict) in points: mean [95% t-interval], or "mean (n=1)"; ``missing``
    where there is none."""
    if c is None:
        return missing
    if c["n"] < 2:
        return f"{100 * c['mean']:+.2f} (n=1)"
    return f"{100 * c['mean']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
