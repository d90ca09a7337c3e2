"""The host contract, host by host: every ``MIMMethod`` (found by ``advmim_pl.mim.hosts()``, so a new host is covered
without an edit here) runs the plug-in, resumes exactly, exports its clean encoder and starts a new run from its own
checkpoint (``init_from``).

``EMATeacher``, a toy fifth host defined only here, uses the hooks the shipped hosts leave at their defaults: a module
it owns (an EMA teacher of the encoder), a hook after every optimizer step (the EMA update, with its schedule), state of
its own in checkpoints (its update count), targets that need its module, and attack features of its own. It is
discovered like any host.
"""

import copy
import inspect

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from advmim_pl.adversarial import AEMIM, Attacker, StepContext
from advmim_pl.data import SyntheticDataModule
from advmim_pl.export import export_encoder, load_exported
from advmim_pl.mim import Host, Mask, MIMMethod, Perturbed, Progress, hosts
from advmim_pl.mim.losses import mae_loss
from advmim_pl.mim.masking import random_masking
from advmim_pl.mim.methods import paste
from advmim_pl.models.branch_norm import branch, clean_named_parameters, clean_state_dict
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules import PretrainModule
from advmim_pl.weights import encoder_state_dict
from tests.helpers.micro import MICRO, MICRO_VIT, loader, smooth_images, trainer


class TokenHead(nn.Module):
    """Patch-token features (B, P + N, D) -> per-patch predictions (B, N, D)."""

    def __init__(self, dim: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Linear(dim, dim)

    def forward(self, latent: Tensor) -> Tensor:
        return self.proj(latent[:, self.num_prefix_tokens :])


class EMATeacher(MIMMethod):
    """Toy host: per-patch random masks and mask-token encoding; a linear head predicts, at each masked patch, the
    layer-normalised final features of the unmasked image under an EMA teacher of the encoder; MSE on the masked
    patches. The teacher starts as a copy of the encoder (as loaded) and after every optimizer step moves toward the
    encoder's clean parameters, ``teacher = d * teacher + (1 - d) * student``, d rising linearly from ``decay`` to 1
    over the run. The attack compares patch tokens only."""

    uses_mask_token = True
    pooling = "avg"

    def __init__(self, mask_ratio: float = 0.5, decay: float = 0.9) -> None:
        self.mask_ratio, self.decay = mask_ratio, decay
        self.updates = 0  # checkpoint state of its own

    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        return TokenHead(encoder.embed_dim, encoder.num_prefix_tokens)

    def make_modules(self, encoder: MaskedViT) -> dict[str, nn.Module]:
        return {"teacher": copy.deepcopy(encoder).requires_grad_(False)}

    def sample_mask(self, encoder, batch, device, generator=None) -> Mask:
        return Mask(random_masking(batch, encoder.num_patches, self.mask_ratio, device, generator)[1])

    def full_view(self, encoder, batch, device) -> Mask:
        return Mask(torch.zeros(batch, encoder.num_patches, device=device))

    def complement(self, encoder, mask: Mask) -> Mask:
        return Mask(1 - mask.patches)

    def encode(self, encoder, images: Tensor, mask: Mask) -> Tensor:
        return encoder.forward_masked(images, mask.patches)

    def decode(self, decoder, latent: Tensor, mask: Mask) -> Tensor:
        return decoder(latent)

    def attack_features(self, host: Host, images: Tensor, view: Mask) -> Tensor:
        return self.encode(host.encoder, images, view)[:, host.encoder.num_prefix_tokens :]

    def targets(self, host: Host, images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        teacher = host.modules["teacher"]
        with torch.no_grad():
            tokens = teacher.forward_features(images)[:, teacher.num_prefix_tokens :].float()
        return F.layer_norm(tokens, tokens.shape[-1:])

    def loss(self, pred: Tensor, targets: Tensor, mask: Mask, encoder) -> Tensor:
        return mae_loss(pred, targets, mask.patches, norm_pix=False)

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder) -> Tensor:
        return paste(images, torch.zeros_like(images), mask, encoder)

    def decay_at(self, progress: Progress) -> float:
        return self.decay + (1 - self.decay) * progress.step / max(progress.total_steps, 1)

    def after_optimizer_step(self, host: Host, progress: Progress) -> None:
        teacher = dict(host.modules["teacher"].named_parameters())
        with torch.no_grad():
            for name, student in clean_named_parameters(host.encoder):
                teacher[name].lerp_(student.detach(), 1 - self.decay_at(progress))
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]


HOSTS = hosts()  # after EMATeacher: the shipped hosts, a host added to advmim_pl.mim, and the toy
# constructor arguments that size a host for the micro ViT (2 blocks, 64 wide, 32-px grey images, 4-px patches), set
# when a host takes them; a new host whose defaults do not fit names its small values here
SMALL = {
    "decoder_dim": 32,
    "decoder_depth": 1,
    "decoder_heads": 4,
    "mask_patch_size": 8,
    "cell_size": 2,
    "top_k": 2,
    "num_masks": 2,
}
EPS = 8 / 255


def micro_method(cls: type[MIMMethod]) -> MIMMethod:
    """``cls`` with its defaults, but for the ``SMALL`` arguments it takes."""
    taken = inspect.signature(cls.__init__).parameters
    return cls(**{name: value for name, value in SMALL.items() if name in taken})


def micro_module(cls: type[MIMMethod], plugin: bool = True, seed: int = 0, **options) -> PretrainModule:
    torch.manual_seed(seed)
    aemim = AEMIM(Attacker(eps=EPS)) if plugin else None
    return PretrainModule(method=micro_method(cls), plugin=aemim, **{**MICRO, **options})


def test_the_toy_host_is_found_like_any_host():
    assert {"MAE", "SimMIM", "MaskFeat", "EMATeacher"} <= {cls.__name__ for cls in HOSTS}


@pytest.mark.parametrize("cls", HOSTS, ids=lambda cls: cls.__name__)
def test_the_plugin_reconstructs_the_hosts_targets_of_the_adversarial_example(cls):
    """One plug-in step through the context: x_a within eps, and L_aux the host's own loss of its targets of x_a (told
    that x_a perturbs x by eps) from the auxiliary branch's prediction, written out here from the host's hooks."""
    module = micro_module(cls).train()
    step = module.host_step(smooth_images(8, seed=0), torch.Generator().manual_seed(0))
    x, mask = step.images, step.mask
    out = module.plugin.step(StepContext(module.host(aux=True), x, mask, step.latent, visuals=True))
    x_a, loss_aux = out.images["adversarial"], out.logs["train/loss_aux"]
    assert 0 < (x_a - x).abs().max() <= EPS + 1e-6 and 0 <= x_a.min() and x_a.max() <= 1
    host = module.host(aux=True)
    with branch(module.encoder, "aux"):
        pred = host.decode(host.encode(x_a, mask), mask)
    torch.testing.assert_close(loss_aux, host.loss(pred, host.targets(x_a, Perturbed(x, EPS)), mask))
    assert torch.equal(out.loss, loss_aux)  # aux_weight 1, no warm-up
    loss_aux.backward()  # the auxiliary branch trains its own norms, and not the clean ones
    aux_norms = [p.grad for name, p in module.encoder.named_parameters() if ".aux." in name]
    clean_norms = [p.grad for name, p in module.encoder.named_parameters() if ".clean." in name]
    assert aux_norms and all(g is not None and g.abs().sum() > 0 for g in aux_norms)
    assert all(g is None or not g.any() for g in clean_norms)


def fit(cls: type[MIMMethod], root, steps: int = 6, ckpt_path=None, seed: int = 0) -> PretrainModule:
    """``cls`` with the plug-in on 24 synthetic images, 3 batches of 8 per epoch, a checkpoint after every step."""
    L.seed_everything(0, verbose=False)
    data = SyntheticDataModule(
        num_samples=24, num_val_samples=8, batch_size=8, img_size=32, channels=1, num_workers=0, pin_memory=False
    )
    checkpoints = ModelCheckpoint(root, "{step}", every_n_train_steps=1, save_top_k=-1)
    run = trainer(steps, [checkpoints], enable_checkpointing=True, limit_val_batches=0, default_root_dir=root)
    module = micro_module(cls, seed=seed)
    run.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore:The dirpath has changed",  # the resumed run writes its checkpoints into a folder of its own
    "ignore:You're resuming from a checkpoint that ended",  # the data module resumes mid-epoch
)
@pytest.mark.parametrize("cls", HOSTS, ids=lambda cls: cls.__name__)
def test_a_resumed_plugin_run_ends_where_the_uninterrupted_one_does(cls, tmp_path):
    straight = fit(cls, tmp_path / "straight")
    resumed = fit(cls, tmp_path / "resumed", ckpt_path=tmp_path / "straight" / "step=2.ckpt", seed=1)
    for name, value in straight.state_dict().items():  # the host's own modules included
        assert torch.equal(resumed.state_dict()[name], value), name
    assert resumed.method.state_dict() == straight.method.state_dict()
    assert resumed.plugin.attack.generator.get_state().equal(straight.plugin.attack.generator.get_state())
    loaded = PretrainModule.load_from_checkpoint(tmp_path / "straight" / "step=6.ckpt")
    assert type(loaded.method) is cls and loaded.method.config() == straight.method.config()
    assert loaded.plugin.config() == straight.plugin.config()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per host: a module trained 3 steps with the plug-in and its checkpoint."""
    cache = {}

    def get(cls: type[MIMMethod]) -> tuple[PretrainModule, str]:
        if cls not in cache:
            L.seed_everything(0, verbose=False)
            module = micro_module(cls)
            run = trainer(3)
            run.fit(module, loader())
            path = tmp_path_factory.mktemp(cls.__name__) / "last.ckpt"
            run.save_checkpoint(path)
            cache[cls] = module.eval(), str(path)
        return cache[cls]

    return get


@pytest.mark.parametrize("cls", HOSTS, ids=lambda cls: cls.__name__)
def test_export_gives_the_clean_encoder_and_nothing_else(cls, trained, tmp_path):
    module, path = trained(cls)
    exported = load_exported(export_encoder(path, tmp_path / "encoder.safetensors")).eval()
    plain = timm.create_model("vit_base_patch16_224", num_classes=0, img_size=32, patch_size=4, in_chans=1, **MICRO_VIT)
    assert exported.state_dict().keys() == plain.state_dict().keys()  # no teacher, decoder or auxiliary norm
    x = smooth_images(4, seed=1)
    with torch.no_grad():
        features = exported.forward_features(module.encoder.normalize(x))
        torch.testing.assert_close(features, module.encoder.forward_features(x))
        with branch(module.encoder, "aux"):
            assert not torch.allclose(features, module.encoder.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("cls", HOSTS, ids=lambda cls: cls.__name__)
def test_init_from_a_checkpoint_starts_a_new_run_from_its_clean_encoder_and_decoder(cls, trained):
    module, path = trained(cls)
    new = micro_module(cls, seed=1, init_from=path)
    trained_encoder = encoder_state_dict(module.state_dict())
    for name, value in encoder_state_dict(new.state_dict()).items():
        assert torch.equal(value, trained_encoder[name]), name
    for name, value in module.decoder.state_dict().items():
        assert torch.equal(new.decoder.state_dict()[name], value), name
    for name, value in new.aux_decoder.state_dict().items():  # the auxiliary branch starts as the loaded clean one
        assert torch.equal(value, new.decoder.state_dict()[name]), name
    trainer(1).fit(new, loader())  # and trains
    assert new.trainer.global_step == 1 and torch.isfinite(new.trainer.callback_metrics["train/loss"])


# ---- what only the toy host uses -------------------------------------------------------------------------------
def test_the_teacher_pairs_with_the_students_clean_parameters_and_starts_from_the_loaded_encoder(trained):
    module, path = trained(EMATeacher)
    teacher = module.host_modules["teacher"]
    assert [name for name, _ in teacher.named_parameters()] == [
        name for name, _ in clean_named_parameters(module.encoder)
    ]
    assert not any(p.requires_grad for p in teacher.parameters())  # not trained by the optimizer
    assert module.trainer.optimizers[0].param_groups and not any(
        p is q for g in module.trainer.optimizers[0].param_groups for p in g["params"] for q in teacher.parameters()
    )
    new = micro_module(EMATeacher, seed=1, init_from=path)  # a new run's teacher is the encoder it starts from
    clean = clean_state_dict(new.encoder.state_dict())
    for name, value in new.host_modules["teacher"].state_dict().items():
        assert torch.equal(value, clean[name]), name


class StudentRecord(L.Callback):
    """The encoder's clean parameters after each optimizer step (``on_train_batch_end`` follows the host's hook)."""

    def __init__(self) -> None:
        self.after: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({n: p.detach().clone() for n, p in clean_named_parameters(pl_module.encoder)})


def test_the_hook_runs_after_every_optimizer_step_with_the_schedule():
    """With gradient accumulation over 2 batches, 3 optimizer steps of 6 batches: the teacher is the EMA of the
    student's clean parameters after each optimizer step (computed here), with d read at steps 1, 2, 3 of 3."""
    L.seed_everything(0, verbose=False)
    module = micro_module(EMATeacher)
    teacher = {n: p.detach().clone() for n, p in module.host_modules["teacher"].named_parameters()}
    record = StudentRecord()
    trainer(3, [record], accumulate_grad_batches=2).fit(module, loader(n=48))
    assert module.method.updates == 3 and len(record.after) == 6
    for step, student in enumerate(record.after[1::2], start=1):  # after batches 2, 4, 6: the optimizer steps
        d = module.method.decay_at(Progress(step, 3))
        teacher = {n: d * t + (1 - d) * student[n] for n, t in teacher.items()}
    for name, value in module.host_modules["teacher"].named_parameters():
        torch.testing.assert_close(value, teacher[name], msg=name)
    aux = {n for n, _ in module.encoder.named_parameters() if ".aux." in n}
    assert aux and not aux & set(teacher)  # the plug-in's norms never reach the teacher
