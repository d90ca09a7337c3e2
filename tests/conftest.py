"""Shared fixtures: micro ViTs (depth 2, width 64) on 32-px single-channel images, patch 4."""

import os

import lightning as L
import pytest
import torch
from filelock import FileLock

from advmim_pl.mim import MAE, SimMIM
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules import PretrainModule
from tests.helpers.micro import MICRO_ENCODER, MICRO_VIT, SAMPLE, bundled_sample, smooth_images, trainer


def pytest_configure(config):
    # micro models: intra-op threads only add overhead, and with other jobs on the two cores (the README's
    # `-n 2` runs two test processes) OpenMP spin-waiting makes small backward passes ~100x slower. The
    # environment variable gives the same to the processes the tests start (CLI runs, the study, notebooks).
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items):
    """The notebooks, then the tests of the ``pretrained`` encoders, then the tests marked ``long``, then the rest,
    each group in collection order. Started first, the long runs share the two ``-n 2`` workers instead of ending
    the run alone in one of them; and the encoders are trained by the worker that does not run the notebooks,
    before the other one asks for them (asked by both at once, one worker waited ~45 s on the file lock)."""

    def group(item) -> int:
        if item.path.suffix == ".ipynb":
            return 0
        return 1 if "pretrained" in item.fixturenames else 2 if item.get_closest_marker("long") else 3

    items.sort(key=group)


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
    SimMIM (learned positions, as SimMIM). Trained once per test run for every test that needs a trained encoder:
    the first pytest-xdist worker to ask trains them in the run's shared temporary folder, under a file lock."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the folder all workers of this run share
    folder = shared / "pretrained"
    folder.mkdir(exist_ok=True)
    paths = {name: str(folder / f"{name}.ckpt") for name in ("mae", "simmim")}
    with FileLock(str(folder / "train.lock")):
        if all(os.path.exists(p) for p in paths.values()):
            return paths
        data = bundled_sample()
        for name, method in (
            ("mae", MAE(decoder_dim=32, decoder_depth=1, decoder_heads=4)),
            ("simmim", SimMIM(mask_patch_size=8)),
        ):
            L.seed_everything(0)
            module = PretrainModule(method=method, **SAMPLE, sincos_pos_embed=name == "mae", batch_size=64,
                                    base_lr=3e-3, warmup_epochs=1)  # fmt: skip
            t = trainer(400, limit_val_batches=0)
            t.fit(module, datamodule=data)
            t.save_checkpoint(paths[name])
    return paths
