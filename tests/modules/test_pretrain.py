"""PretrainModule with and without the AEMIM plug-in, through a real Lightning Trainer."""

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.adversarial import AEMIM, AdversarialTargetCallback, Attacker
from advmim_pl.cli import run
from advmim_pl.export import export_encoder, load_exported
from advmim_pl.mim import SimMIM
from advmim_pl.models.branch_norm import branch, clean_state_dict
from advmim_pl.modules import PretrainModule
from advmim_pl.schedule import warmup_cosine, weight_decay_groups
from advmim_pl.weights import encoder_state_dict
from tests.helpers.micro import MICRO_VIT, MICRO_VIT_FLAG, loader, micro_module, trainer
from tests.helpers.recording import recording_plugin


def fit_from_seed(module: PretrainModule, steps: int) -> PretrainModule:
    """Seed the global RNG (masks) after construction, so models with extra parameters see the same masks."""
    L.seed_everything(0)
    trainer(steps).fit(module, loader())
    return module


def test_lambda_zero_gives_the_baseline_update():
    base = fit_from_seed(micro_module(), 4)
    plug = fit_from_seed(micro_module(plugin=AEMIM(attack=Attacker(eps=8 / 255, steps=2), aux_weight=0.0)), 4)
    plug_encoder = clean_state_dict(plug.encoder.state_dict())
    for name, value in base.encoder.state_dict().items():
        torch.testing.assert_close(plug_encoder[name], value, msg=name)
    for name, value in base.decoder.state_dict().items():
        torch.testing.assert_close(plug.decoder.state_dict()[name], value, msg=name)
    # and the plug-in with lambda > 0 does change the update
    plug = fit_from_seed(micro_module(plugin=AEMIM(attack=Attacker(eps=8 / 255, steps=2))), 4)
    blocks = "vit.blocks.0.attn.qkv.weight"
    assert not torch.allclose(plug.encoder.state_dict()[blocks], base.encoder.state_dict()[blocks])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_mixed_precision_has_no_nan(dtype, method):
    # Lightning maps '16-mixed' on CPU to bf16, so fp16 autocast (with a CPU GradScaler) is requested directly
    name = "bf16-mixed" if dtype == torch.bfloat16 else "16-mixed"
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    L.seed_everything(0)
    module = micro_module(method, plugin=recording_plugin(dict(steps=2)))
    attack = module.plugin.attack
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())

    t = trainer(6, [Record()], precision=None, plugins=[MixedPrecision(name, "cpu", scaler)])
    t.fit(module, loader())
    assert attack.autocast == [dtype] * 6  # the attack ran under the trainer's precision
    assert len(losses) == 6 and all(torch.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_resume_continues_the_attack_rng(tmp_path):
    # mid-grey images and uniform noise: x_a depends on the attacker's RNG stream only
    grey = DataLoader(TensorDataset(torch.full((24, 1, 32, 32), 0.5), torch.zeros(24, dtype=torch.long)), batch_size=8)
    settings = dict(perturbation="uniform", eps=8 / 255)
    straight = micro_module(plugin=recording_plugin(settings))
    trainer(6).fit(straight, grey)

    first = micro_module(plugin=recording_plugin(settings))
    t = trainer(3)
    t.fit(first, grey)
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = micro_module(plugin=recording_plugin(settings), seed=1)
    trainer(6).fit(resumed, grey, ckpt_path=tmp_path / "half.ckpt")
    straight, first, resumed = (m.plugin.attack for m in (straight, first, resumed))

    assert len(resumed.crafted) == 3
    for a, b in zip(straight.crafted, first.crafted + resumed.crafted, strict=True):
        assert torch.equal(a, b)
    # a fresh attacker (no restore) would have drawn different noise
    assert not torch.equal(straight.crafted[3], first.crafted[0])


def test_the_plugin_puts_its_own_attack_on_the_trainer():
    module = micro_module(plugin=AEMIM(attack=Attacker(steps=1)))
    t = trainer(1)
    t.fit(module, loader())
    attacks = [c for c in t.callbacks if isinstance(c, AdversarialTargetCallback)]
    assert attacks == [module.attack_callback] and attacks[0].attacker is module.plugin.attack
    assert module.plugin.attack.generator is not None  # the attack ran, with the module's own attacker
    t = trainer(1)
    t.fit(micro_module(), loader())
    assert not any(isinstance(c, AdversarialTargetCallback) for c in t.callbacks)  # the baseline has none


def test_nonfinite_attack_gradient_falls_back_and_never_reaches_weights():
    L.seed_everything(0)
    module = micro_module(plugin=recording_plugin(dict(steps=1)))
    objective = module.plugin.objective

    def poisoned(*args, **kwargs):
        clean = objective(*args, **kwargs)
        return lambda x_adv: clean(x_adv) * torch.tensor(float("nan"))

    module.plugin.objective = poisoned
    attack = module.plugin.attack
    with pytest.warns(UserWarning, match="non-finite attack gradient"):
        trainer(3).fit(module, loader())
    assert attack.nonfinite_batches == 3
    assert all(
        torch.equal(x_adv, x) for x_adv, x in zip(attack.crafted, loader().dataset.tensors[0].split(8), strict=True)
    )
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_export_keeps_only_the_clean_branch(tmp_path):
    L.seed_everything(0)
    module = micro_module(plugin=AEMIM(attack=Attacker(steps=1)))
    t = trainer(5)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "adv.ckpt")
    path = export_encoder(tmp_path / "adv.ckpt", tmp_path / "encoder.safetensors")

    model = load_exported(path).eval()
    plain = timm.create_model("vit_base_patch16_224", num_classes=0, img_size=32, patch_size=4, in_chans=1, **MICRO_VIT)
    plain.load_state_dict(encoder_state_dict(module.state_dict()), strict=True)
    x = torch.rand(4, 1, 32, 32)
    module.eval()
    with torch.no_grad():
        exported = model.forward_features(module.encoder.normalize(x))
        clean = module.encoder.forward_features(x)
        with branch(module.encoder, "aux"):
            aux = module.encoder.forward_features(x)
    torch.testing.assert_close(exported, clean)
    assert not torch.allclose(exported, aux, atol=1e-4)  # the aux norms were trained apart


def test_load_from_checkpoint_rebuilds_the_method_and_the_weights(tmp_path, monkeypatch):
    module = micro_module("simmim", plugin=AEMIM(attack=Attacker(steps=1)))
    t = trainer(2)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "plain.ckpt")
    monkeypatch.chdir(tmp_path)  # the same through the CLI, whose checkpoints name an instantiator
    micro = ["--model.init_args.encoder_kwargs", MICRO_VIT_FLAG]
    cli = run(["fit", "-c", "quickstart_simmim_adv.yaml", *micro, "--trainer.max_steps", "2",
               "--trainer.limit_val_batches", "1", "--data.init_args.num_workers", "0"])  # fmt: skip
    for trained, path in (
        (module, tmp_path / "plain.ckpt"),
        (cli.model, cli.trainer.checkpoint_callback.last_model_path),
    ):
        loaded = PretrainModule.load_from_checkpoint(path)
        assert type(loaded.method) is SimMIM and loaded.method.config() == trained.method.config()
        assert loaded.method.mask_patch_size == 8
        assert type(loaded.plugin) is AEMIM and loaded.plugin.config() == trained.plugin.config()
        for key, value in trained.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


def test_lr_is_scaled_by_total_batch_and_follows_warmup_cosine():
    module = micro_module(base_lr=1.5e-4, lr_reference_batch=256, warmup_epochs=1, weight_decay=0.05)
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    # 4 batches of 8 per epoch, accumulation 2: 2 optimizer steps per epoch, warm-up 2, the cosine ends at max_steps 6
    trainer(6, [Record()], accumulate_grad_batches=2, max_epochs=4).fit(module, loader(n=32))
    peak = 1.5e-4 * 8 * 2 / 256
    assert lrs == pytest.approx([peak * warmup_cosine(batch // 2, 2, 6) for batch in range(12)])
    groups = module.trainer.optimizers[0].param_groups
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups[1]["params"]}
    named = dict(module.named_parameters())
    for name in (
        "encoder.vit.cls_token",
        "encoder.vit.blocks.0.norm1.weight",
        "encoder.vit.blocks.0.attn.qkv.bias",
        "decoder.mask_token",
    ):
        assert id(named[name]) in no_decay, name
    assert id(named["encoder.vit.pos_embed"]) not in no_decay | {id(p) for p in groups[0]["params"]}  # frozen
    assert "encoder.mask_token" not in named  # MAE has no use for SimMIM's token, so DDP finds no unused parameter
    simmim = micro_module("simmim")
    assert simmim.encoder.mask_token is not None
    assert any(p is simmim.encoder.mask_token for p in weight_decay_groups(simmim, 0.05)[1]["params"])


@pytest.mark.parametrize("method", ["mae", "simmim", "data2vec2"])
@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_weight_decay_groups_split_the_names_as_the_hand_written_rule_did(method, weight_decay):
    """timm's param_groups_weight_decay with the name patterns gives the groups of the rule this project wrote by
    hand before: no decay for 1-d parameters and for names ending in a position or token name; frozen ones (a
    fixed sin-cos table, an EMA teacher) in neither group."""
    module = micro_module(method, plugin=AEMIM())
    names = {id(p): n for n, p in module.named_parameters()}
    tokens = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    want_no_decay = sorted(n for n, p in trainable if p.ndim <= 1 or n.split(".")[-1] in tokens)
    want_decay = sorted(n for n, p in trainable if n not in want_no_decay)
    decay, no_decay = weight_decay_groups(module, weight_decay)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (weight_decay, 0.0)
    assert sorted(names[id(p)] for p in decay["params"]) == want_decay
    assert sorted(names[id(p)] for p in no_decay["params"]) == want_no_decay
    assert want_decay and any(n.split(".")[-1] in tokens for n in want_no_decay)  # work for the patterns too


def test_validation_batches_get_adversarial_targets_when_asked():
    module = micro_module(plugin=recording_plugin(dict(eps=8 / 255), on_validation=True))
    attack = module.plugin.attack
    t = trainer(3, inference_mode=False, limit_val_batches=2, val_check_interval=3, num_sanity_val_steps=0)
    t.fit(module, loader(), loader(n=16, seed=1))
    assert len(attack.crafted) == 3 + 2  # three training batches, two validation batches
    assert 0 < t.callback_metrics["val/delta_linf"] <= 8 / 255 + 1e-6
    assert torch.isfinite(t.callback_metrics["val/loss_aux"])
    with pytest.raises(RuntimeError, match="inference_mode: false"):  # trainer.validate runs under inference mode
        trainer(1).validate(module, loader(n=16))
