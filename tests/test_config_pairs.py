"""Each ``*_adv.yaml`` job is its baseline job plus one plug-in overlay, the same for every pair.

Both files of a pair are resolved the way ``advmim fit`` resolves them (defaults, links, class paths), so a
value that a plug-in file sets to its default does not count as a difference, and one that drifted does.
The quickstart feature evaluation is likewise the full one on other data.
"""

from pathlib import Path

import pytest
import yaml

from tests.helpers.config_tools import leaves, printed_config

CONFIGS = Path(__file__).parents[1] / "configs"
PAIRS = sorted((p.name.removesuffix("_adv.yaml") + ".yaml", p.name) for p in CONFIGS.glob("*_adv.yaml"))
# what the plug-in may change: the attack section and the module's plug-in options
PLUGIN_MODEL_KEYS = {"adversarial", "aux_weight", "aux_input", "aux_target", "branch_params", "aux_decoder"}
# per job, not per method: how often the image grids are written (every 500 steps on ImageNet, 50 in a quickstart)
PER_JOB = {("attack", "init_args", "log_images_every_n_steps")}
ABSENT = "<absent>"
FEATURE_JOBS = ("features.yaml", "quickstart_features.yaml")


def is_plugin_key(key: tuple) -> bool:
    return key[0] == "attack" or (key[:2] == ("model", "init_args") and key[2] in PLUGIN_MODEL_KEYS)


def overlay(capsys, base: str, plugin: str) -> dict[tuple, object]:
    """{resolved key: value in the plug-in job} for every key whose value differs from the base job."""
    before, after = leaves(printed_config(capsys, "-c", base)), leaves(printed_config(capsys, "-c", plugin))
    changed = {k for k in before.keys() | after.keys() if before.get(k, ABSENT) != after.get(k, ABSENT)}
    return {k: after.get(k, ABSENT) for k in changed}


def test_every_plugin_job_has_its_baseline():
    assert [plugin for _, plugin in PAIRS] == [
        "mae_adv.yaml",
        "maskfeat_adv.yaml",
        "quickstart_adv.yaml",
        "quickstart_maskfeat_adv.yaml",
        "quickstart_simmim_adv.yaml",
        "simmim_adv.yaml",
    ]
    assert all((CONFIGS / base).is_file() for base, _ in PAIRS)


@pytest.mark.parametrize("base, plugin", PAIRS, ids=[p for _, p in PAIRS])
def test_a_plugin_job_differs_from_its_baseline_only_in_plugin_keys(base, plugin, capsys):
    changes = overlay(capsys, base, plugin)
    assert sorted(k for k in changes if not is_plugin_key(k)) == []
    assert changes[("attack", "class_path")] == "advmim_pl.adversarial.AdversarialTargetCallback"


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


@pytest.mark.parametrize("plugin", ["mae_adv.yaml", "quickstart_adv.yaml"])
def test_a_continuation_job_is_its_plugin_job_with_a_continuation_schedule(plugin, capsys):
    changes = overlay(capsys, plugin, plugin.replace("_adv.yaml", "_adv_continue.yaml"))
    assert {k for k in changes if k[:2] != ("trainer", "logger")} == CONTINUATION_KEYS
    before = leaves(printed_config(capsys, "-c", plugin))
    assert changes[("model", "init_args", "base_lr")] <= before[("model", "init_args", "base_lr")] / 4
    assert changes[("trainer", "max_epochs")] <= before[("trainer", "max_epochs")] / 4
