"""benchmarks/studykit/continuation.py, the continuation study's pilot: the class-balanced few-label split, the
pre-registered choice of E0 and primary metric, and the smoke pilot through study.py's command line."""

import json
import math
import sys

import pytest
import torch

from advmim_pl.data import FashionMNISTDataModule
from advmim_pl.data.base import balanced_subset
from tests.test_study import BENCHMARKS, run_study

sys.path.insert(0, str(BENCHMARKS))  # the study package imports provenance.py from its folder
from studykit import continuation, continuation_arms  # noqa: E402

sys.path.remove(str(BENCHMARKS))


def test_the_few_label_split_is_balanced_and_fixed_by_its_seed():
    labels = torch.arange(10).repeat_interleave(torch.tensor([600, 700, 800, 900, 1000, 600, 650, 700, 750, 800]))
    picked = balanced_subset(labels, 0.01, seed=0)
    assert torch.bincount(labels[picked]).tolist() == [round(0.01 * len(labels) / 10)] * 10  # 75 each
    assert torch.equal(picked, balanced_subset(labels, 0.01, seed=0)) and picked.unique().numel() == len(picked)
    assert not torch.equal(picked, balanced_subset(labels, 0.01, seed=1))
    with pytest.raises(ValueError, match="label_fraction 0.0001 keeps no image of each of the 10 classes"):
        balanced_subset(labels, 0.0001, seed=0)
    with pytest.raises(ValueError, match=r"asks for 675 images of class 0, which has 600"):
        balanced_subset(labels, 0.9, seed=0)


def test_the_data_module_keeps_the_split_for_training_only():
    data = FashionMNISTDataModule(img_size=28, channels=1, num_workers=0, label_fraction=0.01, label_seed=2)
    data.setup("fit")
    assert torch.bincount(data.train_set.labels).tolist() == [60] * 10 and len(data.test_set) == 10_000
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\) .* got 1.5"):
        FashionMNISTDataModule(label_fraction=1.5)


def record(arm: str, seed: int, **metrics: float) -> dict:
    return {"arm": arm, "seed": seed, "metrics": metrics}


def test_the_choice_takes_the_smallest_e0_then_the_metric_with_the_largest_margin_per_spread():
    floor = [record("random encoder", s, probe=0.79 + 0.002 * s, knn=0.69, ft1=0.50 + 0.01 * s) for s in range(3)]
    base4 = [record("base E0=4", 0, probe=0.81, knn=0.75, ft1=0.56)] + [
        record("base E0=4", s, ft1=0.57) for s in (1, 2)
    ]
    base8 = [record("base E0=8", 0, probe=0.90, knn=0.90, ft1=0.80)]
    rows = continuation.margins(floor + base4 + base8, (4, 8))
    by = {(r["epochs"], r["metric"]): r for r in rows}
    assert by[4, "probe"]["margin"] == pytest.approx(0.018) and not by[4, "probe"]["passes"]  # under 3 points
    assert by[4, "knn"]["spread"] == 0 and by[4, "knn"]["ratio"] == math.inf  # both deterministic, no spread
    # ft1 at E0 = 4: base mean 0.5667 (sd 0.0058), floor mean 0.51 (sd 0.01)
    assert by[4, "ft1"]["margin"] == pytest.approx(0.5667 - 0.51, abs=1e-4)
    assert by[4, "ft1"]["spread"] == pytest.approx(math.sqrt((0.005774**2 + 0.01**2) / 2), rel=1e-3)
    chosen = continuation.choose(rows)
    assert (chosen["epochs"], chosen["metric"]) == (4, "knn")  # E0 = 8 passes by more, but 4 is the smaller E0
    rows = [r for r in rows if r["metric"] != "knn"]
    assert (continuation.choose(rows)["epochs"], continuation.choose(rows)["metric"]) == (4, "ft1")
    assert continuation.choose([r for r in rows if r["epochs"] == 4 and r["metric"] == "probe"]) is None


@pytest.mark.long
def test_the_smoke_pilot_records_every_job_and_its_choice(tmp_path):
    spec = continuation.CONTINUE_PRESETS["smoke-continue"]
    log = run_study(tmp_path, "--pilot", preset="smoke-continue")
    records = json.loads((tmp_path / "out" / "study_smoke-continue_pilot.json").read_text())
    assert [(r["seed"], r["arm"]) for r in records] == continuation.pilot_jobs(spec)
    for r in records:
        expected = {*spec.few_labels} | (
            {"probe", "knn", "probe_c"} if r["seed"] == 0 or r["arm"] == "random encoder" else set()
        )
        assert set(r["metrics"]) == expected and all(0 <= v <= 1 for k, v in r["metrics"].items() if k != "probe_c")
    bases = [r for r in records if r["arm"] != "random encoder"]
    assert all(len(r["base_sha256"]) == 64 for r in bases)
    assert len({r["base_sha256"] for r in bases if r["epochs"] == spec.pilot_epochs[0]}) == 1  # trained once
    report = (tmp_path / "out" / "study_smoke-continue_pilot.md").read_text()
    assert "| E0 | metric | base | random encoder | margin |" in report
    assert ("**Choice: E0 =" in report) != ("the arms do not run" in report)
    assert "random encoder seed 1" in log
    again = run_study(tmp_path, "--pilot", preset="smoke-continue")  # nothing left to run
    assert (
        "[pilot" not in again
        and json.loads((tmp_path / "out" / "study_smoke-continue_pilot.json").read_text()) == records
    )


# ---- the arms ---------------------------------------------------------------------------------------------------
def timed(arm: str, seed: int, pretrain: float) -> dict:
    return {"arm": arm, "seed": seed, "minutes": {"pretrain": pretrain, "eval": 1.0}, "metrics": {}}


def test_the_compute_matched_continuation_trains_the_seeds_measured_time_ratio_in_steps(tmp_path):
    records = [timed("MAE continued", 0, 1.0), timed("MAE+AEMIM continued", 0, 4.4), timed("MAE continued", 1, 2.0)]
    assert continuation_arms.time_ratio(records, 0) == pytest.approx(4.4)
    with pytest.raises(RuntimeError, match="needs the MAE and MAE\\+AEMIM continued records of seed 1"):
        continuation_arms.time_ratio(records, 1)
    spec = continuation.CONTINUE_PRESETS["cpu-continue"]
    argv = continuation_arms.continue_command(spec, continuation.MATCHED, 2, tmp_path / "b.ckpt", tmp_path, 4.4, [])
    # 234 steps of batch 256 in one epoch of 60,000 images: 4.4 epochs = 1030 steps, the cosine ending there
    assert "--trainer.max_steps=1030" in argv and "--trainer.max_epochs=5" in argv
    assert [a for a in argv if a.startswith("--trainer.max_epochs")] == ["--trainer.max_epochs=5"]
    assert f"--model.init_args.init_from={tmp_path / 'b.ckpt'}" in argv and "--model.init_args.base_lr=0.0003" in argv
    assert "--model.init_args.warmup_epochs=0.1" in argv and argv[argv.index("--seed_everything") + 1] == "2"
    plugin = continuation_arms.continue_command(spec, "MAE+AEMIM continued", 2, tmp_path, tmp_path, 1, [])
    seed = plugin.index("--model.init_args.plugin.init_args.attack.init_args.seed") + 1
    assert "study/aemim.yaml" in plugin and plugin[seed] == "2"
    assert "--trainer.max_epochs=1" in plugin and not any(a.startswith("--trainer.max_steps") for a in plugin)


def test_the_arms_take_the_pilots_choice_and_refuse_to_run_without_one():
    spec = continuation.CONTINUE_PRESETS["cpu-continue"]
    floor = [record("random encoder", s, probe=0.79, knn=0.68 + 0.01 * s, ft10=0.48 - 0.01 * s) for s in range(3)]
    base = [record("base E0=4", 0, probe=0.80, knn=0.81, ft10=0.70)] + [
        record("base E0=4", s, ft10=0.69) for s in (1, 2)
    ]
    assert continuation_arms.choice(spec, floor + base) == (4, "ft10")  # 21 points over 0.7 spreads beats kNN's 13
    with pytest.raises(ValueError, match="the pilot has chosen no"):
        continuation_arms.choice(spec, floor)
    assert continuation_arms.choice(continuation.CONTINUE_PRESETS["smoke-continue"], []) == (1, "ft10")


def test_the_base_reuses_the_pilots_fine_tunes_only_of_the_same_checkpoint(tmp_path):
    checkpoint = tmp_path / "base.ckpt"
    checkpoint.write_bytes(b"weights")
    pilot = [record("base E0=4", 1, ft1=0.5, ft10=0.6, probe=0.8) | {"base_sha256": continuation.sha256(checkpoint)}]
    digest = continuation.sha256(checkpoint)
    assert continuation_arms.pilot_values(pilot, "base E0=4", 1, digest) == {"ft1": 0.5, "ft10": 0.6}
    assert continuation_arms.pilot_values(pilot, "base E0=4", 0, digest) == {}  # another evaluation seed
    checkpoint.write_bytes(b"other weights")
    other = continuation.sha256(checkpoint)
    assert continuation_arms.pilot_values(pilot, "base E0=4", 1, other) == {}  # another base: computed again


@pytest.mark.long
def test_the_smoke_arms_continue_the_base_pair_their_seeds_and_a_rerun_reproduces(tmp_path):
    log = run_study(tmp_path, preset="smoke-continue")
    records = json.loads((tmp_path / "out" / "study_smoke-continue.json").read_text())
    assert [(r["seed"], r["arm"]) for r in records] == [(s, a) for s in (0, 1) for a in continuation.ARMS]
    assert log.count(", new") == len(records)
    by = {(r["arm"], r["seed"]): r for r in records}
    work = tmp_path / "runs" / "smoke-continue"
    assert {r["base_sha256"] for r in records} == {continuation.sha256(work / "base_E1.ckpt")}  # one base
    for seed in (0, 1):
        ratio = (
            by["MAE+AEMIM continued", seed]["minutes"]["pretrain"] / by["MAE continued", seed]["minutes"]["pretrain"]
        )
        matched = by[continuation.MATCHED, seed]
        assert matched["time_ratio"] == pytest.approx(ratio) and matched["steps"] == round(2 * ratio)  # 2 steps/epoch
        assert by["MAE+AEMIM continued", seed]["attack"]["attack/objective_adv"] > 0
    frozen = {k: v for k, v in by["base", 0]["metrics"].items() if not k.startswith("ft")}
    assert frozen.items() <= by["base", 1]["metrics"].items() and len(frozen) > 60  # shared, not measured again
    # each continuation moved the base's encoder, and the plug-in's run differs from MAE's of the same seed
    base = torch.load(work / "base_E1.ckpt", weights_only=False)["state_dict"]
    moved = {}
    for arm in ("MAE continued", "MAE+AEMIM continued"):
        state = torch.load(work / "arms" / arm.replace(" ", "_") / "seed0" / "continued.ckpt", weights_only=False)
        moved[arm] = {k: v for k, v in state["state_dict"].items() if k in base and k.startswith("encoder")}
        assert len(moved[arm]) > 30 and any(not torch.equal(v, base[k]) for k, v in moved[arm].items())
    assert any(not torch.equal(v, moved["MAE continued"][k]) for k, v in moved["MAE+AEMIM continued"].items())
    report = (tmp_path / "out" / "study_smoke-continue.md").read_text()
    diff = [by["MAE+AEMIM continued", s]["metrics"]["ft10"] - by["MAE continued", s]["metrics"]["ft10"] for s in (0, 1)]
    assert f"| MAE+AEMIM continued − MAE continued | 2 | {100 * sum(diff) / 2:+.2f} [" in report
    assert "- Primary metric (ft10): MAE+AEMIM continued **" in report
    again = run_study(tmp_path, "--rerun", "--seeds", "1", "--arms", "MAE continued", preset="smoke-continue")
    assert "MAE continued seed 1: ft10" in again and "reproduced exactly" in again


@pytest.mark.long
def test_the_gpu_continuation_runs_its_configs_at_smoke_size_within_a_time_budget(tmp_path):
    first = run_study(tmp_path, "--minutes", "0.01", preset="smoke-gpu-continue")  # the first job, then out of time
    assert "base seed 0: ft10" in first and "min budget: 4 jobs left for a later run" in first
    run_study(tmp_path, preset="smoke-gpu-continue")
    records = json.loads((tmp_path / "out" / "study_smoke-gpu-continue.json").read_text())
    assert [r["arm"] for r in records] == list(continuation.ARMS)
    for r in records:  # the gpu preset's 32-px encoder, fine-tuned with study/gpu/finetune_few.yaml
        assert {"ft1", "ft10", "probe", "knn", "pgd/8"} <= set(r["metrics"]) and r["base_epochs"] == 1
    base = torch.load(tmp_path / "runs" / "smoke-gpu-continue" / "base_E1.ckpt", weights_only=False)
    assert base["hyper_parameters"]["img_size"] == 32 and base["state_dict"]["encoder.vit.pos_embed"].shape[-1] == 192
