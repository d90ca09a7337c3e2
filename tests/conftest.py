"""Shared fixtures: micro ViTs (depth 2, width 64) on 32-px single-channel images, patch 4."""

import lightning as L
import pytest
import torch

from advmim_pl.mim import MAE, SimMIM
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules import PretrainModule
from tests.helpers.micro import MICRO_ENCODER, MICRO_VIT, SAMPLE, bundled_sample, smooth_images, trainer


def pytest_configure(config):
    # micro models: intra-op threads only add overhead, and with other jobs on the two cores
    # OpenMP spin-waiting makes small backward passes ~100x slower
    torch.set_num_threads(1)


@pytest.fixture
def micro_encoder():
    """Factory: ``micro_encoder(**overrides)`` -> a micro ``MaskedViT`` (seeded, fp32)."""

    def make(seed: int = 0, **overrides) -> MaskedViT:
        kwargs = {**MICRO_ENCODER, "model_kwargs": dict(MICRO_VIT)}
        kwargs.update(overrides)
        torch.manual_seed(seed)
        return MaskedViT(**kwargs)

    return make


@pytest.fixture
def images():
    """Factory: ``images(batch, channels, size, seed)`` -> smooth random images in [0, 1]."""

    def make(batch: int = 4, channels: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
        return smooth_images(batch, seed, channels, size)

    return make


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> dict[str, str]:
    """Checkpoints of micro encoders pre-trained for 400 steps (~6 epochs) on the bundled sample, seed 0: MAE and
    SimMIM (learned positions, as SimMIM). Trained once per session for every test that needs a trained encoder."""
    data, folder = bundled_sample(), tmp_path_factory.mktemp("pretrained")
    paths = {}
    for name, method in (
        ("mae", MAE(decoder_dim=32, decoder_depth=1, decoder_heads=4)),
        ("simmim", SimMIM(mask_patch_size=8)),
    ):
        L.seed_everything(0)
        module = PretrainModule(method=method, **SAMPLE, sincos_pos_embed=name == "mae", batch_size=64, base_lr=3e-3,
                                warmup_epochs=1)  # fmt: skip
        t = trainer(400, limit_val_batches=0)
        t.fit(module, datamodule=data)
        t.save_checkpoint(folder / f"{name}.ckpt")
        paths[name] = str(folder / f"{name}.ckpt")
    return paths
