"""Shared fixtures: micro ViTs (depth 2, width 64) on 32-px single-channel images, patch 4."""

import pytest
import torch

from advmim_pl.models.vit import MaskedViT


def pytest_configure(config):
    # micro models: intra-op threads only add overhead, and with other jobs on the two cores
    # OpenMP spin-waiting makes small backward passes ~100x slower
    torch.set_num_threads(1)


MICRO_VIT = dict(depth=2, embed_dim=64, num_heads=4)
MICRO_ENCODER = dict(
    name="vit_base_patch16_224", img_size=32, patch_size=4, in_chans=1, mean=(0.5,), std=(0.25,), mask_token=True
)


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
        g = torch.Generator().manual_seed(seed)
        low = torch.rand(batch, channels, size // 4, size // 4, generator=g)
        x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        return x.clamp(0, 1)

    return make
