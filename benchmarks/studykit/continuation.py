"""Study preset cpu-continue: does a short AEMIM continuation of a trained MAE beat continuing MAE?

The design, the pilot's choice rule and the decision rule are pre-registered in benchmarks/README.md
("study.py --preset cpu-continue"). This module is the pilot: the base (MAE trained for E0 epochs, fully annealed)
at each pilot E0 and the random-encoder floor, scored on the candidate primary metrics (the converged
logistic-regression probe, kNN, and fine-tuning with 1% and 10% of the labels). Each job is recorded in
``results/study_<preset>_pilot.json`` as it finishes; the report says which E0 and metric the rule picks.

    python benchmarks/study.py --preset cpu-continue --pilot
"""

import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from advmim_pl.cli import run
from advmim_pl.report import ReportTable

from .commands import limit_arguments, pretrain
from .design import QUIET, SMOKE_GPU_SIZES, SMOKE_SIZES, Preset
from .evaluate import EvalData, accuracy, checkpoint_encoder, encoder_features, evaluate
from .jobs import claim, read_records, save, say_what_is_left
from .report import pct

FLOOR = "random encoder"
CANDIDATES = ("probe", "knn", "ft1", "ft10")  # the candidate primary metrics, in the README's order
MARGIN = 0.03  # the chosen metric's margin over the floor must exceed 3 points
# ---- the arms (continuation_arms.py runs them, continuation_report.py reports them) ----
BASE = "base"
# continuation arm -> the study v2 arm whose configs it trains with (None: the base itself, no continuation)
ARMS = {
    BASE: None,
    "MAE continued": "MAE",
    "MAE+AEMIM continued": "MAE+AEMIM",
    "MAE+sign continued": "MAE+sign",
    "MAE continued, compute-matched": "MAE",
}
MATCHED = "MAE continued, compute-matched"  # trains r x E1 epochs, r = the seed's MAE+AEMIM / MAE minutes
# the decision rule's pairs: the plug-in's continuation helps only if both intervals are above zero
RULE = (("MAE+AEMIM continued", "MAE continued"), ("MAE+AEMIM continued", "MAE+sign continued"))
COMPARISONS = [
    *RULE,
    ("MAE+AEMIM continued", MATCHED),
    ("MAE+sign continued", "MAE continued"),
    ("MAE continued", BASE),
    ("MAE+AEMIM continued", BASE),
    (BASE, FLOOR),
]


@dataclass(frozen=True)
class FewLabels:
    """One few-label fine-tuning protocol: the fraction of training labels kept (class-balanced) and the epochs
    that make about 200 steps of it."""

    fraction: float
    epochs: int


@dataclass(frozen=True)
class ContinuePreset:
    """A size of the continuation study: the pre-training preset it shares with study v2, the pilot's E0 values,
    the evaluation seeds, the few-label protocols, the arguments added to every fine-tune, the continuation recipe
    (E1 epochs, base lr, warm-up epochs), the study v2 preset whose random-encoder and raw-pixel records are the
    floors, and a fixed (E0, primary metric) that replaces the pilot's choice (the smoke preset's toy sizes)."""

    pretrain: Preset
    pilot_epochs: tuple[int, ...]
    floors_from: str
    eval_seeds: tuple[int, ...] = (0, 1, 2)
    few_labels: dict[str, FewLabels] = field(
        default_factory=lambda: {"ft1": FewLabels(0.01, 22), "ft10": FewLabels(0.1, 2)}
    )
    finetune_extra: tuple[str, ...] = ()
    continue_epochs: int = 1
    continue_lr: float = 3e-4
    continue_warmup: float = 0.1
    fixed_choice: tuple[int, str] | None = None


CONTINUE_PRESETS = {
    "cpu-continue": ContinuePreset(
        Preset("cpu", epochs=1, time_ratio=None, seeds=3, arms=()), pilot_epochs=(4, 8, 16), floors_from="cpu"
    ),
    # the same machinery at toy size, for the tests
    "smoke-continue": ContinuePreset(
        Preset("cpu", epochs=1, time_ratio=None, seeds=2, arms=(), **SMOKE_SIZES),
        pilot_epochs=(1, 2),
        floors_from="smoke",
        eval_seeds=(0, 1),
        few_labels={"ft1": FewLabels(0.2, 1), "ft10": FewLabels(0.4, 1)},
        finetune_extra=("--data.init_args.batch_size=16", "--trainer.limit_train_batches=2"),
        fixed_choice=(1, "ft10"),
    ),
    # the same design at the gpu preset's size (ViT-Tiny width, 4 blocks, 32 px, bf16, batch 512): a base of 30
    # or 50 epochs, chosen by its own pilot
    "gpu-continue": ContinuePreset(
        Preset("gpu", epochs=1, time_ratio=None, seeds=3, arms=(), batch_size=512),
        pilot_epochs=(30, 50),
        floors_from="gpu",
    ),
    # the gpu preset's configs at toy size, so that the CPU tests them
    "smoke-gpu-continue": ContinuePreset(
        Preset("gpu", epochs=1, time_ratio=None, seeds=1, arms=(), **SMOKE_GPU_SIZES),
        pilot_epochs=(1,),
        floors_from="smoke-gpu",
        eval_seeds=(0,),
        few_labels={"ft1": FewLabels(0.2, 1), "ft10": FewLabels(0.4, 1)},
        finetune_extra=(
            "--data.init_args.batch_size=16",
            "--trainer.limit_train_batches=2",
            "--trainer.precision=32-true",
        ),
        fixed_choice=(1, "ft10"),
    ),
}


def base_name(epochs: int) -> str:
    return f"base E0={epochs}"


def pilot_jobs(spec: ContinuePreset) -> list[tuple[int, str]]:
    """(evaluation seed, encoder) jobs in the pre-registered order: the floor at every seed, then the base at each E0
    in increasing order, every seed."""
    encoders = [FLOOR, *(base_name(e) for e in spec.pilot_epochs)]
    return [(seed, encoder) for encoder in encoders for seed in spec.eval_seeds]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def base_checkpoint(spec: ContinuePreset, epochs: int, work: Path, data_args: list[str]) -> Path:
    """The base's checkpoint (MAE, seed 0, ``epochs`` epochs, its cosine ending at the last step), trained on first
    use and kept in ``work``; weights, hyper-parameters and the training state of a finished run."""
    path = work / f"base_E{epochs}.ckpt"
    if not path.exists():
        cli = pretrain(spec.pretrain, "MAE", 0, work / f"base_E{epochs}", epochs, data_args)
        cli.trainer.save_checkpoint(path)
    return path


def few_label_accuracy(
    spec: ContinuePreset, protocol: str, init_from: Path | None, seed: int, data: EvalData, folder: Path, extra: list
) -> float:
    """Test top-1 (fraction, all test images of ``data``) of the fixed few-label fine-tune (configs/study/cpu/
    finetune_few.yaml, or the gpu preset's) of ``init_from`` (None: a random initialisation) at evaluation ``seed``."""
    few = spec.few_labels[protocol]
    logger = f"--trainer.logger={{class_path: TensorBoardLogger, init_args: {{save_dir: {folder}, name: {protocol}}}}}"
    argv = [
        "fit",
        "-c",
        f"study/{spec.pretrain.configs}/finetune_few.yaml",
        f"--model.init_args.init_from={init_from if init_from is not None else 'null'}",
        f"--data.init_args.label_fraction={few.fraction}",
        f"--data.init_args.label_seed={seed}",
        "--seed_everything",
        str(seed),
        f"--trainer.max_epochs={few.epochs}",
        f"--model.init_args.warmup_epochs={0.1 * few.epochs}",
        logger,
        *QUIET,
        *spec.finetune_extra,
        *extra,
    ]
    model = run(argv).model.eval()
    with torch.no_grad():
        logits = torch.cat([model.logits(chunk) for chunk in data.test_x.split(spec.pretrain.eval_batch)])
    return accuracy(logits, data.test_y)


def score(
    spec: ContinuePreset, encoder: str, seed: int, work: Path, data: EvalData, data_args: list[str]
) -> tuple[dict[str, float], dict]:
    """The candidate metrics of one (encoder, evaluation seed) job, and what the record says of the encoder.

    The probe and kNN are deterministic given the features: the floor has them at every seed (its initialisation
    is the seed's), the base only at seed 0."""
    folder = work / encoder.replace(" ", "_").replace("=", "") / f"seed{seed}"
    if encoder == FLOOR:
        cli = pretrain(spec.pretrain, FLOOR, seed, folder, 0, data_args)
        metrics, init_from, about = (
            evaluate(encoder_features(cli.model.encoder), data, spec.pretrain, full=False),
            None,
            {},
        )
    else:
        epochs = int(encoder.rpartition("=")[2])
        init_from = base_checkpoint(spec, epochs, work, data_args)
        about = {"epochs": epochs, "base_sha256": sha256(init_from)}
        metrics = {}
        if seed == 0:
            base = checkpoint_encoder(init_from, data.test_x.device)
            metrics = evaluate(encoder_features(base), data, spec.pretrain, full=False)
    extra = data_args + limit_arguments(spec.pretrain)
    for protocol in spec.few_labels:
        metrics[protocol] = few_label_accuracy(spec, protocol, init_from, seed, data, folder, extra)
    return metrics, about


# ---- the pilot's choice ---------------------------------------------------------------------------------------
def values(records: list[dict], encoder: str, metric: str) -> list[float]:
    """``metric`` of ``encoder`` at each evaluation seed that has it, in seed order."""
    ordered = sorted(records, key=lambda r: r["seed"])
    return [r["metrics"][metric] for r in ordered if r["arm"] == encoder and metric in r["metrics"]]


def spread(a: list[float], b: list[float]) -> float:
    """sqrt((sd_a^2 + sd_b^2) / 2), a single value contributing sd 0."""
    sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (a, b)]
    return math.sqrt((sd[0] ** 2 + sd[1] ** 2) / 2)


def margins(records: list[dict], epochs: tuple[int, ...]) -> list[dict]:
    """Per (E0, metric) with values on both sides: base and floor means, margin, spread and margin / spread."""
    rows = []
    for e in epochs:
        for metric in CANDIDATES:
            base, floor = values(records, base_name(e), metric), values(records, FLOOR, metric)
            if not base or not floor:
                continue
            margin, s = statistics.fmean(base) - statistics.fmean(floor), spread(base, floor)
            rows.append(
                {
                    "epochs": e,
                    "metric": metric,
                    "base": base,
                    "floor": floor,
                    "margin": margin,
                    "spread": s,
                    "ratio": margin / s if s > 0 else math.inf,
                    "passes": margin > MARGIN,
                }
            )
    return rows


def choose(rows: list[dict]) -> dict | None:
    """The pre-registered choice: the smallest E0 at which some metric's margin exceeds 3 points, and at it the
    passing metric with the largest margin / spread; None when nothing passes."""
    passing = [r for r in rows if r["passes"]]
    if not passing:
        return None
    smallest = min(r["epochs"] for r in passing)
    return max((r for r in passing if r["epochs"] == smallest), key=lambda r: r["ratio"])


def pilot_markdown(name: str, spec: ContinuePreset, records: list[dict]) -> str:
    rows = margins(records, spec.pilot_epochs)
    chosen = choose(rows)
    cells = [
        [
            str(r["epochs"]),
            r["metric"],
            " / ".join(pct(v) for v in r["base"]),
            " / ".join(pct(v) for v in r["floor"]),
            f"{100 * r['margin']:+.2f}",
            f"{100 * r['spread']:.2f}",
            f"{r['ratio']:.1f}",
            "yes" if r["passes"] else "no",
        ]
        for r in rows
    ]
    done = {r["arm"] for r in records}
    missing = [base_name(e) for e in spec.pilot_epochs if base_name(e) not in done]
    if chosen:
        verdict = (
            f"**Choice: E0 = {chosen['epochs']}, primary metric `{chosen['metric']}`** (margin "
            f"{100 * chosen['margin']:+.2f} points, {chosen['ratio']:.1f} spreads)."
        )
    elif missing:
        verdict = f"No choice yet: nothing passes among the recorded jobs; still to run: {', '.join(missing)}."
    else:
        verdict = "**No (E0, metric) beats the floor by more than 3 points: the arms do not run.**"
    commits = sorted({r["commit"] for r in records})
    lines = [
        f"# Continuation study pilot, preset `{name}`: the base against the random encoder",
        "",
        f"Made by `python benchmarks/study.py --preset {name} --pilot` (design and choice rule: benchmarks/README.md). "
        "Top-1 in % on the Fashion-MNIST test images, per evaluation seed. probe: converged logistic regression on "
        "average-pooled features; knn: k = 20, T = 0.07; ft1 / ft10: the fixed fine-tune with 1% / 10% of the "
        "training labels. The probe and kNN of the base are deterministic (one value). Spread: "
        "sqrt((sd_base^2 + sd_floor^2) / 2).",
        "",
        *ReportTable(
            ["E0", "metric", "base", "random encoder", "margin", "spread", "margin / spread", "> 3 points"], cells
        ).markdown(),
        "",
        verdict,
        "",
        f"Records: {len(records)} jobs, commit(s) {', '.join(commits)}, {records[-1]['device'] if records else ''}.",
    ]
    return "\n".join(lines) + "\n"


def run_pilot(name, work: Path, data: EvalData, data_args: list[str], out: Path, provenance: dict, budget) -> None:
    """Every missing pilot job while the ``budget`` (``jobs.Budget``) allows, each recorded as it finishes, the
    report rebuilt after each."""
    spec = CONTINUE_PRESETS[name]
    results, lock, claims = out / f"study_{name}_pilot.json", work / "records.lock", work / "claims.json"
    jobs = [j for j in pilot_jobs(spec) if (j[0], j[1]) not in {(r["seed"], r["arm"]) for r in read_records(results)}]
    report = lambda records: (out / f"study_{name}_pilot.md").write_text(pilot_markdown(name, spec, records))
    while budget.allows() and (job := claim(claims, lock, results, jobs)) is not None:  # budget first, as run_jobs
        jobs.remove(job)
        seed, encoder = job
        start = time.perf_counter()
        metrics, about = score(spec, encoder, seed, work, data, data_args)
        record = {"preset": name, "arm": encoder, "seed": seed, **about, "metrics": metrics}
        record |= {"minutes": (time.perf_counter() - start) / 60, **provenance}
        budget.took(record["minutes"])
        record["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        save(results, lock, claims, job, record, report)
        shown = ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items() if k in CANDIDATES)
        print(f"[pilot {name}] {encoder} seed {seed}: {shown}, {record['minutes']:.1f} min", flush=True)
    say_what_is_left(f"pilot {name}", jobs, budget)
