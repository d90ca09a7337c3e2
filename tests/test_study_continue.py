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
from studykit import continuation  # noqa: E402

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
