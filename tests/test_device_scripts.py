"""benchmarks/device_check.sh and benchmarks/device_study.sh: their bookkeeping (the loss check, the figures of a run
cut short, the summary's statuses, the study's gate, convergence check and decision, the encoder tars), and both
scripts end to end at smoke size on the CPU (``--smoke``)."""

import csv
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats

from advmim_pl.data.fashion_mnist import DEFAULT_ROOT, find_idx_file
from advmim_pl.eval.floors import Pooled
from advmim_pl.eval.probes import knn_predict
from advmim_pl.models.vit import MaskedViT
from advmim_pl.weights import load_encoder, read_weights

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts' modules import their neighbours (studykit, provenance)
import device_check  # noqa: E402
import device_study  # noqa: E402
import device_study_report as study_report  # noqa: E402

sys.path.remove(str(BENCHMARKS))

HAVE_FASHION_MNIST = find_idx_file(DEFAULT_ROOT, "train-images-idx3-ubyte") is not None


def record(arm: str, seed: int, probe: float, knn: float = 0.5, ft: float = 0.5, **extra) -> dict:
    return {"arm": arm, "seed": seed, "metrics": {"probe": probe, "knn": knn, "ft": ft, **extra},
            "seconds": {"pretrain": 10.0 if arm == "MAE" else 40.0 if arm == "MAE+AEMIM" else 1.0}}  # fmt: skip


def seed_records(seed: int, floor: float, mae: float, aemim: float, sign: float) -> list[dict]:
    return [
        record("random encoder", seed, floor),
        record("MAE", seed, mae),
        record("MAE+AEMIM", seed, aemim),
        record("MAE+sign", seed, sign),
    ]


# ---- the study's rule --------------------------------------------------------------------------------------------
def test_a_seed_cut_short_takes_no_part_in_any_difference():
    records = seed_records(0, 0.70, 0.75, 0.77, 0.76) + seed_records(1, 0.70, 0.76, 0.78, 0.76)
    records += [record("random encoder", 2, 0.70), record("MAE", 2, 0.90)]  # seed 2 was cut short
    assert study_report.complete_seeds(records) == [0, 1]
    passed, reason = study_report.gate(records)
    assert passed and "+5.50 points over 2 seed(s)" in reason  # (5 + 6) / 2, not counting seed 2's +20


def test_gate_is_three_points_of_mae_over_the_random_encoder():
    below = seed_records(0, 0.80, 0.829, 0.9, 0.9) + seed_records(1, 0.80, 0.829, 0.9, 0.9)
    verdict, lines = study_report.decision(below)
    assert not study_report.gate(below)[0]
    assert verdict.startswith("no verdict: the gate failed")
    at = seed_records(0, 0.80, 0.83, 0.9, 0.9) + seed_records(1, 0.80, 0.83, 0.9, 0.9)
    assert study_report.gate(at)[0]


def test_decision_needs_both_intervals_above_zero_and_matches_an_independent_t_interval():
    diffs_vs_mae = [0.010, 0.014, 0.012]
    records = []
    for seed, d in enumerate(diffs_vs_mae):
        records += seed_records(seed, 0.70, 0.80, 0.80 + d, 0.80 + d - 0.02 * (seed == 1))
    verdict, lines = study_report.decision(records)
    # MAE+AEMIM - MAE+sign = 0, +0.02, 0: its interval spans zero, so the plug-in does not help
    assert verdict == "MAE+AEMIM does not help"
    mean = statistics.fmean(diffs_vs_mae)
    half = scipy_stats.t.ppf(0.975, 2) * statistics.stdev(diffs_vs_mae) / math.sqrt(3)
    assert f"MAE+AEMIM - MAE: {100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}]" in lines[2]
    helps = []
    for seed, d in enumerate(diffs_vs_mae):
        helps += seed_records(seed, 0.70, 0.80, 0.80 + d, 0.80 + d / 2)
    assert study_report.decision(helps)[0] == "MAE+AEMIM helps"
    assert study_report.decision(helps[:4])[0].startswith("no verdict: fewer than two complete seeds")


def test_fine_tune_convergence_is_half_against_full_length_for_mae_and_the_floor():
    records = seed_records(0, 0.7, 0.8, 0.8, 0.8)
    assert study_report.fine_tune_converged(records)[0] is None
    records[0]["metrics"]["ft_half"] = records[0]["metrics"]["ft"] - 0.004
    records[1]["metrics"]["ft_half"] = records[1]["metrics"]["ft"] + 0.005
    assert study_report.fine_tune_converged(records)[0] is True
    records[1]["metrics"]["ft_half"] = records[1]["metrics"]["ft"] - 0.006  # still gaining 0.6 points
    converged, reason = study_report.fine_tune_converged(records)
    assert converged is False and "MAE +0.60" in reason


def test_time_ratio_pairs_each_seed_s_own_two_runs():
    records = seed_records(0, 0.7, 0.8, 0.8, 0.8) + seed_records(1, 0.7, 0.8, 0.8, 0.8)
    records[5]["seconds"]["pretrain"] = 20.0  # seed 1's MAE
    assert study_report.time_ratios(records) == {0: 4.0, 1: 2.0}


def test_encoder_tars_hold_two_encoders_each_and_stay_within_the_limit(tmp_path):
    files = []
    for i in range(5):
        files.append(tmp_path / f"e{i}.safetensors")
        files[-1].write_bytes(os.urandom(3 * 2**20))  # 3 MiB
    names = [device_study.pack(tmp_path, f, limit_mib=7.0) for f in files]
    assert names == ["device_study_encoders_1.tar"] * 2 + ["device_study_encoders_2.tar"] * 2 + [
        "device_study_encoders_3.tar"
    ]
    for tar in sorted(tmp_path.glob("*.tar")):
        assert tar.stat().st_size <= 7 * 2**20
    with tarfile.open(tmp_path / "device_study_encoders_2.tar") as archive:
        assert archive.extractfile("e3.safetensors").read() == files[3].read_bytes()


# ---- the check's bookkeeping -------------------------------------------------------------------------------------
def test_loss_check_wants_a_falling_finite_loss():
    assert device_check.loss_check([5.0, 4.0, 3.0, 2.0, 1.0])[0]
    rising, said = device_check.loss_check([1.0, 2.0, 3.0, 4.0, 5.0])
    assert not rising and "not falling" in said
    nan, said = device_check.loss_check([5.0, float("nan"), 1.0])
    assert not nan and "NON-FINITE" in said
    assert device_check.loss_check([5.0, 4.0, 3.0, 2.0, 1.0])[1] == "loss 5.0000 -> 1.0000 over 5 steps, no NaN"


def test_a_throughput_run_cut_short_still_gives_the_configurations_that_ended(tmp_path):
    log = tmp_path / "part4.log"
    log.write_text("== part 4: python benchmarks/throughput.py --batch-size 256 --compile\nMAE: 64.0 ms/step\n")
    args = device_check.argparse.Namespace(
        results=tmp_path, compile=True, img_size=None, log=log, work=tmp_path, part="4"
    )
    device_check.throughput_part(args)
    part = json.loads((tmp_path / "part4.json").read_text())
    assert part["status"] == "partial"
    assert part["images_per_s"] == {"None": {"MAE": 4000.0}}  # 256 images / 64 ms


def test_summary_reads_statuses_from_parts_and_exit_codes(tmp_path, capsys):
    (tmp_path / "part1.json").write_text(json.dumps({"status": "ok", "key": "loss 2 -> 1"}))
    (tmp_path / "part2.json").write_text(json.dumps({"status": "ok", "key": "MAE 10 img/s"}))
    (tmp_path / "times.tsv").write_text("0\t0\t1.5\n1\t0\t10\n2\t3\t20\n4\t124\t100\n")
    device_check.summary(device_check.argparse.Namespace(out=tmp_path, work=tmp_path))
    rows = {r["part"]: r for r in json.loads((tmp_path / "device_check.json").read_text())["parts"]}
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "fail (exit 3)", "not run", "timeout", "not run",
                                                    "not run"]  # fmt: skip
    assert json.loads((tmp_path / "device_check.json").read_text())["seconds"] == pytest.approx(131.5)
    assert "| 4 | images/s compiled | timeout |  | 100.0 |" in capsys.readouterr().out


def test_fsdp_command_fits_either_config_version():
    two = device_check.fsdp_command("FSDP2", True, Path("/w"), smoke=False)
    one = device_check.fsdp_command("FSDP1", False, Path("/w"), smoke=False)
    assert "--trainer.strategy.init_args.data_parallel_size=1" in two
    assert not any("data_parallel_size" in a for a in one)
    assert "--model.init_args.activation_checkpointing=true" in two
    assert "--model.init_args.activation_checkpointing=false" in one
    assert device_check.fsdp_version(REPO / "configs" / "trainer" / "fsdp.yaml") in ("FSDP1", "FSDP2")


# ---- both scripts at smoke size ----------------------------------------------------------------------------------
def run_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    return subprocess.run(["bash", str(BENCHMARKS / script), "--smoke"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.long
def test_device_check_smoke(tmp_path):
    result = run_script("device_check.sh", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, work = tmp_path / "out", tmp_path / "work"
    assert sorted(p.name for p in out.iterdir()) == [
        "device_check.json",
        "device_check.log",
        "device_check.md",
        "device_check_throughput.tar",
    ]  # four files: well within what a device call brings back
    summary = json.loads((out / "device_check.json").read_text())
    rows = {r["part"]: r for r in summary["parts"]}
    assert list(rows) == ["0", "1", "2", "3", "4", "5", "6"]
    assert "| part | what | status | key figure | s |" in result.stdout  # the one table, printed at the end
    # part 1: the quickstart's loss fell and stayed finite (from its CSV log: first and last steps)
    assert rows["1"]["status"] == "ok"
    with open(next(work.glob("quickstart/version_*/metrics.csv")), newline="") as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r["train/loss"]]
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    # parts 2 and 4: images/s of MAE from throughput.py's own JSON files, eager and (compile disabled) compiled
    for part in ("2", "4"):
        figures = json.loads((work / f"part{part}.json").read_text())["images_per_s"]["None"]
        assert rows[part]["status"] == "ok" and figures["MAE"] > 0
    with tarfile.open(out / "device_check_throughput.tar") as archive:
        reports = [json.load(archive.extractfile(m)) for m in archive.getmembers() if m.name.endswith(".json")]
    assert sorted(r["setup"]["compile"] for r in reports if r["setup"]["img_size"] == 32) == [False, True]
    # part 3: FSDP2 runs on the CPU with the plug-in, checkpointing off and on; the FSDP1 config cannot
    if device_check.fsdp_version(REPO / "configs" / "trainer" / "fsdp.yaml") == "FSDP2":
        runs = [json.loads((work / f"fsdp_{k}.json").read_text()) for k in ("off", "on")]
        assert rows["3"]["status"] == "ok"
        assert [r["checkpointing"] for r in runs] == [False, True]
        assert all(r["losses_finite"] and r["steps"] == 2 and r["peak_mib"] > 0 for r in runs)
    else:
        assert rows["3"]["status"] == "skip"
    progressive = (REPO / "advmim_pl" / "data" / "resolution.py").exists()
    assert rows["5"]["status"] == ("ok" if progressive else "skip")
    assert rows["6"]["status"] == "skip" and "impossible on 0 GPU(s)" in rows["6"]["key"]
    assert all(rows[p]["seconds"] > 0 for p in ("1", "2", "3", "4"))


@pytest.mark.long
@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason=f"no Fashion-MNIST in {DEFAULT_ROOT} (apt-get install "
                    "dataset-fashion-mnist)")  # fmt: skip
def test_device_study_smoke(tmp_path):
    result = run_script("device_study.sh", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "out"
    saved = json.loads((out / "device_study.json").read_text())
    records = saved["records"]
    # seed-major: every arm of seed 0, then every arm of seed 1
    assert [(r["seed"], r["arm"]) for r in records] == [(s, a) for s in (0, 1) for a in study_report.ARMS]
    assert {(r["seed"], r["arm"]) for r in records if "ft_half" in r["metrics"]} == {(0, "MAE"), (0, "random encoder")}
    assert all(0 <= r["metrics"][m] <= 1 for r in records for m in ("probe", "knn", "ft"))
    assert (
        "Decision (primary: the probe)" in result.stdout and "MAE+AEMIM − MAE" in (out / "device_study.md").read_text()
    )
    # each arm's encoder is kept beside the records: in a tar of at most 15 MiB, with its SHA-256
    kept = {}
    for tar in out.glob("device_study_encoders_*.tar"):
        assert tar.stat().st_size <= 15 * 2**20
        with tarfile.open(tar) as archive:
            kept |= {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    for r in records:
        if r["arm"] == study_report.FLOOR:
            assert r["encoder"]["tar"] is None and r["encoder"]["file"] not in kept
        else:
            assert hashlib.sha256(kept[r["encoder"]["file"]]).hexdigest() == r["encoder"]["sha256"]
    # the numbers can be checked by evaluating: MAE seed 1's export gives its recorded kNN again
    mae = next(r for r in records if (r["arm"], r["seed"]) == ("MAE", 1))
    path = tmp_path / mae["encoder"]["file"]
    path.write_bytes(kept[mae["encoder"]["file"]])
    size = device_study.SIZES["smoke"]
    data = device_study.load_data(size, DEFAULT_ROOT, torch.device("cpu"))
    encoder = MaskedViT("vit_tiny_patch16_224", 32, 4, 1, data.normalize.mean.flatten().tolist(),
                        data.normalize.std.flatten().tolist(), model_kwargs={"depth": 4})  # fmt: skip
    load_encoder(encoder.vit, read_weights(str(path)), str(path))
    features = Pooled(encoder, "avg")
    with torch.no_grad():
        train, test = features(data.train_x), features(data.test_x)
    knn = knn_predict(train, data.train_y, test, 10, 20, 0.07)
    assert float((knn == data.test_y).float().mean()) == pytest.approx(mae["metrics"]["knn"], abs=1e-6)
