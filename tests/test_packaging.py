"""Packaging: the library declares compatible ranges, the lock file pins exact versions inside them, and the
pre-commit hooks run the locked ruff."""

import re
from pathlib import Path

import pytest
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


def dependencies() -> list[Requirement]:
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


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
