"""The continuation study's arms: each starts from the base (MAE trained for the pilot's E0 epochs) and trains E1 more
epochs with the continuation recipe, then is scored on the pilot's primary metric and the secondaries.

The design and the decision rule are pre-registered in benchmarks/README.md ("study.py --preset cpu-continue").
Jobs run seed by seed in the order of ``ARMS``; each is recorded in ``results/study_<preset>.json`` as it finishes.

    python benchmarks/study.py --preset cpu-continue
"""

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from advmim_pl.cli import run

from .commands import attack_log, length_arguments, limit_arguments, pretrain_command
from .continuation import (
    ARMS,
    BASE,
    CONTINUE_PRESETS,
    MATCHED,
    ContinuePreset,
    base_checkpoint,
    base_name,
    choose,
    few_label_accuracy,
    margins,
    sha256,
)
from .continuation_report import write_report
from .evaluate import CORRUPTION_SEEDING, EvalData, checkpoint_encoder, encoder_features, evaluate
from .jobs import Budget, read_records, run_jobs


def choice(spec: ContinuePreset, pilot: list[dict]) -> tuple[int, str]:
    """(E0, primary metric): the preset's fixed choice, or else the pilot's pre-registered one. ValueError when the
    pilot has chosen nothing (its rule then says the arms do not run)."""
    if spec.fixed_choice is not None:
        return spec.fixed_choice
    chosen = choose(margins(pilot, spec.pilot_epochs))
    if chosen is None:
        raise ValueError("the pilot has chosen no (E0, metric): run --pilot first; if it is complete, no arm runs")
    return chosen["epochs"], chosen["metric"]


def arm_jobs(seeds: list[int], arms: list[str] | None = None) -> list[tuple[int, str]]:
    """(seed, arm) jobs seed by seed in the order of ``ARMS`` (the compute-matched arm after the two it times)."""
    return [(s, a) for s in seeds for a in ARMS if arms is None or a in arms]


def time_ratio(records: list[dict], seed: int) -> float:
    """MAE+AEMIM continued's pre-training minutes over MAE continued's, for ``seed``."""
    minutes = {r["arm"]: r["minutes"]["pretrain"] for r in records if r["seed"] == seed and "pretrain" in r["minutes"]}
    if not {"MAE continued", "MAE+AEMIM continued"} <= minutes.keys():
        raise RuntimeError(f"seed {seed}: {MATCHED!r} needs the MAE and MAE+AEMIM continued records of seed {seed}")
    return minutes["MAE+AEMIM continued"] / minutes["MAE continued"]


def continue_command(spec: ContinuePreset, arm: str, seed: int, base: Path, folder: Path, epochs: float, data_args):
    """The ``advmim fit`` argument list of one continuation: the v2 arm's configs at ``seed`` (data order, masks,
    attack start), ``epochs`` long, from ``base``'s weights with the continuation recipe's lr and warm-up."""
    argv = pretrain_command(spec.pretrain, ARMS[arm], seed, folder, 1, data_args)
    argv = [a for a in argv if not a.startswith("--trainer.max_epochs=")]
    return argv + [
        *length_arguments(spec.pretrain, epochs),
        f"--model.init_args.init_from={base}",
        f"--model.init_args.base_lr={spec.continue_lr}",
        f"--model.init_args.warmup_epochs={spec.continue_warmup}",
    ]


def pilot_values(pilot: list[dict], encoder: str, seed: int, digest: str) -> dict[str, float]:
    """The few-label metrics the pilot recorded for ``encoder`` at evaluation ``seed`` from the checkpoint whose
    SHA-256 is ``digest``; empty when it has none."""
    for r in pilot:
        if (r["arm"], r["seed"]) == (encoder, seed) and r.get("base_sha256") == digest:
            return {k: v for k, v in r["metrics"].items() if k.startswith("ft")}
    return {}


@dataclass
class Runs:
    """Where and on what the jobs of one preset run: its name, the work folder (checkpoints, logs, claims), the
    evaluation data, the data arguments of every command, the results folder and the records' provenance."""

    name: str
    work: Path
    data: EvalData
    data_args: list[str]
    out: Path
    provenance: dict

    @property
    def spec(self) -> ContinuePreset:
        return CONTINUE_PRESETS[self.name]


def run_arm(runs: Runs, arm: str, seed: int, records: list[dict], pilot: list[dict], e0: int) -> dict:
    """Train (unless the base) and score one (arm, seed): its record, without provenance. The frozen-encoder
    metrics of the base are measured at seed 0 and shared by its other seeds; its few-label fine-tunes are taken
    from the pilot when the pilot scored the same checkpoint."""
    spec, data = runs.spec, runs.data
    folder = runs.work / "arms" / arm.replace(" ", "_").replace(",", "") / f"seed{seed}"
    base = base_checkpoint(spec, e0, runs.work, runs.data_args)
    record = {"preset": runs.name, "arm": arm, "seed": seed, "base_sha256": sha256(base), "epochs": 0, "minutes": {}}
    start = time.perf_counter()
    if arm == BASE:
        checkpoint = base
        metrics = pilot_values(pilot, base_name(e0), seed, record["base_sha256"])
        if metrics:
            record["few_labels_from"] = "the pilot's record of this checkpoint (same SHA-256, same evaluation seed)"
        earlier = next((r for r in records if (r["arm"], r["seed"]) == (BASE, 0)), None)
        if seed != 0 and earlier is not None:
            metrics |= {k: v for k, v in earlier["metrics"].items() if not k.startswith("ft")}
            record["frozen_from"] = "seed 0 (the same encoder: these metrics have no seed of their own)"
            record["corruption_seeding"] = earlier.get("corruption_seeding")
            encoder = None
        else:
            encoder = checkpoint_encoder(base, data.test_x.device)
    else:
        ratio = time_ratio(records, seed) if arm == MATCHED else None
        epochs = spec.continue_epochs * (ratio or 1)
        cli = run(continue_command(spec, arm, seed, base, folder, epochs, runs.data_args))
        record["minutes"]["pretrain"] = (time.perf_counter() - start) / 60
        record |= {
            "epochs": epochs,
            "steps": cli.trainer.global_step,
            "time_ratio": ratio,
            "attack": attack_log(cli.trainer),
        }
        checkpoint = folder / "continued.ckpt"
        cli.trainer.save_checkpoint(checkpoint)
        encoder, metrics = cli.model.encoder.eval(), {}
    start = time.perf_counter()
    if encoder is not None:
        metrics |= evaluate(encoder_features(encoder), data, spec.pretrain)
        record["corruption_seeding"] = CORRUPTION_SEEDING
    extra = runs.data_args + limit_arguments(spec.pretrain)
    for protocol in spec.few_labels:
        if protocol not in metrics:
            metrics[protocol] = few_label_accuracy(spec, protocol, checkpoint, seed, data, folder, extra)
    record["minutes"]["eval"] = (time.perf_counter() - start) / 60
    return record | {"metrics": metrics}


def run_arms(runs: Runs, seeds: list[int], arms: list[str] | None, rerun: bool, budget: Budget) -> None:
    """Every missing (or, with ``rerun``, every) job of ``arms`` x ``seeds`` while the ``budget`` allows, claimed
    one at a time; each record is written, and the report rebuilt, as soon as its job is done."""
    name, out = runs.name, runs.out
    pilot = read_records(out / f"study_{name}_pilot.json")
    e0, primary = choice(runs.spec, pilot)
    results = out / f"study_{name}.json"
    done = {(r["seed"], r["arm"]) for r in read_records(results)}
    jobs = [j for j in arm_jobs(seeds, arms) if rerun or j not in done]
    print(f"[study {name}] E0 = {e0}, primary metric {primary}: {len(jobs)} jobs", flush=True)

    def job(seed: int, arm: str, records: list[dict]) -> dict:
        record = run_arm(runs, arm, seed, records, pilot, e0)
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return record | {"base_epochs": e0, "primary": primary, **runs.provenance, "date": date}

    def headline(record: dict) -> str:
        return f"{primary} {100 * record['metrics'][primary]:.2f}"

    report = partial(write_report, name, pilot=pilot, out=out)
    run_jobs(f"study {name}", jobs, runs.work, results, rerun, budget, job, report, headline)
