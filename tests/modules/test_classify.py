"""LinearProbeModule and FinetuneModule: init_from, the frozen probe, layer decay, Mixup, adversarial
fine-tuning, the CLI link of num_classes; on the Fashion-MNIST sample, the quickstart probe recipe against the
converged logistic regression, the per-method pooling, and pre-training against the random-encoder floor."""

import copy
import importlib
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.adversarial import AEMIM, AdversarialTargetCallback, Attacker
from advmim_pl.cli import AdvMIMCLI, resolve_config, resolve_config_args
from advmim_pl.eval.extract import evaluation_batches, extract
from advmim_pl.eval.probes import C_GRID, FeatureSet, knn_predict, logistic_probe
from advmim_pl.export import export_encoder
from advmim_pl.modules import FinetuneModule, LinearProbeModule, PretrainModule
from advmim_pl.schedule import warmup_cosine
from advmim_pl.weights import read_weights
from tests.helpers.micro import ENCODER, MICRO, MICRO_FLAGS, SAMPLE, bundled_sample, loader, micro_module, save, trainer
from tests.helpers.recording import RecordingAttacker

PLAIN = dict(randaugment=False, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)  # no augmentation
# patch average - cls token top-1 of the fixed micro SimMIM encoder (seed 0), measured: logistic regression 68.2 vs
# 68.0, kNN 54.0 vs 55.1
MEASURED_SIMMIM_MARGINS = {"logreg": 0.002, "knn": -0.011}


def labelled(n: int = 24, seed: int = 0, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def plugin_checkpoint(tmp_path_factory) -> tuple[str, PretrainModule]:
    """A PretrainModule trained 3 steps with the plug-in (aux norms present), saved by a Trainer."""
    path = tmp_path_factory.mktemp("pretrain") / "adv.ckpt"
    L.seed_everything(0)
    module = micro_module(plugin=AEMIM(attack=Attacker(eps=8 / 255)))
    t = trainer(3)
    t.fit(module, loader())
    t.save_checkpoint(path)
    return str(path), module.eval()


# ---- init_from ---------------------------------------------------------------------------------------
def test_plugin_checkpoint_and_export_load_with_equal_features(plugin_checkpoint, tmp_path):
    path, pretrained = plugin_checkpoint
    assert any(".aux." in k for k in torch.load(path, weights_only=False)["state_dict"])  # the plug-in's norms
    probe = LinearProbeModule(10, **ENCODER, init_from=path)
    assert set(read_weights(path).encoder) == set(probe.encoder.vit.state_dict())  # nothing missing/extra
    exported = LinearProbeModule(10, **ENCODER, init_from=str(export_encoder(path, tmp_path / "enc.safetensors")))
    # the reference MAE layout: {"model": timm keys + mask_token + decoder_*}
    reference = {
        **read_weights(path).encoder,
        "mask_token": torch.zeros(1, 1, 64),
        "decoder_pred.weight": torch.zeros(3),
    }
    torch.save({"model": reference}, tmp_path / "mae_reference.pth")
    plain = LinearProbeModule(10, **ENCODER, init_from=str(tmp_path / "mae_reference.pth"))
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = pretrained.encoder.forward_features(x)
        for module in (probe, exported, plain):
            assert torch.equal(module.encoder.forward_features(x), expected)
        random = LinearProbeModule(10, **ENCODER).encoder.forward_features(x)
    assert not torch.allclose(random, expected)


@pytest.mark.parametrize(
    "encoder_kwargs, listed",
    [
        (dict(depth=2, embed_dim=32, num_heads=4), "pos_embed: (1, 65, 32) vs (1, 65, 64)"),
        (dict(depth=3, embed_dim=64, num_heads=4), "not in the model: blocks.2."),
    ],
)
def test_another_architecture_is_refused_listing_keys_and_shapes(encoder_kwargs, listed, tmp_path):
    other = save(micro_module(encoder_kwargs=encoder_kwargs), tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="does not fit this encoder") as error:
        LinearProbeModule(10, **ENCODER, init_from=other)
    assert listed in str(error.value)
    assert f"encoder_kwargs={encoder_kwargs!r}" in str(error.value)  # what the checkpoint was made with
    if encoder_kwargs["embed_dim"] == 32:
        assert "blocks.0.attn.qkv.weight: (96, 32) vs (192, 64)" in str(error.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LinearProbeModule(10, **ENCODER, init_from=str(tmp_path / "nope.ckpt"))


def test_average_pooling_replaces_the_final_norm_by_a_fresh_fc_norm(plugin_checkpoint):
    path, pretrained = plugin_checkpoint
    module = FinetuneModule(10, **ENCODER, init_from=path)
    assert isinstance(module.encoder.vit.norm, torch.nn.Identity)
    assert torch.equal(module.encoder.vit.fc_norm.weight, torch.ones(64))
    state = read_weights(path).encoder
    for name, value in module.encoder.vit.state_dict().items():
        if not name.startswith("fc_norm."):
            assert torch.equal(value, state[name]), name


# ---- linear probe ------------------------------------------------------------------------------------
def test_the_probe_trains_only_the_head_and_keeps_the_encoder_bit_identical(plugin_checkpoint):
    path, _ = plugin_checkpoint
    dropout = {**ENCODER, "encoder_kwargs": {**MICRO["encoder_kwargs"], "drop_rate": 0.5}}  # eval mode matters
    probe = LinearProbeModule(10, **dropout, init_from=path, batch_size=8, warmup_epochs=0)
    encoder_before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in probe.head.state_dict().items()}
    modes = []

    class Modes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((any(m.training for m in pl_module.encoder.modules()), pl_module.head.training))

    t = trainer(4, [Modes()])
    t.fit(probe, labelled())
    assert modes == [(False, True)] * 4  # encoder in eval mode throughout, head in train mode
    for name, value in probe.encoder.state_dict().items():
        assert torch.equal(value, encoder_before[name]), name
    for name in ("1.weight", "1.bias", "0.running_mean", "0.running_var"):
        assert not torch.equal(probe.head.state_dict()[name], head_before[name]), name
    trainable = {n for n, p in probe.named_parameters() if p.requires_grad}
    assert trainable == {"head.1.weight", "head.1.bias"}
    groups = t.optimizers[0].param_groups
    assert type(t.optimizers[0]).__name__ == "Lars"
    assert [(g["weight_decay"], g["always_adapt"]) for g in groups] == [(0.0, True), (0.0, False)]
    assert [p.ndim for g in groups for p in g["params"]] == [2, 1]  # LARS adapts the weight matrix only


# ---- fine-tuning -------------------------------------------------------------------------------------
def mae_layer_id(name: str, depth: int) -> int:
    """MAE's get_layer_id_for_vit on a FinetuneModule parameter name: embeddings 0, block i -> i + 1, rest depth + 1."""
    name = name.removeprefix("encoder.vit.")
    if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_scales_and_the_lr_the_optimizer_uses():
    depth, decay, base_lr, min_lr = 2, 0.5, 1e-3, 1e-6
    module = FinetuneModule(10, **ENCODER, batch_size=8, layer_decay=decay, base_lr=base_lr, min_lr=min_lr, **PLAIN)
    module.hparams.warmup_epochs = 1  # 3 batches per epoch: warm-up 3 steps, cosine to step 6
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    t = trainer(6, [Record()], max_epochs=2)
    t.fit(module, labelled())
    groups = t.optimizers[0].param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    num_layers = depth + 1
    seen = []
    for group in groups:
        ids = {mae_layer_id(names[id(p)], depth) for p in group["params"]}
        assert len(ids) == 1, [names[id(p)] for p in group["params"]]
        assert group["lr_scale"] == pytest.approx(decay ** (num_layers - ids.pop()))
        for p in group["params"]:
            no_decay = p.ndim <= 1 or names[id(p)].endswith(("cls_token", "pos_embed"))
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
        seen += [names[id(p)] for p in group["params"]]
    assert sorted(seen) == sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert {"encoder.vit.pos_embed", "encoder.mask_token"}.isdisjoint(seen)  # fixed sin-cos, unused
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx([0.125, 0.25, 0.5, 1.0])
    peak = base_lr * 8 / 256
    for step, step_lrs in enumerate(lrs):
        factor = warmup_cosine(step, 3, 6, min_lr / peak)
        assert step_lrs == pytest.approx([peak * g["lr_scale"] * factor for g in groups]), step


def test_mixup_gives_soft_targets_and_a_finite_loss():
    torch.manual_seed(0)
    module = FinetuneModule(10, **ENCODER, batch_size=8, random_erasing=0.0)  # RandAugment, Mixup/CutMix, smoothing
    x, y = next(iter(labelled()))
    mixed, target = module.augment(x.clone(), y)
    assert target.shape == (8, 10)
    torch.testing.assert_close(target.sum(dim=1), torch.ones(8))
    smoothed = F.one_hot(y, 10).float() * 0.9 + 0.01
    assert not torch.allclose(target, smoothed)  # mixed with the flipped batch
    assert (target > 0.05).sum(dim=1).min() >= 2
    assert mixed.shape == x.shape and not torch.equal(mixed, x) and 0 <= mixed.min() and mixed.max() <= 1
    loss = module.losses(mixed, target)["loss"]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, -(target * F.log_softmax(module.logits(mixed), -1)).sum(-1).mean())
    # without mixing: hard labels and label-smoothed cross-entropy
    plain = FinetuneModule(10, **ENCODER, **PLAIN)
    same, labels = plain.augment(x, y)
    assert torch.equal(same, x) and torch.equal(labels, y)
    logits = plain.logits(x)
    torch.testing.assert_close(plain.criterion(logits, y), F.cross_entropy(logits, y, label_smoothing=0.1))
    t = trainer(2)
    t.fit(module, labelled())
    assert torch.isfinite(t.callback_metrics["train/loss"])


def test_random_erasing_fills_one_rectangle_per_image_with_normalised_noise():
    torch.manual_seed(0)
    module = FinetuneModule(10, **ENCODER, **{**PLAIN, "random_erasing": 1.0})  # always erase
    x = torch.full((16, 1, 32, 32), 0.5)
    erased, labels = module.augment(x, torch.arange(16) % 10)
    assert torch.equal(labels, torch.arange(16) % 10)
    changed = (erased - x).abs() > 1e-6
    for image, where in zip(erased, changed[:, 0], strict=True):
        rows, cols = where.any(dim=1).nonzero().flatten(), where.any(dim=0).nonzero().flatten()
        box = where[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.float().mean() > 0.95  # one filled rectangle (a noise value may land on 0.5 by chance) ...
        assert 0.02 <= box.numel() / where.numel() <= 1 / 3 + 0.02  # ... of timm's default area range
        noise = (image[0][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] - MICRO["mean"][0]) / MICRO["std"][
            0
        ]
        assert abs(noise.mean()) < 0.5 and 0.6 < noise.std() < 1.4  # N(0, 1) in the normalised space
    assert torch.equal(module.augment(x, labels)[0].ne(x).flatten(1).any(1), torch.ones(16, dtype=torch.bool))
    untouched = FinetuneModule(10, **ENCODER, **PLAIN).augment(x, labels)[0]
    assert torch.equal(untouched, x)


def test_adversarial_finetuning_crafts_within_eps_and_trains():
    L.seed_everything(0)
    attack = RecordingAttacker(eps=8 / 255, steps=2)
    module = FinetuneModule(10, **ENCODER, batch_size=8, attack=attack)
    t = trainer(3)
    t.fit(module, labelled())
    assert len(attack.crafted) == 3
    for x, x_adv, _, _ in attack.calls:
        delta = (x_adv - x).abs().max()
        assert 0 < delta <= 8 / 255 + 1e-6
        assert 0 <= x_adv.min() and x_adv.max() <= 1
    # objective(x) is logged at the module's (train-mode) state, so compare the mean, as the attack maximises it
    assert sum(adv.mean() for *_, adv in attack.calls) > sum(clean.mean() for *_, clean, _ in attack.calls)
    assert all(torch.isfinite(t.callback_metrics[k]) for k in ("train/loss_clean", "train/loss_adv"))


def test_aux_norms_get_gradient_only_from_the_adversarial_loss():
    torch.manual_seed(0)
    module = FinetuneModule(10, **ENCODER, attack=Attacker(eps=8 / 255), branch_params="norm", **PLAIN)
    x, y = next(iter(labelled()))
    out = module.losses(x, y)
    aux = [p for n, p in module.named_parameters() if ".aux." in n]
    clean = [p for n, p in module.named_parameters() if ".clean." in n]
    assert len(aux) == len(clean) == 2 * (2 * 2 + 1)  # weight, bias of norm1, norm2 per block and fc_norm
    assert all(g is None for g in torch.autograd.grad(out["clean"], aux, allow_unused=True, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(out["adv"], clean, allow_unused=True, retain_graph=True))
    adv_grads = torch.autograd.grad(out["adv"], aux, allow_unused=True, retain_graph=True)
    assert all(g is not None for g in adv_grads) and any(g.abs().sum() > 0 for g in adv_grads)
    torch.testing.assert_close(out["loss"], out["clean"] + out["adv"])


def test_the_attack_is_on_the_trainer_and_in_the_checkpoint(tmp_path):
    module = FinetuneModule(10, **ENCODER, attack=Attacker(eps=8 / 255, steps=2, seed=3), **PLAIN)
    t = trainer(1)
    t.fit(module, labelled())
    attacks = [c for c in t.callbacks if isinstance(c, AdversarialTargetCallback)]
    assert attacks == [module.attack_callback] and attacks[0].attacker is module.attack
    t.save_checkpoint(tmp_path / "adv.ckpt")
    loaded = FinetuneModule.load_from_checkpoint(tmp_path / "adv.ckpt")
    assert type(loaded.attack) is Attacker and loaded.attack.settings() == module.attack.settings()
    assert torch.load(tmp_path / "adv.ckpt", weights_only=True)["callbacks"]["AdversarialTargetCallback"]["rng"].numel()
    t = trainer(1)
    t.fit(FinetuneModule(10, **ENCODER, **PLAIN), labelled())
    assert not any(isinstance(c, AdversarialTargetCallback) for c in t.callbacks)  # clean fine-tuning has none


# ---- the CLI -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["quickstart_probe.yaml", "quickstart_finetune.yaml"])
def test_num_classes_flows_from_the_data_through_the_cli(config, plugin_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, _ = plugin_checkpoint
    args = ["-c", config, "--model.init_args.init_from", path, *MICRO_FLAGS, "--data.init_args.num_workers", "0"]
    with pytest.warns(UserWarning, match="pre-trained with pixel mean"):  # micro checkpoint: other statistics
        cli = AdvMIMCLI(args=resolve_config_args(args), run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10
    assert cli.model.metrics["val_acc5"].num_classes == 10
    assert cli.model.hparams.init_from == path
    # PretrainModule has no num_classes: the link is skipped, and nothing of it lands in the saved hyperparameters
    # (a stray key there would make `--ckpt_path` re-instantiation fail with an unexpected keyword argument)
    pretrain = AdvMIMCLI(args=resolve_config_args(["-c", "quickstart.yaml"]), run=False)
    assert "num_classes" not in pretrain.model.hparams and "num_classes" not in pretrain.model.hparams_initial


# ---- a real signal -----------------------------------------------------------------------------------
def cached_features(probe: LinearProbeModule) -> tuple[FeatureSet, FeatureSet]:
    """The probe's own features (its encoder and pooling) of the bundled sample's training and test images, with
    the evaluation transform: cached once, as ``advmim_pl.eval.extract`` does."""
    data = bundled_sample()
    data.setup("test")
    transform = data.eval_transform()
    with torch.no_grad():
        return tuple(
            extract(lambda x: {"f": probe.features(x)}, evaluation_batches(split, transform, 500), torch.device("cpu"))
            for split in (data.train_set, data.test_set)
        )


def converged_accuracy(train: FeatureSet, test: FeatureSet) -> float:
    probe = logistic_probe(train.features["f"], train.labels, 10, C_GRID)
    return float((probe.logits(test.features["f"]).argmax(1) == test.labels).float().mean())


@pytest.fixture(scope="module")
def mae_features(pretrained) -> tuple[FeatureSet, FeatureSet, float]:
    """The pre-trained micro MAE's cls-token features of the bundled sample (training, test) and the converged
    logistic regression's test accuracy on them, computed once for the tests that read them."""
    train, test = cached_features(LinearProbeModule(10, **SAMPLE, init_from=pretrained["mae"]))
    return train, test, converged_accuracy(train, test)


def test_the_quickstart_probe_recipe_ends_within_a_point_of_the_converged_logistic_regression(pretrained, mae_features):
    config = yaml.safe_load(Path(resolve_config("quickstart_probe.yaml")).read_text())
    args, optimizer = config["model"]["init_args"], config["model"]["init_args"]["optimizer"]
    optimizer_class = getattr(importlib.import_module(optimizer["class_path"].rpartition(".")[0]),
                              optimizer["class_path"].rpartition(".")[2])  # fmt: skip
    recipe = {k: args[k] for k in ("base_lr", "lr_reference_batch", "weight_decay", "warmup_epochs", "min_lr")}
    L.seed_everything(0)
    probe = LinearProbeModule(
        10, **SAMPLE, init_from=pretrained["mae"], batch_size=64, **recipe,
        head_norm=args["head_norm"], bias_lr_scale=args["bias_lr_scale"],
        optimizer=lambda params: optimizer_class(params, **optimizer["init_args"]),
    )  # fmt: skip
    train, test, converged = mae_features  # the probe's own features: the same encoder and cls token
    probe.features = lambda x: x  # the recipe (head, optimizer, schedule) on the cached features
    with torch.no_grad():
        untrained = F.cross_entropy(copy.deepcopy(probe.head).eval()(train.features["f"]), train.labels).item()
    loader = DataLoader(TensorDataset(train.features["f"], train.labels), batch_size=64, shuffle=True, drop_last=True)
    t = trainer(-1, max_epochs=config["trainer"]["max_epochs"], limit_val_batches=0)  # 620 steps, as the recipe
    t.fit(probe, loader)
    probe.eval()
    with torch.no_grad():
        trained = F.cross_entropy(probe.head(train.features["f"]), train.labels).item()
        accuracy = float((probe.head(test.features["f"]).argmax(1) == test.labels).float().mean())
    assert abs(accuracy - converged) <= 0.01, (accuracy, converged)  # measured: 0.778 vs 0.781
    assert trained < 0.5 * untrained, (trained, untrained)  # ln 10 = 2.30 untrained
    assert probe.head[1].bias.abs().max() < 5  # the old LARS recipe's bias ran away to |b| ~ 95


def test_the_lars_bias_takes_its_own_lr_scale():
    probe = LinearProbeModule(10, **ENCODER, batch_size=8, warmup_epochs=0, bias_lr_scale=0.001)
    t = trainer(1)
    t.fit(probe, labelled())
    weight, bias = t.optimizers[0].param_groups
    assert bias["lr"] == pytest.approx(0.001 * weight["lr"]) and not bias["always_adapt"] and weight["always_adapt"]


def test_simmim_encoders_default_to_the_patch_average_and_a_token_probe_names_the_fix(pretrained):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token = LinearProbeModule(10, **SAMPLE, init_from=pretrained["simmim"], global_pool="token")
    assert any("Set model.init_args.global_pool: avg" in str(w.message) for w in caught)  # names the fix
    default = LinearProbeModule(10, **SAMPLE, init_from=pretrained["simmim"])
    assert default.hparams.global_pool == "avg" and FinetuneModule(10, **ENCODER).hparams.global_pool == "avg"
    assert LinearProbeModule(10, **SAMPLE, init_from=pretrained["mae"]).hparams.global_pool == "token"
    # the margin of the patch average over the cls token, seed 0, 400 SimMIM steps on 4,000 images; at this scale
    # it is within noise (the 95% interval of a 1,000-image accuracy is +-2.8 points), so it is pinned, not claimed
    scores = {}
    for pooling, probe in (("avg", default), ("token", token)):
        train, test = cached_features(probe)
        knn = knn_predict(train.features["f"], train.labels, test.features["f"], 10)
        scores[pooling] = {"logreg": converged_accuracy(train, test), "knn": float((knn == test.labels).float().mean())}
    margins = {probe: scores["avg"][probe] - scores["token"][probe] for probe in ("logreg", "knn")}
    assert margins == pytest.approx(MEASURED_SIMMIM_MARGINS, abs=0.01), margins


def test_mae_pretraining_beats_the_random_encoder_floor(mae_features):
    """Under the converged probes on the MAE's cls token; the random floor is the same architecture at seed 0."""
    torch.manual_seed(0)
    random = cached_features(LinearProbeModule(10, **SAMPLE, global_pool="token"))
    results = {}
    for name, (train, test, converged) in (("mae", mae_features), ("random", (*random, converged_accuracy(*random)))):
        knn = knn_predict(train.features["f"], train.labels, test.features["f"], 10)
        results[name] = (float((knn == test.labels).float().mean()), converged)
    assert results["mae"][0] >= results["random"][0] + 0.04, results  # kNN, measured: 0.683 vs 0.600
    assert results["mae"][1] >= results["random"][1], results  # logistic regression, measured: 0.781 vs 0.757
