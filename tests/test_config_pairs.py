"""Job configs and the plug-in's one overlay.

The plug-in's options and their defaults live once, in ``configs/plugin/aemim.yaml``; every plug-in job composes it
(``plugin: plugin/aemim.yaml``), and ``configs/overlays/aemim.yaml`` puts it on any job (``-c mae.yaml -c
overlays/aemim.yaml``). The hosts are found, not listed: every ``MIMMethod`` of ``advmim_pl.mim`` must have a baseline
job ``X.yaml`` and its plug-in job ``X_adv.yaml``, and the two resolve (the way ``advmim fit`` resolves them:
defaults, links, class paths) to exactly the baseline plus the overlay. A continuation (``X_adv_continue.yaml``) and a
progressive job (``X_adv_progressive.yaml``) change only what their kind of job changes. The quickstart feature
evaluation is the full one on other data.
"""

from pathlib import Path
from pydoc import locate

import pytest
import yaml

from advmim_pl.adversarial import AEMIM
from advmim_pl.checks import plain
from advmim_pl.mim import hosts
from tests.helpers.config_tools import leaves, printed_config

CONFIGS = Path(__file__).parents[1] / "configs"
OVERLAY = CONFIGS / "plugin" / "aemim.yaml"
PLUGIN = ("model", "init_args", "plugin")
ABSENT = "<absent>"
FEATURE_JOBS = ("features.yaml", "quickstart_features.yaml")
HOSTS = [host for host in hosts() if host.__module__.startswith("advmim_pl.")]  # a test's toy host ships no configs


def relative(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def pretrain_jobs() -> dict[Path, dict]:
    """Every shipped pre-training job config (its model names PretrainModule), as written."""
    found = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        if str((config.get("model") or {}).get("class_path", "")).endswith("PretrainModule"):
            found[path] = config
    return found


JOBS = pretrain_jobs()


def host_name(config: dict) -> str:
    return config["model"]["init_args"]["method"]["class_path"].rpartition(".")[2]


def sibling(path: Path, suffix: str, replacement: str) -> Path | None:
    """``path`` with its name's ``suffix`` replaced, when ``path`` ends in it and that file exists."""
    if not path.name.endswith(suffix):
        return None
    other = path.with_name(path.name.removesuffix(suffix) + replacement)
    return other if other.is_file() else None


PAIRS = [  # (baseline, plug-in job) of the top-level jobs
    (relative(base), relative(job))
    for job in JOBS
    if job.parent == CONFIGS and (base := sibling(job, "_adv.yaml", ".yaml"))
]
CONTINUATIONS = [(relative(job), relative(c)) for c in JOBS if (job := sibling(c, "_adv_continue.yaml", "_adv.yaml"))]
PROGRESSIVE = [(relative(job), relative(p)) for p in JOBS if (job := sibling(p, "_adv_progressive.yaml", "_adv.yaml"))]


def overlay(capsys, base: list[str], other: list[str]) -> dict[tuple, object]:
    """{resolved key: value in ``other``} for every key whose value differs between the two resolved configs."""
    before, after = leaves(printed_config(capsys, *base)), leaves(printed_config(capsys, *other))
    changed = {k for k in before.keys() | after.keys() if before.get(k, ABSENT) != after.get(k, ABSENT)}
    return {k: after.get(k, ABSENT) for k in changed}


@pytest.mark.parametrize("host", HOSTS, ids=[h.__name__ for h in HOSTS])
def test_every_host_has_a_baseline_job_and_its_plugin_job(host):
    pairs = [(base, job) for base, job in PAIRS if host_name(JOBS[CONFIGS / base]) == host.__name__]
    assert pairs, f"{host.__name__}: no configs/X.yaml with its X_adv.yaml"
    for base, job in pairs:
        assert JOBS[CONFIGS / base]["model"]["init_args"].get("plugin") is None, base
        assert JOBS[CONFIGS / job]["model"]["init_args"]["plugin"] == "plugin/aemim.yaml", job  # composed, not copied


@pytest.mark.parametrize("base, job", PAIRS, ids=[job for _, job in PAIRS])
def test_a_plugin_job_is_its_baseline_job_plus_the_overlay(base, job, capsys):
    assert overlay(capsys, ["-c", base, "-c", "overlays/aemim.yaml"], ["-c", job]) == {}
    changes = overlay(capsys, ["-c", base], ["-c", job])
    assert changes and all(key[:3] == PLUGIN for key in changes)


def test_the_overlay_holds_the_plugins_defaults(capsys):
    """``plugin/aemim.yaml`` resolves to ``AEMIM()``'s configuration: the file is the defaults, written out."""
    defaults = leaves(plain(AEMIM().config()))
    resolved = leaves(printed_config(capsys, "-c", "quickstart_adv.yaml")["model"]["init_args"]["plugin"])
    written = leaves(yaml.safe_load(OVERLAY.read_text()))  # every option spelled out, none left implicit
    for config in (resolved, written):
        assert config.keys() == defaults.keys()
        for key, value in defaults.items():  # a class may be named by the path its package exports it under
            assert locate(config[key]) is locate(value) if key[-1] == "class_path" else config[key] == value, key


def test_no_config_copies_a_default_of_the_plugin():
    """A config that writes a plug-in block (a progressive window, the study's noise control, an ablation) writes only
    the options it changes: a default written anywhere but the overlay would be a copy that can drift."""
    defaults = leaves(plain(AEMIM().config())["init_args"])
    for path in sorted(CONFIGS.rglob("*.yaml")):
        if path == OVERLAY:
            continue
        plugin = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args", {}).get("plugin")
        if isinstance(plugin, dict):
            written = leaves(plugin.get("init_args") or {})
            copied = {k for k, v in written.items() if k[-1] != "class_path" and k in defaults and defaults[k] == v}
            assert not copied, f"{relative(path)} repeats the plug-in's defaults {sorted(copied)}"


def test_the_quickstart_feature_evaluation_is_the_full_one_on_other_data():
    """``eval/quickstart_features.yaml`` is ``eval/features.yaml`` with the bundled sample as data: every other
    section (model, trainer, seed) is the same, so the two cannot drift apart."""
    full, quick = (yaml.safe_load((CONFIGS / "eval" / name).read_text()) for name in FEATURE_JOBS)
    assert full.keys() == quick.keys() and quick["data"]["class_path"].endswith("BundledSampleDataModule")
    assert {k: v for k, v in full.items() if k != "data"} == {k: v for k, v in quick.items() if k != "data"}


# what a continuation may change in its plug-in job: the schedule, the weights it starts from and where it logs
CONTINUATION_KEYS = {
    ("trainer", "max_epochs"),
    *(("model", "init_args", key) for key in ("base_lr", "warmup_epochs", "init_from")),
}


def test_the_continuations_and_progressive_jobs_are_found():
    assert {"mae_adv_continue.yaml", "quickstart_adv_continue.yaml"} <= {c for _, c in CONTINUATIONS}
    assert {"mae_adv_progressive.yaml", "quickstart_adv_progressive.yaml"} <= {p for _, p in PROGRESSIVE}


@pytest.mark.parametrize("plugin, continuation", CONTINUATIONS, ids=[c for _, c in CONTINUATIONS])
def test_a_continuation_job_is_its_plugin_job_with_a_continuation_schedule(plugin, continuation, capsys):
    changes = overlay(capsys, ["-c", plugin], ["-c", continuation])
    assert {k for k in changes if k[:2] != ("trainer", "logger")} == CONTINUATION_KEYS
    before = leaves(printed_config(capsys, "-c", plugin))
    assert changes[("model", "init_args", "base_lr")] <= before[("model", "init_args", "base_lr")] / 4
    # a few epochs, not the schedule again: 20 of 800 on ImageNet; 1 of the 2-epoch quickstart, its shortest
    assert changes[("trainer", "max_epochs")] <= max(1, before[("trainer", "max_epochs")] / 4)


# what a progressive job may change in its plug-in job: the resolution schedule, and the plug-in's window and share
PROGRESSIVE_KEYS = {
    ("data", "init_args", "resolution"),
    *((*PLUGIN, "init_args", key) for key in ("epochs", "batch_fraction")),
}


@pytest.mark.parametrize("plugin, progressive", PROGRESSIVE, ids=[p for _, p in PROGRESSIVE])
def test_a_progressive_job_is_its_plugin_job_with_a_resolution_schedule(plugin, progressive, capsys):
    changes = overlay(capsys, ["-c", plugin], ["-c", progressive])
    assert {k[:5] if k[:3] == PLUGIN else k[:3] for k in changes} <= PROGRESSIVE_KEYS
    assert ("data", "init_args", "resolution", "class_path") in changes
