"""Pre-trained weights in (advmim_pl.weights, PretrainModule(init_from=...)): facebookresearch/mae's key layout lands
where it belongs, a round trip through it keeps the loss, a continuation starts at the loaded encoder's quality,
position tables are resampled as timm does in every stage, and bad input is one line each."""

import argparse
import logging
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from advmim_pl.adversarial import AEMIM
from advmim_pl.cli import run
from advmim_pl.eval import KNNMonitor
from advmim_pl.export import export_encoder, export_folder
from advmim_pl.mim import MAE
from advmim_pl.models.branch_norm import clean_state_dict
from advmim_pl.models.pos_embed import sincos_2d
from advmim_pl.modules import FinetuneModule, LinearProbeModule, PretrainModule
from advmim_pl.reliability import CheckpointError, UnsafeCheckpointError
from advmim_pl.weights import encoder_state_dict, read_weights
from tests.helpers.micro import ENCODER, MICRO_FLAGS, MICRO_VIT, SAMPLE, bundled_sample, loader, micro_module, trainer

DECODER = dict(dim=32, depth=1)  # micro_module's MAE decoder
# facebookresearch/mae's decoder names (models_mae.py) -> this project's MAEDecoder names, spelled out here
REFERENCE_NAMES = {
    "decoder_embed.": "embed.",
    "mask_token": "mask_token",
    "decoder_pos_embed": "pos_embed",
    "decoder_blocks.": "blocks.",
    "decoder_norm.": "norm.",
    "decoder_pred.": "pred.",
}


def ours(reference_key: str) -> str:
    """This project's decoder key of a facebookresearch/mae decoder key."""
    prefix = next(p for p in REFERENCE_NAMES if reference_key.startswith(p))
    return REFERENCE_NAMES[prefix] + reference_key[len(prefix) :]


def theirs(our_key: str) -> str:
    """The facebookresearch/mae decoder key of this project's decoder key."""
    prefix = next(p for p, o in REFERENCE_NAMES.items() if our_key.startswith(o))
    return prefix + our_key[len(REFERENCE_NAMES[prefix]) :]


def micro_timm(img_size: int = 32, in_chans: int = 1) -> torch.nn.Module:
    return timm.create_model(
        "vit_base_patch16_224", num_classes=0, img_size=img_size, patch_size=4, in_chans=in_chans, **MICRO_VIT
    )


def reference_mae_state(decoder_dim: int = DECODER["dim"], seed: int = 0) -> dict[str, torch.Tensor]:
    """The ``model`` of a facebookresearch/mae checkpoint (mae_visualize / *_full) at micro size, with random values:
    the encoder under timm's names (models_mae.py builds it from timm's Block), the decoder under MAE's names."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in micro_timm().state_dict().items()}
    d, hidden, pixels = decoder_dim, 4 * decoder_dim, 4 * 4 * 1
    shapes = {"decoder_embed.weight": (d, 64), "decoder_embed.bias": (d,), "mask_token": (1, 1, d)}
    for i in range(DECODER["depth"]):
        block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                 "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
                 "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (d, hidden),
                 "mlp.fc2.bias": (d,)}  # fmt: skip
        shapes |= {f"decoder_blocks.{i}.{k}": s for k, s in block.items()}
    shapes |= {"decoder_norm.weight": (d,), "decoder_norm.bias": (d,), "decoder_pred.weight": (pixels, d)}
    shapes |= {"decoder_pred.bias": (pixels,)}
    state |= {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    state["decoder_pos_embed"] = sincos_2d(d, (8, 8), 1).unsqueeze(0)  # fixed, with a zero cls row
    return state


def save_reference(state: dict, path: Path) -> str:
    """A ``*_full.pth``-style file: the model, and the training state with its argparse.Namespace."""
    torch.save({"model": state, "optimizer": {}, "epoch": 799, "args": argparse.Namespace(model="mae_micro")}, path)
    return str(path)


# ---- the reference layout ----------------------------------------------------------------------------------------
def test_every_tensor_of_a_reference_mae_checkpoint_lands_where_it_belongs(tmp_path):
    state = reference_mae_state()
    path = save_reference(state, tmp_path / "mae_visualize_vit_micro.pth")
    consumed = read_weights(path).consumed
    assert {k for k in consumed if "outside 'model'" not in k} == set(state)  # nothing silently ignored
    module = micro_module(plugin=AEMIM(), init_from=path)
    encoder = clean_state_dict(module.encoder.vit.state_dict())
    decoder, aux_decoder = module.decoder.state_dict(), module.aux_decoder.state_dict()
    for key, value in state.items():
        if key.startswith("decoder") or key == "mask_token":
            assert torch.equal(decoder[ours(key)], value), key
            assert torch.equal(aux_decoder[ours(key)], value), key  # the aux decoder starts as a copy
        else:
            assert torch.equal(encoder[key], value), key
    for key, value in module.encoder.vit.state_dict().items():  # the aux norms start as copies of the loaded ones
        if ".aux." in key:
            assert torch.equal(value, state[key.replace(".aux.", ".")]), key


def test_a_round_trip_through_the_reference_layout_keeps_the_mae_loss(tmp_path):
    L.seed_everything(0)
    module = micro_module()
    trainer(3).fit(module, loader())
    trained = module.state_dict()
    reference = encoder_state_dict(trained) | {
        theirs(k.removeprefix("decoder.")): v for k, v in trained.items() if k.startswith("decoder.")
    }
    loaded = micro_module(seed=1, init_from=save_reference(reference, tmp_path / "mae_full.pth"))
    x = next(iter(loader()))[0]

    def loss(m: PretrainModule) -> torch.Tensor:
        with torch.no_grad():
            return m.method.step(m.host(), x, torch.Generator().manual_seed(0)).loss

    assert torch.equal(loss(module.eval()), loss(loaded.eval()))
    assert not torch.equal(loss(micro_module(seed=1).eval()), loss(module))  # a fresh module differs


# ---- continuing pre-training --------------------------------------------------------------------------------------
class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def continued(init_from: str | None, folder: Path) -> tuple[float, list[float], Path]:
    """10 steps of MAE on the bundled sample from ``init_from`` (None: random); (first kNN, losses, checkpoint)."""
    L.seed_everything(0)
    method = MAE(decoder_dim=32, decoder_depth=1, decoder_heads=4)
    module = PretrainModule(method=method, **SAMPLE, batch_size=64, base_lr=1e-3, warmup_epochs=0, init_from=init_from)
    recorder = LossRecorder()
    t = trainer(-1, [KNNMonitor(bank_size=1000, query_size=500), recorder], max_epochs=1, limit_train_batches=10,
                limit_val_batches=1, default_root_dir=folder)  # fmt: skip
    t.fit(module, datamodule=bundled_sample())
    t.save_checkpoint(folder / "continued.ckpt")
    return float(t.callback_metrics["val/knn_top1"]), recorder.losses, folder / "continued.ckpt"


def test_a_continuation_from_an_exported_encoder_starts_at_its_quality(pretrained, tmp_path):
    exported = str(export_encoder(pretrained["mae"], tmp_path / "encoder.safetensors"))
    knn, losses, checkpoint = continued(exported, tmp_path / "continued")
    random_knn, _, _ = continued(None, tmp_path / "random")
    assert knn >= random_knn + 0.08, (knn, random_knn)  # measured: 0.646 vs 0.498
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # the fresh decoder learns on the loaded encoder
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["init_from"] == exported and saved["hyper_parameters"]["init_from"] is None
    assert PretrainModule.load_from_checkpoint(checkpoint).hparams.init_from is None  # never reads the source again


# ---- adaptations, the same in every stage -------------------------------------------------------------------------
def test_a_224_px_grid_is_resampled_as_timm_does_in_every_stage(tmp_path):
    source = micro_timm(img_size=56)  # patch 4: a 14 x 14 grid, as ViT-B/16 at 224 px
    torch.nn.init.normal_(source.pos_embed, std=0.02)  # learned, not sin-cos
    path = tmp_path / "vit_224_grid.pth"
    torch.save(source.state_dict(), path)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [8, 8], [14, 14], num_prefix_tokens=1)
    for module in (
        micro_module(init_from=str(path)),
        LinearProbeModule(10, **ENCODER, init_from=str(path)),
        FinetuneModule(10, **ENCODER, init_from=str(path)),
    ):
        torch.testing.assert_close(module.encoder.vit.pos_embed.detach(), expected, rtol=0, atol=0)
    assert not torch.allclose(expected[0], sincos_2d(64, (8, 8), 1))


def test_a_fixed_sincos_table_of_another_grid_is_regenerated(tmp_path):
    source = micro_timm(img_size=56)
    source.pos_embed.data.copy_(sincos_2d(64, (14, 14), 1).unsqueeze(0))
    path = tmp_path / "sincos.pth"
    torch.save(source.state_dict(), path)
    probe = LinearProbeModule(10, **ENCODER, init_from=str(path))
    torch.testing.assert_close(probe.encoder.vit.pos_embed.detach()[0], sincos_2d(64, (8, 8), 1))


def test_rgb_weights_on_grey_data_sum_the_patch_embedding_over_the_channels(tmp_path):
    source = micro_timm(in_chans=3)
    path = tmp_path / "rgb.pth"
    torch.save(source.state_dict(), path)
    module = micro_module(init_from=str(path))
    expected = source.patch_embed.proj.weight.detach().sum(dim=1, keepdim=True)
    torch.testing.assert_close(module.encoder.vit.patch_embed.proj.weight.detach(), expected)


def test_a_ddp_saved_state_dict_loads_with_its_module_prefix_stripped(tmp_path, caplog):
    state = reference_mae_state()
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-wrapped model's state_dict()
    assert set(read_weights(path).consumed) == {f"module.{k}" for k in state}  # every key of the file accounted for
    with caplog.at_level(logging.INFO):
        module = micro_module(init_from=str(path))
    assert "every key starts with 'module.' (saved from a DDP model): stripped" in caplog.text
    encoder, decoder = clean_state_dict(module.encoder.vit.state_dict()), module.decoder.state_dict()
    for key, value in state.items():
        loaded = decoder[ours(key)] if key.startswith("decoder") or key == "mask_token" else encoder[key]
        assert torch.equal(loaded, value), key


def test_rgb_weights_on_grey_data_keep_every_decoder_layer_but_the_pixel_head(tmp_path, caplog):
    state = reference_mae_state()
    g = torch.Generator().manual_seed(5)
    rgb = 4 * 4 * 3  # the pixel head of an RGB model: patch 4, three channels
    state |= {
        "decoder_pred.weight": torch.randn(rgb, DECODER["dim"], generator=g),
        "decoder_pred.bias": torch.zeros(rgb),
    }
    state["patch_embed.proj.weight"] = torch.randn(64, 3, 4, 4, generator=g)
    path = save_reference(state, tmp_path / "mae_rgb_full.pth")
    with caplog.at_level(logging.INFO):
        module = micro_module(seed=3, init_from=path)
    fresh = micro_module(seed=3).decoder.state_dict()
    decoder = module.decoder.state_dict()
    for key, value in decoder.items():
        if key.startswith("pred."):  # made for 48 outputs, this decoder predicts 16: it starts fresh
            assert torch.equal(value, fresh[key]) and value.shape[0] == 16, key
        else:
            assert torch.equal(value, state[theirs(key)]), key
            assert not torch.equal(value, fresh[key]) or key == "pos_embed", key  # the load changed it
    assert (
        "its decoder's output layer does not fit this one (another number of channels or patch size), so it starts "
        f"fresh: pred.weight ({rgb}, 32) vs (16, 32); pred.bias ({rgb},) vs (16,); the other {len(decoder) - 2} "
        "tensors are loaded" in caplog.text
    )
    assert "loaded the encoder, the decoder; a new run starts" in caplog.text
    expected = state["patch_embed.proj.weight"].sum(dim=1, keepdim=True)  # and the encoder's stem was adapted
    torch.testing.assert_close(module.encoder.vit.patch_embed.proj.weight.detach(), expected)


# ---- bad input ----------------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this object creates ``marker``: what a malicious pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "evil.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1)}, "payload": RunsCode(marker)}, path)
    refused = r"'.*evil.pth' holds getattr, which only full unpickling could load.*refused"
    with pytest.raises(UnsafeCheckpointError, match=refused) as err:
        read_weights(path)
    assert "\n" not in str(err.value) and not marker.exists()
    torch.load(path, weights_only=False)  # what full unpickling would have done
    assert marker.exists()


def test_a_decoder_of_another_width_stays_fresh_and_is_reported(tmp_path, caplog):
    path = save_reference(reference_mae_state(decoder_dim=16), tmp_path / "mae_full.pth")
    with caplog.at_level(logging.INFO):
        module = micro_module(seed=3, init_from=path)
    fresh = micro_module(seed=3).decoder.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in module.decoder.state_dict().items())
    assert "its decoder does not fit this one, so the decoder starts fresh: mask_token (1, 1, 16) vs (1, 1, 32)" in (
        caplog.text
    )
    assert "embed.weight (16, 64) vs (32, 64)" in caplog.text and caplog.text.count("starts fresh") == 1
    assert "facebookresearch/mae): loaded the encoder; a new run starts" in caplog.text  # not the decoder


def test_an_encoder_of_another_architecture_is_one_line(tmp_path, capsys):
    path = tmp_path / "deeper.pth"
    torch.save(timm.create_model("vit_base_patch16_224", num_classes=0, img_size=32, patch_size=4, in_chans=1,
                                 depth=3, embed_dim=64, num_heads=4).state_dict(), path)  # fmt: skip
    with pytest.raises(SystemExit, match=r"does not fit this encoder: not in the model: blocks\.2\.") as err:
        run(["fit", "-c", "quickstart.yaml", *MICRO_FLAGS, "--model.init_args.init_from", str(path)])
    assert "\n" not in str(err.value)


def test_init_from_and_ckpt_path_together_are_refused(tmp_path):
    path = save_reference(reference_mae_state(), tmp_path / "mae_full.pth")
    with pytest.raises(
        SystemExit, match=r"--ckpt_path .* resumes a run .*init_from .* starts a new one .*: give one of them"
    ):
        run(["fit", "-c", "quickstart.yaml", *MICRO_FLAGS, "--model.init_args.init_from", path, "--ckpt_path", path])


def test_a_timm_tag_without_network_says_to_pass_a_local_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no wait for a timeout
    with pytest.raises(ValueError, match=r"could not be fetched through timm's hub .* pass the local file") as err:
        read_weights("timm:vit_tiny_patch16_224.augreg_in21k")
    assert "\n" not in str(err.value)


def test_missing_and_truncated_files_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nowhere.pth' does not exist \(expected a \.ckpt"):
        read_weights("nowhere.pth")
    path = tmp_path / "truncated.pth"
    save_reference(reference_mae_state(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="is truncated or not a checkpoint") as err:
        read_weights(path)
    assert "\n" not in str(err.value)


def test_an_exported_folder_loads_through_init_from_as_the_checkpoint_does(pretrained, tmp_path):
    folder = export_folder(pretrained["mae"], tmp_path / "encoder")
    weights = read_weights(f"local-dir:{folder}")
    assert weights.method == "MAE" and weights.mean == SAMPLE["mean"] and weights.std == SAMPLE["std"]
    from_folder, from_checkpoint = (
        LinearProbeModule(10, **SAMPLE, init_from=s) for s in (str(folder), pretrained["mae"])
    )
    for key, value in from_checkpoint.encoder.vit.state_dict().items():
        assert torch.equal(from_folder.encoder.vit.state_dict()[key], value), key
