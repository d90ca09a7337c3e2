"""Files from elsewhere never run code: one checkpoint whose pickle creates a marker folder when it is unpickled, fed to
every entry point that reads a file (``--ckpt_path`` of fit/validate/test/predict, ``advmim export``, each stage's
``init_from``, the study's readers of its own runs). Each is refused in one line naming the file and the refused
type, with exit code 2, and the marker never appears. Loading the same file with full unpickling does create it,
which shows that the test can fail.

The entry points run in one subprocess through ``advmim_pl.cli.main``, the console script's function (one interpreter
start instead of ten); one more runs the installed ``advmim`` script itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.micro import micro_module

REPO = Path(__file__).resolve().parents[1]
EVIL = "evil.ckpt"
ENTRY_POINTS = {
    "fit --ckpt_path": ["fit", "-c", "quickstart.yaml", "--ckpt_path", EVIL],
    "validate --ckpt_path": ["validate", "-c", "quickstart.yaml", "--ckpt_path", EVIL],
    "test --ckpt_path (robustness)": ["test", "-c", "eval/quickstart_robustness.yaml", "--ckpt_path", EVIL],
    "predict --ckpt_path": ["predict", "-c", "quickstart_finetune.yaml", "--ckpt_path", EVIL,
                            "--model.init_args.init_from", "null"],
    "export (file)": ["export", EVIL, "out.safetensors"],
    "export (folder)": ["export", EVIL, "out_folder/"],
    "fit init_from (pre-training)": ["fit", "-c", "quickstart.yaml", "--model.init_args.init_from", EVIL],
    "fit init_from (continuation)": ["fit", "-c", "quickstart_adv_continue.yaml", "--model.init_args.init_from", EVIL],
    "fit init_from (probe)": ["fit", "-c", "quickstart_probe.yaml", "--model.init_args.init_from", EVIL],
    "fit init_from (fine-tune)": ["fit", "-c", "quickstart_finetune.yaml", "--model.init_args.init_from", EVIL],
    "test init_from (features)": ["test", "-c", "eval/quickstart_features.yaml", "--model.init_args.init_from", EVIL],
}  # fmt: skip

DRIVER = """
import contextlib, io, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from advmim_pl.cli import main
from benchmarks.studykit.commands import kept_checkpoint
from benchmarks.studykit.evaluate import checkpoint_encoder

def outcome(call):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            call()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (print(stop.code, file=err) or 1)
        except Exception as exc:  # a library function (the study's readers) raises instead of exiting
            code, _ = "raised", print(f"{type(exc).__name__}: {exc}", file=err)
    return {"code": code, "stderr": err.getvalue(), "marker": Path("marker").exists()}

def run_cli(argv):
    sys.argv = ["advmim", *argv]
    return lambda: main()

results = {name: outcome(run_cli(argv)) for name, argv in json.loads(sys.argv[2]).items()}
Path("study/pretrain/version_0/checkpoints").mkdir(parents=True)
Path("evil.ckpt").rename("study/pretrain/version_0/checkpoints/last.ckpt")
kept = Path("study/pretrain/version_0/checkpoints/last.ckpt")
results["study: kept_checkpoint"] = outcome(lambda: kept_checkpoint(Path("study"), {}, None))
results["study: checkpoint_encoder"] = outcome(lambda: checkpoint_encoder(kept, "cpu"))
print(json.dumps(results))
"""


class MakesMarker:
    """Unpickling this object creates the folder ``marker`` in the working directory: what a malicious pickle
    would do."""

    def __reduce__(self):
        return os.mkdir, ("marker",)


def plant(folder: Path) -> Path:
    """A checkpoint that looks like this project's (state dict, hyperparameters, step) with the planted object."""
    module = micro_module()
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {**dict(module.hparams), "payload": MakesMarker()},
        "global_step": 10,
    }
    torch.save(checkpoint, folder / EVIL)
    return folder / EVIL


def test_a_code_running_pickle_is_refused_by_every_entry_point_and_its_code_never_runs(tmp_path):
    plant(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO), json.dumps(ENTRY_POINTS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(outcomes) == len(ENTRY_POINTS) + 2
    for name, seen in outcomes.items():
        assert not seen["marker"], f"{name}: the planted code ran"
        lines = [line for line in seen["stderr"].splitlines() if line.startswith(("advmim", "UnsafeCheckpointError"))]
        assert len(lines) == 1 and "holds posix.mkdir, which only full unpickling could load" in lines[0], (
            name,
            seen["stderr"][-2000:],
        )
        assert "evil.ckpt" in lines[0] or "last.ckpt" in lines[0], (name, lines[0])
        assert seen["code"] == (2 if not name.startswith("study") else "raised"), (name, seen)
    assert not (tmp_path / "marker").exists()


def test_the_advmim_script_refuses_it_in_one_line_with_exit_code_2(tmp_path):
    plant(tmp_path)
    advmim = Path(sys.executable).with_name("advmim")
    result = subprocess.run(
        [str(advmim), "export", EVIL, "out.safetensors"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "'evil.ckpt' holds posix.mkdir" in result.stderr
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out.safetensors").exists()


def test_full_unpickling_of_the_planted_file_does_run_its_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plant(tmp_path)
    torch.load(tmp_path / EVIL, weights_only=False)
    assert (tmp_path / "marker").is_dir()
