"""advmim export to a timm folder: the local-dir: round trip, the folder-or-file rule, the model card, the metadata
this project reads back, and the one-line refusals."""

import json
import shutil

import huggingface_hub
import lightning as L
import pytest
import timm
import torch
from safetensors import safe_open

from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.cli import run
from advmim_pl.models.branch_norm import branch
from tests.helpers.micro import MICRO_VIT, bundled_sample, micro_module, save, smooth_images, trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro MAE run with the plug-in, two steps on the bundled sample, saved where a run saves it
    (``version_0/checkpoints/last.ckpt``): the module and the checkpoint's path."""
    L.seed_everything(0)
    module = micro_module(plugin=AEMIM(attack=Attacker(steps=1)))
    t = trainer(2, limit_val_batches=0)
    t.fit(module, datamodule=bundled_sample(batch_size=8))
    ckpt = tmp_path_factory.mktemp("run") / "version_0" / "checkpoints" / "last.ckpt"
    t.save_checkpoint(ckpt)
    return module.eval(), ckpt


def one_line_exit(argv: list[str]) -> str:
    """The message ``advmim export`` stops with, checked to be one line."""
    with pytest.raises(SystemExit) as exit_info:
        run(["export", *argv])
    message = str(exit_info.value.code)
    assert message.startswith("advmim export: ") and "\n" not in message
    return message


def assert_local_dir_gives_clean_features(folder, module) -> None:
    """``timm.create_model("local-dir:...")`` alone, with its own data config's mean/std, gives the module's clean
    encoder features (and, with the plug-in, not the auxiliary branch's)."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    cfg = timm.data.resolve_model_data_config(model)
    x = smooth_images(4, seed=1)
    mean, std = torch.tensor(cfg["mean"]).view(1, -1, 1, 1), torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        exported = model.forward_features((x - mean) / std)
        torch.testing.assert_close(exported, module.encoder.forward_features(x))
        if module.plugin is not None:
            with branch(module.encoder, "aux"):
                assert not torch.allclose(exported, module.encoder.forward_features(x), atol=1e-4)


@pytest.mark.parametrize("method, plugin", [("mae", True), ("simmim", False)])
def test_local_dir_load_gives_the_clean_encoder_with_its_config(trained, tmp_path, method, plugin):
    if plugin:
        module, ckpt = trained
    else:  # untrained, saved without a trainer: the SimMIM encoder has a mask token and no branch norms
        module = micro_module(method).eval()
        ckpt = save(module, tmp_path / "simmim.ckpt")
    run(["export", str(ckpt), str(tmp_path / "encoder")])

    assert_local_dir_gives_clean_features(tmp_path / "encoder", module)
    model = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=True)
    assert model.num_classes == 0 and model.patch_embed.patch_size == (4, 4)
    cfg = model.pretrained_cfg
    assert (tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"])) == ((1, 32, 32), (0.5,), (0.25,))
    assert cfg["num_classes"] == 0 and cfg["crop_pct"] == 1.0
    config = json.loads((tmp_path / "encoder" / "config.json").read_text())
    args = config["model_args"]
    assert {k: args[k] for k in ("patch_size", "in_chans", "num_classes", *MICRO_VIT)} == {
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": 0,
        **MICRO_VIT,
    }
    assert args["img_size"] in (32, [32, 32])  # timm 1.0.31 records the size it built, as a pair


def test_folder_holds_the_metadata_of_the_single_file(trained, tmp_path):
    _, ckpt = trained
    run(["export", str(ckpt), str(tmp_path / "encoder.safetensors")])
    run(["export", str(ckpt), str(tmp_path / "encoder")])

    assert sorted(p.name for p in (tmp_path / "encoder").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    with (
        safe_open(str(tmp_path / "encoder.safetensors"), "pt") as single,
        safe_open(str(tmp_path / "encoder" / "model.safetensors"), "pt") as folder,
    ):
        meta = single.metadata()
        assert sorted(single.keys()) == sorted(folder.keys())
        for key in single.keys():
            assert torch.equal(single.get_tensor(key), folder.get_tensor(key)), key
    advmim = json.loads((tmp_path / "encoder" / "config.json").read_text())["advmim"]
    assert advmim == {
        "timm_kwargs": json.loads(meta["timm_kwargs"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
        "method": meta["method"],
        "resolution": json.loads(meta["resolution"]),
    }
    assert advmim["method"] == "MAE" and advmim["mean"] == [0.5] and advmim["std"] == [0.25]
    assert advmim["resolution"] == {"final": 32, "schedule": None}  # trained at one side


@pytest.mark.parametrize(
    "output, flags, folder",
    [
        ("encoder", [], True),  # no suffix
        ("encoder.v1/", [], True),  # trailing slash
        ("made.d", [], True),  # an existing directory (created below)
        ("encoder.safetensors", ["--folder"], True),
        ("encoder.safetensors", [], False),
    ],
)
def test_output_is_a_folder_or_one_file_by_the_stated_rule(trained, tmp_path, output, flags, folder):
    _, ckpt = trained
    (tmp_path / "made.d").mkdir()
    run(["export", str(ckpt), f"{tmp_path}/{output}", *flags])  # a string: a Path would drop the trailing '/'
    written = tmp_path / output
    assert written.is_dir() == folder and written.exists()
    if folder:
        assert (written / "model.safetensors").is_file() and (written / "config.json").is_file()


def test_other_suffix_is_refused_naming_it(trained, tmp_path):
    _, ckpt = trained
    message = one_line_exit([str(ckpt), str(tmp_path / "encoder.pt")])
    assert f"output '{tmp_path / 'encoder.pt'}' ends in '.pt'" in message
    assert ".safetensors file" in message and "--folder" in message
    assert list(tmp_path.iterdir()) == []


def test_model_card_names_method_attack_data_training_and_features(trained, tmp_path):
    _, ckpt = trained
    version = tmp_path / "version_3"
    (version / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, version / "checkpoints" / "last.ckpt")
    table = "Frozen features of last.ckpt on X.\n\n| features | pooling |\n| --- | --- |\n| encoder | token |"
    (version / "features.md").write_text(table + "\n")
    run(["export", str(version / "checkpoints" / "last.ckpt"), str(tmp_path / "encoder")])

    card = (tmp_path / "encoder" / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "library_name: timm" in card
    assert "- **Pre-training:** MAE, with the AEMIM adversarial plug-in" in card
    plugin = card.split("- **Plug-in:**\n", 1)[1].split("- **", 1)[0]  # the plug-in's settings, from its hparams
    assert f"'eps': {4 / 255}, 'steps': 1," in plugin.split("  - attack: ", 1)[1]  # the nested attack block
    assert "  - aux_weight: 1.0\n" in plugin
    assert "  - channels: 1\n" in card and "  - crop_scale: (0.5, 1.0)\n" in card  # the data module's options
    assert "- **Training:** 2 optimizer steps" in card
    assert "  - mask_ratio: 0.75\n" in card
    assert f"## Model Comparison\n{table}\n" in card
    assert f'timm.create_model("local-dir:{tmp_path / "encoder"}", pretrained=True)' in card


def test_model_card_without_plugin_trainer_or_features_says_so(tmp_path):
    ckpt = save(micro_module("simmim"), tmp_path / "simmim.ckpt")
    run(["export", str(ckpt), str(tmp_path / "encoder")])

    card = (tmp_path / "encoder" / "README.md").read_text()
    assert "- **Pre-training:** SimMIM, without the adversarial plug-in" in card
    assert "- **Data:** not recorded in the checkpoint" in card
    assert "- **Training:** not recorded in the checkpoint" in card
    assert "Plug-in" not in card and "## Model Comparison" not in card


def test_non_empty_folder_is_refused_unless_overwrite(trained, tmp_path):
    module, ckpt = trained
    out = tmp_path / "encoder"
    out.mkdir()
    (out / "notes.txt").write_text("keep")

    message = one_line_exit([str(ckpt), str(out)])
    assert f"output folder '{out}' is not empty (it holds notes.txt)" in message and "--overwrite" in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    run(["export", str(ckpt), str(out), "--overwrite"])
    assert (out / "notes.txt").read_text() == "keep"
    assert_local_dir_gives_clean_features(out, module)


def test_missing_truncated_or_other_checkpoint_is_one_line_and_writes_nothing(trained, tmp_path):
    _, ckpt = trained
    missing = tmp_path / "missing.ckpt"
    message = one_line_exit([str(missing), str(tmp_path / "encoder")])
    assert f"checkpoint '{missing}' does not exist" in message

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:2000])
    message = one_line_exit([str(truncated), str(tmp_path / "encoder")])
    assert f"checkpoint '{truncated}' is truncated or not a checkpoint" in message

    plain = tmp_path / "plain.ckpt"
    torch.save({"model": torch.load(ckpt, weights_only=False)["state_dict"]}, plain)
    message = one_line_exit([str(plain), str(tmp_path / "encoder")])
    assert f"checkpoint '{plain}' is not a pre-training checkpoint" in message and "advmim fit" in message
    assert not (tmp_path / "encoder").exists()


def test_push_without_network_stops_in_one_line_after_writing_the_folder(trained, tmp_path, monkeypatch):
    module, ckpt = trained
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    out = tmp_path / "encoder"

    message = one_line_exit([str(ckpt), str(out), "--push-to-hub", "someone/advmim-micro"])
    assert message.startswith(
        f"advmim export: wrote {out}, but the push to the Hugging Face Hub repo 'someone/advmim-micro' failed ("
    )
    assert message.endswith("check the network and the token (hf auth login)")
    assert_local_dir_gives_clean_features(out, module)
