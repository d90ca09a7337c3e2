"""benchmarks/study.py: the whole study at smoke size through its command line, and its bookkeeping."""

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from config_tools import assert_contains, printed_config

from advmim_pl.cli import resolve_config
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_study():
    sys.path.insert(0, str(BENCHMARKS))  # study.py imports provenance.py from its folder
    try:
        spec = importlib.util.spec_from_file_location("study", BENCHMARKS / "study.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


study = load_study()


STAGE_CONFIGS = [
    *(
        [pretrain, *extra]
        for pretrain in ("pretrain_mae.yaml", "pretrain_simmim.yaml")
        for extra in ([], ["aemim.yaml"])
    ),
    ["pretrain_mae.yaml", "gaussian.yaml"],
    ["probe.yaml"],
    ["finetune.yaml"],
    ["probe.yaml", "mnist.yaml"],
    ["robustness.yaml"],
]


def merged(base: dict, update: dict) -> dict:
    """``update`` merged into ``base`` key by key, as jsonargparse composes config files (a new data class
    replaces the old one's section)."""
    out = dict(base)
    for key, value in update.items():
        same_class = not isinstance(value, dict) or value.get("class_path") in (
            None,
            out.get(key, {}).get("class_path"),
        )
        both = isinstance(value, dict) and isinstance(out.get(key), dict) and same_class
        out[key] = merged(out[key], value) if both else value
    return out


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
@pytest.mark.parametrize("files", STAGE_CONFIGS, ids="+".join)
def test_stage_configs_compose_with_their_values(preset, files, capsys):
    shared = ("aemim.yaml", "gaussian.yaml", "mnist.yaml")
    paths = [f"study/{name}" if name in shared else f"study/{preset}/{name}" for name in files]
    printed = printed_config(capsys, *(arg for path in paths for arg in ("-c", path)))
    expected = {}  # the files' values, later files winning
    for path in paths:
        values = yaml.safe_load(open(resolve_config(path)).read())
        wanted = values.get("trainer", {}).pop("callbacks", [])
        for callback, expected_callback in zip(
            (printed["trainer"]["callbacks"] or [])[: len(wanted)], wanted, strict=True
        ):
            assert_contains(callback, expected_callback)
        expected = merged(expected, values)
    assert_contains(printed, expected)
    assert (printed["attack"] is not None) == any(name in files for name in ("aemim.yaml", "gaussian.yaml"))


def run_study(tmp_path: Path, *args: str) -> str:
    command = [sys.executable, str(BENCHMARKS / "study.py"), "--preset", "smoke", "--out", str(tmp_path / "out"),
               "--workdir", str(tmp_path / "runs"), *args]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_one_command_runs_every_method_and_a_rerun_reproduces_it(tmp_path):
    log = run_study(tmp_path)
    results = tmp_path / "out" / "study_smoke.json"
    records = json.loads(results.read_text())
    assert [r["method"] for r in records] == list(study.METHODS) and {r["seed"] for r in records} == {0}
    expected = {"clean", "corruption/mean", "probe", "finetune", "mnist_probe", "pretrain_val_loss"}
    expected |= {f"corruption/{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES}
    for record in records:
        metrics = record["metrics"]
        assert expected <= set(metrics) and len([k for k in metrics if k.startswith("pgd/")]) == 4
        assert all(0 <= v <= 1 for k, v in metrics.items() if k != "pretrain_val_loss")
        assert record["preset"] == "smoke" and record["device"] and record["commit"]
    assert log.count(", new") == 5

    table = (tmp_path / "out" / "study_smoke.md").read_text()
    for block in table.split("\n\n"):  # every Markdown table: header, separator and rows of one width
        widths = {line.count("|") for line in block.splitlines() if line.startswith("|")}
        assert len(widths) <= 1, block
    for method in study.METHODS:
        assert f"| {method} | 1 (0) |" in table  # summary row: one seed, seed 0
        assert f"| {method} | 0 |" in table  # every-run row
    assert all(
        (tmp_path / "out" / f"study_smoke_{name}.png").stat().st_size > 10_000 for name in ("corruptions", "pgd")
    )

    for made in (table_path := tmp_path / "out" / "study_smoke.md", *(tmp_path / "out").glob("*.png")):
        made.unlink()
    run_study(tmp_path, "--report")  # rebuilds the same table from the records alone
    assert table_path.read_text() == table and len(list((tmp_path / "out").glob("*.png"))) == 2

    log = run_study(tmp_path, "--seeds", "0", "--methods", "MAE+AEMIM")
    assert "MAE+AEMIM seed 0" in log and "reproduced exactly the earlier run" in log
    rerun = json.loads(results.read_text())
    assert [r["metrics"] for r in rerun] == [r["metrics"] for r in records]


def record(method: str, seed: int, value: float) -> dict:
    metrics = {"probe": value, "finetune": value, "mnist_probe": value, "clean": value, "pretrain_val_loss": 0.5}
    metrics |= {f"corruption/{c}/{s}": value / s for c in CORRUPTIONS for s in SEVERITIES}
    metrics |= {"corruption/mean": statistics.mean(value / s for s in SEVERITIES), "pgd/0.00392": value / 2}
    return {"method": method, "seed": seed, "metrics": metrics, "minutes": {"pretrain": 1.0},
            "device": "dev", "commit": "abc", "date": "today"}  # fmt: skip


def test_next_seed_is_the_first_one_some_method_lacks():
    records = [record(m, 0, 0.5) for m in study.METHODS] + [record("MAE", 1, 0.5)]
    assert study.next_seed(records, list(study.METHODS)) == 1
    assert study.next_seed(records, ["MAE"]) == 2
    assert study.next_seed([], ["MAE"]) == 0


def test_a_rerun_replaces_its_record_and_reports_the_difference():
    records = [record("MAE", 0, 0.5), record("SimMIM", 0, 0.6)]
    assert study.replace_record(records, record("MAE", 0, 0.5)).startswith("reproduced exactly")
    verdict = study.replace_record(records, record("MAE", 0, 0.7))
    assert "max |diff| 0.2" in verdict and [r["method"] for r in records] == ["MAE", "SimMIM"]  # in place
    assert records[0]["metrics"]["probe"] == 0.7


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_summary_row_is_mean_and_sample_std_over_seeds(seeds):
    values = [0.50, 0.56, 0.59][: len(seeds)]
    records = [record("MAE+AEMIM", s, v) for s, v in zip(seeds, values, strict=True)]
    row = next(line for line in study.markdown("cpu", records).splitlines() if line.startswith("| MAE+AEMIM | "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    mean, std = 100 * statistics.mean(values), 100 * statistics.stdev(values) if len(values) > 1 else None
    assert cells[1] == f"{len(seeds)} ({', '.join(map(str, seeds))})"
    assert cells[2] == (f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}")
    assert cells[-2:] == ["dev", "abc"]  # every number states its device and commit
