"""benchmarks/study.py and its package studykit: the bookkeeping (paired differences, t-intervals, the decision
rule, records and job claims), the configs of every arm, and the whole study at smoke size through its command line."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from advmim_pl.cli import resolve_config
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES
from tests.helpers.config_tools import assert_contains, printed_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the study package imports provenance.py from its folder
from studykit import cli as study_cli  # noqa: E402
from studykit import commands, design, jobs, pilot, report, stats  # noqa: E402

sys.path.remove(str(BENCHMARKS))


def merged(base: dict, update: dict) -> dict:
    """``update`` merged into ``base`` key by key, as jsonargparse composes config files (a new class replaces
    the old one's section)."""
    out = dict(base)
    for key, value in update.items():
        same_class = not isinstance(value, dict) or value.get("class_path") in (
            None,
            out.get(key, {}).get("class_path"),
        )
        both = isinstance(value, dict) and isinstance(out.get(key), dict) and same_class
        out[key] = merged(out[key], value) if both else value
    return out


ARM_CONFIGS = [(preset, arm) for preset in ("cpu", "gpu") for arm in design.PRESETS[preset].arms]


@pytest.mark.parametrize(("preset", "arm"), ARM_CONFIGS, ids=[f"{p}-{a}" for p, a in ARM_CONFIGS])
def test_every_arm_composes_with_its_values(preset, arm, capsys):
    spec = design.ARMS[arm]
    paths = [f"study/{preset}/{spec.pretrain}", *spec.overlays]
    printed = printed_config(capsys, *(arg for path in paths for arg in ("-c", path)))
    expected = {}
    for path in paths:
        file = Path(resolve_config(path))
        written = yaml.safe_load(file.read_text())
        block = written["model"]["init_args"].get("plugin")
        if isinstance(block, str):  # the plug-in's block composed from its file
            written["model"]["init_args"]["plugin"] = yaml.safe_load((file.parent / block).read_text())
        expected = merged(expected, written)
    assert_contains(printed, expected)
    plugin = printed["model"]["init_args"]["plugin"]
    assert (plugin is not None) == bool(spec.overlays)
    if plugin is not None:
        wanted = {"MAE+sign": ("sign", "none"), "MAE+AEMIM same": ("pgd", "same")}.get(arm, ("pgd", "none"))
        attack = plugin["init_args"]["attack"]["init_args"]
        assert (attack["perturbation"], plugin["init_args"]["attack_mask"]) == wanted
        assert attack["eps"] == pytest.approx(4 / 255)


# ---- statistics, checked against closed forms ------------------------------------------------------------
def t_quantile_df2(p: float) -> float:
    """The Student t quantile with 2 degrees of freedom in closed form: (2p - 1) / sqrt(2 p (1 - p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_t_interval_matches_the_hand_computed_one():
    mean, low, high = stats.t_interval([0.01, 0.02, 0.03])  # mean 0.02, sd 0.01, n 3
    half = t_quantile_df2(0.975) * 0.01 / math.sqrt(3)  # 4.302653 x 0.01 / 1.732051 = 0.024841
    assert half == pytest.approx(0.024841, abs=1e-6)
    assert (mean, low, high) == pytest.approx((0.02, 0.02 - half, 0.02 + half), abs=1e-12)
    # two values: t_{0.975, 1} = tan(0.475 pi) = 12.7062
    mean, low, high = stats.t_interval([0.0, 0.1])
    assert high - mean == pytest.approx(math.tan(0.475 * math.pi) * math.sqrt(0.005) / math.sqrt(2), rel=1e-9)
    assert math.isnan(stats.t_interval([0.3])[1])


def test_detectable_effect_is_the_sum_of_two_t_quantiles_times_the_standard_error():
    expected = (t_quantile_df2(0.975) + t_quantile_df2(0.8)) * 0.02 / math.sqrt(3)  # (4.3027 + 1.0607) x 0.01155
    assert stats.detectable_effect(0.02, 3) == pytest.approx(expected, rel=1e-9)
    assert stats.detectable_effect(0.02, 3) == pytest.approx(0.061930, abs=1e-6)
    assert math.isnan(stats.detectable_effect(0.02, 1))


def record(arm: str, seed: int, probe: float, pgd: float = 0.5) -> dict:
    metrics = {key: 0.5 for key in design.METRICS} | {"probe": probe, "pgd/8": pgd, "clean_subset": 0.6}
    metrics |= {f"corruption/{c}/{s}": 0.6 - 0.05 * s for c in CORRUPTIONS for s in SEVERITIES}
    return {"arm": arm, "seed": seed, "epochs": 1, "metrics": metrics, "minutes": {"pretrain": 1.0, "eval": 0.5},
            "device": "dev", "commit": "abc", "date": "today"}  # fmt: skip


def test_paired_differences_use_only_the_seeds_both_arms_have():
    records = [record("MAE", s, p) for s, p in [(0, 0.80), (1, 0.82), (2, 0.81)]]
    records += [record("MAE+AEMIM", s, p) for s, p in [(0, 0.83), (2, 0.80), (3, 0.9)]]
    diffs = stats.paired_differences(records, "probe", "MAE+AEMIM", "MAE")
    assert diffs == pytest.approx({0: 0.03, 2: -0.01})
    c = stats.comparison(records, "probe", "MAE+AEMIM", "MAE")
    assert c["n"] == 2 and c["mean"] == pytest.approx(0.01) and c["sd"] == pytest.approx(math.sqrt(0.0008))
    assert stats.comparison(records, "probe", "MAE+AEMIM", "MAE+sign") is None
    # corruption numbers pair only records whose corrupted images were drawn alike
    records[0]["corruption_seeding"] = "new"  # MAE seed 0
    assert set(stats.paired_differences(records, "corruption/mean", "MAE+AEMIM", "MAE")) == {2}
    assert set(stats.paired_differences(records, "probe", "MAE+AEMIM", "MAE")) == {0, 2}


def three_seeds(aemim: list[float], mae: list[float], sign: list[float], pgd: list[float] | None = None) -> list:
    pgd = pgd or [0.5, 0.5, 0.5]
    return [
        *(record("MAE+AEMIM", s, v, pgd[s]) for s, v in enumerate(aemim)),
        *(record("MAE", s, v) for s, v in enumerate(mae)),
        *(record("MAE+sign", s, v) for s, v in enumerate(sign)),
    ]


def test_the_plug_in_helps_only_when_both_intervals_are_above_zero():
    mae, sign = [0.80, 0.82, 0.81], [0.805, 0.815, 0.812]
    helps, reason = stats.decide(three_seeds([0.82, 0.84, 0.83], mae, sign))  # +2 +-0 over MAE, ~+1.9 over sign
    assert helps and reason.count("above zero") == 2 and "not above" not in reason
    # a clear gain over MAE but not over the noise control: not "helps"
    helps, reason = stats.decide(three_seeds([0.82, 0.84, 0.83], mae, [0.84, 0.83, 0.83]))
    assert not helps and "MAE+AEMIM - MAE+sign" in reason and "not above zero" in reason
    # a positive mean whose interval crosses zero: not "helps"
    helps, _ = stats.decide(three_seeds([0.85, 0.81, 0.82], mae, sign))
    assert not helps
    # one seed has no interval
    helps, reason = stats.decide(three_seeds([0.9], [0.8], [0.8]))
    assert not helps and "fewer than two" in reason
    # robustness: the same rule on PGD accuracy
    records = three_seeds([0.8, 0.8, 0.8], mae, sign, pgd=[0.6, 0.62, 0.61])
    assert stats.decide(records, "pgd/8")[0] and not stats.decide(records, "probe")[0]


def test_the_pilot_picks_the_smallest_budgeted_epoch_count_beating_the_floor_by_3_points_on_both():
    outcome = {
        "random encoder": {"probe": 0.80, "knn": 0.78},
        "MAE": {"1": {"probe": 0.84, "knn": 0.80}, "2": {"probe": 0.83, "knn": 0.81}, "4": {"probe": 0.9, "knn": 0.9}},
    }
    assert pilot.choose_epochs(outcome, budget=2) == 2  # epoch 1 fails on kNN
    assert pilot.choose_epochs(outcome, budget=1) is None
    outcome["MAE"]["2"]["knn"] = 0.8099  # 2.99 points
    assert pilot.choose_epochs(outcome, budget=2) is None and pilot.choose_epochs(outcome, budget=4) == 4


def test_compute_matched_epochs_follow_the_seeds_measured_time_ratio():
    cpu, gpu, smoke = design.PRESETS["cpu"], design.PRESETS["gpu"], design.PRESETS["smoke"]
    assert commands.time_ratio(smoke, [], 0) == smoke.time_ratio  # a preset's own number wins
    assert commands.arm_epochs(cpu, "random encoder") == 0 and commands.arm_epochs(cpu, "MAE+sign") == cpu.epochs
    records = [record("MAE", 1, 0.8), record("MAE+AEMIM", 1, 0.8)]
    records[1]["minutes"]["pretrain"] = 4.4  # MAE took 1.0
    for preset in (cpu, gpu):
        assert commands.time_ratio(preset, records, 1) == pytest.approx(4.4)
        with pytest.raises(RuntimeError, match="seed 0"):
            commands.time_ratio(preset, records, 0)
    epochs = commands.arm_epochs(cpu, "MAE compute-matched", 4.4)
    assert epochs == pytest.approx(4.4)  # a fraction of an epoch too, in steps: 60,000 // 256 = 234 per epoch
    assert commands.length_arguments(cpu, epochs) == ["--trainer.max_epochs=5", "--trainer.max_steps=1030"]
    assert commands.length_arguments(cpu, 1) == ["--trainer.max_epochs=1"]
    assert (
        commands.steps_per_epoch(gpu) == 60_000 // 512 and commands.steps_per_epoch(smoke) == 2
    )  # limit_train_batches


# ---- records and jobs ----------------------------------------------------------------------------------
def test_a_rerun_replaces_its_record_and_reports_the_difference():
    records = [record("MAE", 0, 0.5), record("MAE+sign", 0, 0.6)]
    assert jobs.replace_record(records, record("MAE", 0, 0.5)).startswith("reproduced exactly")
    verdict = jobs.replace_record(records, record("MAE", 0, 0.7))
    assert verdict.endswith("in probe: max |diff| 0.2") and [r["arm"] for r in records] == [
        "MAE",
        "MAE+sign",
    ]  # in place
    assert records[0]["metrics"]["probe"] == 0.7
    assert jobs.replace_record(records, record("MAE", 1, 0.7)) == "new" and len(records) == 3
    rounded = record("MAE", 1, 0.7)  # a float32 mean where the earlier record had the exact fraction
    rounded["metrics"]["probe"] = 0.699999988079071
    assert jobs.replace_record(records, rounded).startswith("reproduced the earlier run (commit abc, dev) to float32")
    corrupted = record("MAE", 1, 0.7)
    corrupted["metrics"] |= {"corruption/contrast/1": 0.1, "corruption/contrast/2": 0.1}
    assert " in 2 corruption keys: max |diff| 0.45" in jobs.replace_record(records, corrupted)


def test_a_kept_checkpoint_is_the_newest_and_must_have_trained_the_records_steps(tmp_path):
    smoke = design.PRESETS["smoke"]  # 2 steps per epoch
    with pytest.raises(FileNotFoundError, match="no pre-training checkpoint is kept; run the job again with --rerun"):
        commands.kept_checkpoint(tmp_path, record("MAE", 0, 0.8), smoke)
    for version, steps in ((1, 2), (10, 5)):  # version 10 is newer than 1 (not a string order)
        path = tmp_path / "pretrain" / f"version_{version}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"global_step": steps}, path)
    matched = record("MAE compute-matched", 0, 0.8) | {"epochs": 2.5}
    assert commands.kept_checkpoint(tmp_path, matched, smoke).parts[-3] == "version_10"
    with pytest.raises(ValueError, match="trained 5 steps; the record of MAE seed 0 says 1 epochs, 2 steps"):
        commands.kept_checkpoint(tmp_path, record("MAE", 0, 0.8), smoke)


def test_jobs_are_seed_major_skip_recorded_ones_and_claims_of_live_processes(tmp_path):
    records = [record(design.PIXELS, 0, 0.8), record("MAE", 0, 0.8)]
    listed = jobs.todo(records, ["random encoder", "MAE"], [0, 1], rerun=False)
    assert listed == [(0, "random encoder"), (1, "random encoder"), (1, "MAE")]
    assert jobs.todo(records, [design.PIXELS, "MAE"], [0], rerun=True) == [(0, design.PIXELS), (0, "MAE")]
    assert jobs.todo([], ["MAE"], [0, 1], False, screen=("MAE+AEMIM eps 8",)) == [
        (0, "MAE"),
        (1, "MAE"),
        (0, "MAE+AEMIM eps 8"),
    ]
    claims, lock, records_file = tmp_path / "claims.json", tmp_path / "lock", tmp_path / "records.json"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims.write_text(json.dumps({"0/random encoder": dead.pid, "1/random encoder": os.getppid()}))
    assert jobs.claim(claims, lock, records_file, listed) == (0, "random encoder")  # the dead claim is void
    assert jobs.claim(claims, lock, records_file, listed[1:]) == (1, "MAE")  # a live process holds seed 1's
    assert json.loads(claims.read_text())["1/MAE"] == os.getpid()
    assert jobs.claim(claims, lock, records_file, []) is None
    # a process that listed its jobs before another one recorded (1, MAE) and died skips it, unless rerun
    records_file.write_text(json.dumps([record("MAE", 1, 0.8)]))
    claims.write_text(json.dumps({"1/MAE": dead.pid}))
    assert jobs.claim(claims, lock, records_file, [(1, "MAE")]) is None
    assert jobs.claim(claims, lock, records_file, [(1, "MAE")], rerun=True) == (1, "MAE")
    # a finished job's claim is dropped: the same process can rerun it (a claim lasts while its job runs)
    jobs.release(claims, (1, "MAE"))
    assert "1/MAE" not in json.loads(claims.read_text())
    assert jobs.claim(claims, lock, records_file, [(1, "MAE")], rerun=True) == (1, "MAE")


def test_the_report_states_the_decision_and_one_table_width_per_table():
    text = report.markdown("cpu", three_seeds([0.82, 0.84, 0.83], [0.80, 0.82, 0.81], [0.805, 0.815, 0.812]))
    assert "Primary metric (probe): MAE+AEMIM **helps**" in text
    assert "| MAE+AEMIM − MAE | 3 | +2.00 [+2.00, +2.00] |" in text  # identical differences: a zero-width interval
    for block in text.split("\n\n"):
        widths = {line.count("|") for line in block.splitlines() if line.startswith("|")}
        assert len(widths) <= 1, block


# ---- end to end --------------------------------------------------------------------------------------
def run_study(tmp_path: Path, *args: str, preset: str = "smoke") -> str:
    """``python benchmarks/study.py --preset <preset> <args>`` run in ``tmp_path``, in this process (a new
    interpreter would spend ~10 s importing torch and Lightning for every call); what it prints."""
    argv = [str(BENCHMARKS / "study.py"), "--preset", preset, "--out", str(tmp_path / "out"),
            "--workdir", str(tmp_path / "runs"), *args]  # fmt: skip
    printed = io.StringIO()
    with mock.patch.object(sys, "argv", argv), contextlib.chdir(tmp_path), contextlib.redirect_stdout(printed):
        study_cli.main("study.py")
    return printed.getvalue()


@pytest.mark.long
def test_the_smoke_study_runs_every_arm_and_seed_and_a_rerun_reproduces(tmp_path):
    smoke = design.PRESETS["smoke"]
    log = run_study(tmp_path)
    results = tmp_path / "out" / "study_smoke.json"
    records = json.loads(results.read_text())
    expected_jobs = [(0, design.PIXELS)] + [(s, a) for s in range(smoke.seeds) for a in smoke.arms]
    assert [(r["seed"], r["arm"]) for r in records] == expected_jobs and log.count(", new") == len(expected_jobs)
    keys = {*design.METRICS, "clean_subset"} | {f"corruption/{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES}
    for r in records:
        assert keys <= set(r["metrics"]) and all(0 <= r["metrics"][k] <= 1 for k in keys)
        assert r["preset"] == "smoke" and r["device"] and r["commit"] and r["date"]
        assert r["epochs"] == (
            None if r["arm"] == design.PIXELS else commands.arm_epochs(smoke, r["arm"], smoke.time_ratio)
        )
    # the attack's last logged objectives: PGD beats the energy-matched random sign; the sign arm matches it
    objectives = {f"attack/objective_{at}" for at in ("clean", "adv", "random")}
    for r in records:
        attacked = r["arm"] != design.PIXELS and bool(design.ARMS[r["arm"]].overlays)
        assert set(r.get("attack", {})) == (objectives if attacked else set()), r["arm"]
        if attacked:
            ratio = r["attack"]["attack/objective_adv"] / r["attack"]["attack/objective_random"]
            assert (0.8 < ratio < 1.25) if r["arm"] == "MAE+sign" else ratio > 1.5, (r["arm"], ratio)
    table = (tmp_path / "out" / "study_smoke.md").read_text()
    assert "## Decision (pre-registered rule)" in table and "| MAE+AEMIM − MAE | 2 |" in table
    assert all((tmp_path / "out" / f"study_smoke_{n}.png").stat().st_size > 10_000 for n in ("corruptions", "pgd"))

    assert "results:" in run_study(tmp_path) and json.loads(results.read_text()) == records  # nothing missing
    (tmp_path / "out" / "study_smoke.md").unlink()
    run_study(tmp_path, "--report")  # the same table from the records alone
    assert (tmp_path / "out" / "study_smoke.md").read_text() == table

    log = run_study(tmp_path, "--seeds", "1", "--arms", "MAE+AEMIM", "--rerun")
    assert "MAE+AEMIM seed 1" in log and "reproduced exactly the earlier run" in log
    assert [r["metrics"] for r in json.loads(results.read_text())] == [r["metrics"] for r in records]
    # the evaluation alone, on the encoder of the kept checkpoint: the same numbers, the pre-training's fields kept
    before = {(r["arm"], r["seed"]): r for r in json.loads(results.read_text())}
    log = run_study(tmp_path, "--seeds", "1", "--arms", "MAE+AEMIM", "MAE compute-matched", "--from-checkpoints")
    assert log.count("reproduced exactly the earlier run") == 2
    after = {(r["arm"], r["seed"]): r for r in json.loads(results.read_text())}
    for job in (("MAE+AEMIM", 1), ("MAE compute-matched", 1)):
        assert (
            after[job]["metrics"] == before[job]["metrics"] and after[job]["pretrained"]["date"] == before[job]["date"]
        )
        for key in ("epochs", "time_ratio", "attack"):
            assert after[job].get(key) == before[job].get(key), key
        assert after[job]["minutes"]["pretrain"] == before[job]["minutes"]["pretrain"]


@pytest.mark.long
def test_the_smoke_pilot_records_both_encoders_and_the_time_ratio(tmp_path):
    run_study(tmp_path, "--pilot")
    outcome = json.loads((tmp_path / "out" / "study_pilot.json").read_text())
    assert list(outcome["MAE"]) == [str(e) for e in design.PRESETS["smoke"].pilot_epochs]
    assert all(0 < m[k] <= 1 for m in [outcome["random encoder"], *outcome["MAE"].values()] for k in ("probe", "knn"))
    assert outcome["time_ratio"] > 1  # the plug-in's step costs more than MAE's
    assert outcome["chosen_epochs"] == pilot.choose_epochs(outcome, outcome["budget_epochs"])


@pytest.mark.long
def test_the_gpu_configs_run_at_smoke_size_within_a_time_budget(tmp_path):
    log = run_study(tmp_path, "--minutes", "0.01", preset="smoke-gpu")  # the first job, then out of time
    assert "jobs left for a later run" in log
    results = tmp_path / "out" / "study_smoke-gpu.json"
    assert [r["arm"] for r in json.loads(results.read_text())] == [design.PIXELS]
    run_study(tmp_path, preset="smoke-gpu")  # the rest: SimMIM+AEMIM, the compute-matched MAE and a screen arm
    records = {r["arm"]: r for r in json.loads(results.read_text())}
    assert list(records) == [design.PIXELS, *design.PRESETS["smoke-gpu"].arms, "MAE+AEMIM eps 8"]
    ratio = records["MAE+AEMIM"]["minutes"]["pretrain"] / records["MAE"]["minutes"]["pretrain"]
    assert records["MAE compute-matched"]["time_ratio"] == pytest.approx(ratio)
    assert records["MAE compute-matched"]["epochs"] == pytest.approx(ratio)
