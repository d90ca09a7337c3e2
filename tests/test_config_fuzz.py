"""Malformed configurations: each is a CLI error (non-zero exit) whose message names what is wrong.

Parse-time errors (types, unknown keys, constrained numbers, literals, class paths) exit with code 2 and
print one line to stderr, the key and the innermost reason (the usage text belongs to ``--help``),
so the long usage listing (which names every option) cannot make a test pass. Constructor checks
(sizes that depend on each other, paths) become ``SystemExit("advmim: invalid configuration: ...")``.
Every case fails before training: no ``runs/`` folder appears.
"""

import importlib.util

import pytest
import torch
import yaml

from advmim_pl.cli import run

MAE_JOB, SIMMIM_JOB = "quickstart_adv.yaml", "quickstart_simmim_adv.yaml"


def model(**init_args) -> dict:
    return {"model": {"init_args": init_args}}


def method(**init_args) -> dict:
    return model(method={"init_args": init_args})


def plugin(**init_args) -> dict:
    return model(plugin={"init_args": init_args})


def attack(**init_args) -> dict:
    return plugin(attack={"init_args": init_args})


def data(**init_args) -> dict:
    return {"data": {"init_args": init_args}}


# (job config, overlay: a dict written as a YAML file composed after the job, or CLI flags, strings the error names)
CASES = {
    # wrong types
    "str_for_int_yaml": (MAE_JOB, model(patch_size="sixteen"), ["patch_size", "sixteen"]),
    "str_for_int_flag": (MAE_JOB, ["--data.init_args.batch_size", "abc"], ["batch_size", "abc"]),
    "list_for_float_yaml": (MAE_JOB, attack(eps=[0.1]), ["eps"]),
    "list_for_float_flag": (MAE_JOB, ["--model.init_args.base_lr", "[0.1, 0.2]"], ["base_lr"]),
    "bool_for_str": (MAE_JOB, model(encoder=True), ["encoder", "True"]),
    "str_for_bool": (MAE_JOB, plugin(on_validation="sometimes"), ["on_validation", "sometimes"]),
    "int_for_bool": (MAE_JOB, data(hflip=3), ["hflip"]),
    "list_for_dict": (MAE_JOB, model(encoder_kwargs=[1, 2]), ["encoder_kwargs"]),
    "str_for_seed": (MAE_JOB, {"seed_everything": "abc"}, ["seed_everything", "abc"]),
    "str_for_trainer_int": (MAE_JOB, ["--trainer.max_epochs", "four"], ["max_epochs", "four"]),
    # unknown keys at every level
    "unknown_top_level": (MAE_JOB, {"no_such_section": 1}, ["no_such_section"]),
    "unknown_trainer_key": (MAE_JOB, {"trainer": {"max_epoch": 3}}, ["max_epoch"]),
    "unknown_model_key": (MAE_JOB, model(base_learning_rate=0.1), ["base_learning_rate"]),
    "unknown_plugin_key": (MAE_JOB, plugin(epsilon=0.1), ["epsilon"]),
    "unknown_data_key": (MAE_JOB, data(batchsize=8), ["batchsize"]),
    "unknown_method_key": (MAE_JOB, method(mask_ration=0.5), ["mask_ration"]),
    "unknown_simmim_key": (SIMMIM_JOB, method(mask_patch=8), ["mask_patch"]),
    "unknown_encoder_kwarg": (MAE_JOB, model(encoder_kwargs={"depht": 2}), ["depht"]),
    # negative or zero sizes
    "batch_size_0": (MAE_JOB, data(batch_size=0), ["batch_size", "0"]),
    "img_size_negative": (MAE_JOB, data(img_size=-32), ["img_size", "-32"]),
    "decoder_dim_0": (MAE_JOB, method(decoder_dim=0), ["decoder_dim"]),
    "decoder_heads_not_dividing": (MAE_JOB, method(decoder_heads=5), ["decoder_dim", "decoder_heads (5)"]),
    "steps_negative": (MAE_JOB, attack(steps=-1), ["steps"]),
    "eps_negative": (MAE_JOB, attack(eps=-0.1), ["eps"]),
    "step_size_0": (MAE_JOB, attack(step_size=0), ["step_size"]),
    "warmup_negative": (MAE_JOB, attack(warmup_epochs=-1), ["warmup_epochs"]),
    "num_workers_negative": (MAE_JOB, data(num_workers=-1), ["num_workers", "-1"]),
    "num_nodes_0": (MAE_JOB, ["--trainer.num_nodes", "0"], ["num_nodes"]),
    "channels_2": (MAE_JOB, data(channels=2), ["channels", "2"]),
    "crop_scale_reversed": (MAE_JOB, data(crop_scale=[0.9, 0.5]), ["crop_scale"]),
    "drop_path_above_1": (MAE_JOB, model(drop_path_rate=1.5), ["drop_path_rate"]),
    # mask ratios outside (0, 1)
    **{
        f"{name}_mask_ratio_{ratio}": (job, method(mask_ratio=ratio), ["mask_ratio"])
        for name, job in (("mae", MAE_JOB), ("simmim", SIMMIM_JOB))
        for ratio in (0, 1, 1.5, -0.2)
    },
    # sizes that do not fit together
    "patch_not_dividing_image": (MAE_JOB, model(patch_size=6), ["patch_size 6", "img_size 32"]),
    "image_not_divided_by_patch": (MAE_JOB, data(img_size=30), ["img_size 30", "patch_size 4"]),
    "mask_patch_not_multiple_of_patch": (SIMMIM_JOB, method(mask_patch_size=6), ["mask_patch_size", "4", "got 6"]),
    "mask_patch_not_dividing_image": (SIMMIM_JOB, method(mask_patch_size=12), ["mask_patch_size", "32", "got 12"]),
    # unknown names and class paths
    "unknown_encoder": (MAE_JOB, model(encoder="vit_nonexistent"), ["vit_nonexistent", "VisionTransformer"]),
    "unknown_data_class": (MAE_JOB, ["--data", "advmim_pl.data.NoSuchDataModule"], ["NoSuchDataModule"]),
    "unknown_model_class": (MAE_JOB, {"model": {"class_path": "advmim_pl.modules.NoSuchModule"}}, ["NoSuchModule"]),
    "unknown_method_class": (MAE_JOB, model(method={"class_path": "advmim_pl.mim.BEiT"}), ["advmim_pl.mim.BEiT"]),
    "unknown_finetune_attack_class": (
        "quickstart_finetune.yaml",
        ["--model.init_args.attack", "advmim_pl.adversarial.NoSuchAttack"],
        ["NoSuchAttack"],
    ),
    "finetune_attack_eps_negative": (
        "quickstart_finetune.yaml",
        model(attack={"class_path": "advmim_pl.adversarial.Attacker", "init_args": {"eps": -0.1}}),
        ["eps", "-0.1"],
    ),
    "unknown_plugin_class": (
        MAE_JOB,
        ["--model.init_args.plugin", "advmim_pl.adversarial.NoSuchPlugin"],
        ["NoSuchPlugin"],
    ),
    "unknown_strategy": (MAE_JOB, ["--trainer.strategy", "ddp_nonexistent"], ["strategy", "ddp_nonexistent"]),
    "unknown_accelerator": (MAE_JOB, ["--trainer.accelerator", "quantum"], ["accelerator", "quantum"]),
    "unknown_precision": (MAE_JOB, ["--trainer.precision", "bf17"], ["precision", "bf17"]),
    # missing data
    "fashion_mnist_root_missing": (
        MAE_JOB,
        {"data": {"class_path": "advmim_pl.data.FashionMNISTDataModule", "init_args": {"root": "/no/such/fmnist"}}},
        ["/no/such/fmnist", "dataset-fashion-mnist"],
    ),
    "image_folder_train_root_missing": (
        MAE_JOB,
        {"data": {"class_path": "advmim_pl.data.ImageFolderDataModule", "init_args": {"train_root": "/no/such/train"}}},
        ["train_root", "/no/such/train"],
    ),
    "image_folder_train_root_not_given": (
        MAE_JOB,
        ["--data", "advmim_pl.data.ImageFolderDataModule"],
        ["train_root", "required"],
    ),
    # literals
    "unknown_distance": (MAE_JOB, plugin(distance="l3"), ["distance", "l3"]),
    "unknown_perturbation": (MAE_JOB, attack(perturbation="salt"), ["perturbation", "salt"]),
    "unknown_attack_mask": (MAE_JOB, plugin(attack_mask="half"), ["attack_mask", "half"]),
    "unknown_aux_input": (MAE_JOB, plugin(aux_input="sideways"), ["aux_input", "sideways"]),
    "unknown_branch_params": (MAE_JOB, plugin(branch_params="some"), ["branch_params", "some"]),
    "unknown_aux_decoder": (MAE_JOB, plugin(aux_decoder="both"), ["aux_decoder", "both"]),
    "unknown_aux_target_norm": (MAE_JOB, method(aux_target_norm="none"), ["aux_target_norm", "none"]),
    "negative_aux_norm_floor": (MAE_JOB, method(aux_norm_floor=-1.0), ["aux_norm_floor", "-1.0"]),
    # budgets and combinations that cannot work
    "eps_in_255_units": (MAE_JOB, attack(eps=8), ["eps=8", "8/255 = 0.0314"]),
    "pgd_without_budget": (MAE_JOB, attack(eps=0.0), ["eps", "got 0.0", "perturbation: none"]),
    "no_start_with_one_encoder": (
        MAE_JOB,
        plugin(attack={"init_args": {"random_start": False}}, branch_params="none"),
        ["random_start: false", "branch_params", "got 'none'"],
    ),
}


def config_error(job: str, overlay: dict | list[str], tmp_path, capsys) -> tuple[int | str, str]:
    """Run ``advmim fit`` on the malformed config; returns (exit code, the error message)."""
    args = ["fit", "-c", job]
    if isinstance(overlay, dict):
        path = tmp_path / "overlay.yaml"
        path.write_text(yaml.safe_dump(overlay))
        args += ["-c", str(path)]
    else:
        args += overlay
    with pytest.raises(SystemExit) as exit_info:
        run([*args, "--trainer.max_steps", "1"])
    code = exit_info.value.code
    err = capsys.readouterr().err
    if code == 2:  # the parser: one line "advmim fit: error: <key>: <reason> (every option: advmim fit --help)"
        assert err.startswith(("advmim fit: error: ", "advmim: error: ")) and err.count("\n") == 1, err[-2000:]
        return code, err
    return code, str(code)


@pytest.mark.parametrize("case", CASES)
def test_malformed_config_is_a_cli_error_naming_the_field(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job, overlay, named = CASES[case]
    code, message = config_error(job, overlay, tmp_path, capsys)
    assert code not in (0, None)
    if code != 2:
        assert message.startswith("advmim: invalid configuration: "), message
        assert "\n" not in message, message  # one line, no traceback
    for name in named:
        assert name in message, f"{name!r} not in: {message}"
    assert not (tmp_path / "runs").exists()  # refused before training started


# Errors raised while building the trainer or the encoder (not by the parser): still one line, naming the field.
BUILD_ERRORS = {
    "non_vit_encoder": pytest.param(MAE_JOB, model(encoder="resnet18"), ["resnet18", "VisionTransformer"]),
    "devices_not_a_number": pytest.param(MAE_JOB, ["--trainer.devices", "many"], ["devices"]),
    "devices_0": pytest.param(MAE_JOB, ["--trainer.devices", "0"], ["devices"]),
    "gpu_config_without_gpu": pytest.param(
        MAE_JOB,
        ["-c", "trainer/gpu.yaml"],
        ["gpu"],
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
    ),
    "tpu_config_without_torch_xla": pytest.param(
        MAE_JOB,
        ["-c", "trainer/tpu.yaml"],
        ["torch_xla"],
        marks=pytest.mark.skipif(importlib.util.find_spec("torch_xla") is not None, reason="torch_xla is installed"),
    ),
}


@pytest.mark.parametrize("job, overlay, named", list(BUILD_ERRORS.values()), ids=list(BUILD_ERRORS))
def test_build_time_config_errors(job, overlay, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, message = config_error(job, overlay, tmp_path, capsys)
    assert code not in (0, None)
    for name in named:
        assert name in message, f"{name!r} not in: {message}"


@pytest.mark.parametrize(
    "overlay, named",
    [
        (data(batch_size=-1), "batch_size"),
        (data(num_workers=-2), "num_workers"),
        (data(img_size=0), "img_size"),
        (data(channels=2), "channels"),
        (
            {"data": {"class_path": "advmim_pl.data.SyntheticDataModule", "init_args": {"num_samples": 0}}},
            "num_samples",
        ),
    ],
)
def test_data_module_values_are_refused_at_parse_time(overlay, named, tmp_path, capsys, monkeypatch):
    """The data modules' arguments are typed, so the parser itself (exit code 2) rejects them."""
    monkeypatch.chdir(tmp_path)
    code, message = config_error(MAE_JOB, overlay, tmp_path, capsys)
    assert code == 2 and named in message, (code, message)


@pytest.mark.parametrize(
    "flag, value, line",
    [
        ("--model.init_args.plugin.init_args.attack.init_args.eps", "-0.01", "model.init_args.plugin.init_args.attack"
         ".init_args.eps: Not of type NonNegativeFloat: -0.01 does not conform to restriction v>=0"),
        ("--model.init_args.method.init_args.mask_ratio", "0", "model.init_args.method.init_args.mask_ratio: Not of "
         "type OpenUnitInterval: 0 does not conform to restriction v>0 and v<1"),
        ("--model.init_args.plugin.init_args.aux_weight", "-1", "model.init_args.plugin.init_args.aux_weight: Not of "
         "type NonNegativeFloat: -1 does not conform to restriction v>=0"),
        ("--trainer.max_epochs", "abc", "trainer.max_epochs: 'abc' is not a valid value: expected int or NoneType"),
    ],
)  # fmt: skip
def test_a_refused_value_is_one_line_naming_the_key_the_value_and_the_bound(flag, value, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "-c", "quickstart_adv.yaml", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == f"advmim fit: error: {line} (every option: advmim fit --help)\n"
