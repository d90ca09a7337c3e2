"""Shared fixtures: micro ViTs (depth 2, width 64) on 32-px single-channel images, patch 4."""

import pytest
import torch

from advmim_pl.models.vit import MaskedViT
from tests.helpers.micro import MICRO_ENCODER, MICRO_VIT, smooth_images


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
