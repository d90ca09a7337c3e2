"""Each job with the plug-in is its baseline job plus one plug-in overlay, the same for every pair.

The pairs are found, not listed: every shipped job config (one that names its model's class) with a
``model.init_args.plugin`` block, paired with its baseline sibling (``X_adv.yaml`` with ``X.yaml``), and every
continuation (``X_adv_continue.yaml``) with the plug-in job it continues (``X_adv.yaml``); a new host method's pair is
checked when its configs land. Both files of a pair are resolved the way ``advmim fit`` resolves them (defaults,
links, class paths), so a value that a plug-in file sets to its default does not count as a difference, and one that
drifted does. The quickstart feature evaluation is likewise the full one on other data.
"""

from pathlib import Path

import pytest
import yaml

from tests.helpers.config_tools import leaves, printed_config

CONFIGS = Path(__file__).parents[1] / "configs"
PLUGIN = ("model", "init_args", "plugin")
# per job, not per method: how often the image grids are written (every 500 steps on ImageNet, 50 in a quickstart)
PER_JOB = {(*PLUGIN, "init_args", "log_images_every_n_steps")}
ABSENT = "<absent>"
FEATURE_JOBS = ("features.yaml", "quickstart_features.yaml")


def plugin_jobs() -> list[Path]:
    """Every shipped job config (not an overlay: its model names a class_path) with a plug-in block."""
    jobs = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        model = yaml.safe_load(path.read_text()).get("model") or {}
        if "class_path" in model and (model.get("init_args") or {}).get("plugin") is not None:
            jobs.append(path)
    return jobs


def sibling(path: Path, suffix: str, replacement: str) -> Path | None:
    """``path`` with its name's ``suffix`` replaced, when ``path`` ends in it and that file exists."""
    if not path.name.endswith(suffix):
        return None
    other = path.with_name(path.name.removesuffix(suffix) + replacement)
    return other if other.is_file() else None


def relative(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


JOBS = plugin_jobs()
PAIRS = [(relative(base), relative(job)) for job in JOBS if (base := sibling(job, "_adv.yaml", ".yaml"))]
CONTINUATIONS = [
    (relative(job), relative(cont)) for cont in JOBS if (job := sibling(cont, "_adv_continue.yaml", "_adv.yaml"))
]
PROGRESSIVE = [
    (relative(job), relative(prog)) for prog in JOBS if (job := sibling(prog, "_adv_progressive.yaml", "_adv.yaml"))
]


def is_plugin_key(key: tuple) -> bool:
    return key[:3] == PLUGIN


def overlay(capsys, base: str, plugin: str) -> dict[tuple, object]:
    """{resolved key: value in the plug-in job} for every key whose value differs from the base job."""
    before, after = leaves(printed_config(capsys, "-c", base)), leaves(printed_config(capsys, "-c", plugin))
    changed = {k for k in before.keys() | after.keys() if before.get(k, ABSENT) != after.get(k, ABSENT)}
    return {k: after.get(k, ABSENT) for k in changed}


def test_every_plugin_job_has_its_baseline_or_continues_one():
    paired = {plugin for _, plugin in PAIRS} | {continuation for _, continuation in CONTINUATIONS}
    paired |= {progressive for _, progressive in PROGRESSIVE}
    assert paired == {relative(job) for job in JOBS}
    # at least the shipped MAE, SimMIM and both quickstarts, and the reference of the shared overlay
    assert {"mae_adv.yaml", "simmim_adv.yaml", "quickstart_adv.yaml", "quickstart_simmim_adv.yaml"} <= paired
    assert {"mae_adv_continue.yaml", "quickstart_adv_continue.yaml"} <= {c for _, c in CONTINUATIONS}
    assert {"mae_adv_progressive.yaml", "quickstart_adv_progressive.yaml"} <= {p for _, p in PROGRESSIVE}


@pytest.mark.parametrize("base, plugin", PAIRS, ids=[p for _, p in PAIRS])
def test_a_plugin_job_differs_from_its_baseline_only_in_the_plugin_block(base, plugin, capsys):
    changes = overlay(capsys, base, plugin)
    assert sorted(k for k in changes if not is_plugin_key(k)) == []
    assert changes[(*PLUGIN, "class_path")] == "advmim_pl.adversarial.AEMIM"


def test_every_pair_shares_one_overlay(capsys):
    overlays = {plugin: overlay(capsys, base, plugin) for base, plugin in PAIRS}
    reference = {k: v for k, v in overlays["mae_adv.yaml"].items() if k not in PER_JOB}
    for plugin, changes in overlays.items():
        shared = {k: v for k, v in changes.items() if k not in PER_JOB}
        drift = {k: (reference.get(k, ABSENT), shared.get(k, ABSENT)) for k in reference.keys() | shared.keys()}
        assert {k: v for k, v in drift.items() if v[0] != v[1]} == {}, f"{plugin} drifted from mae_adv.yaml"


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


@pytest.mark.parametrize("plugin, continuation", CONTINUATIONS, ids=[c for _, c in CONTINUATIONS])
def test_a_continuation_job_is_its_plugin_job_with_a_continuation_schedule(plugin, continuation, capsys):
    changes = overlay(capsys, plugin, continuation)
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
    changes = overlay(capsys, plugin, progressive)
    assert {k[:5] if k[:3] == PLUGIN else k[:3] for k in changes} <= PROGRESSIVE_KEYS
    assert ("data", "init_args", "resolution", "class_path") in changes
