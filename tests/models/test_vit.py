"""MaskedViT: unmasked encodings equal the plain timm model; sin-cos table; errors; timm export."""

import math

import numpy as np
import pytest
import timm
import torch

from advmim_pl.mim.masking import random_masking
from advmim_pl.models.pos_embed import sincos_2d
from advmim_pl.models.vit import MaskedViT
from tests.helpers.micro import MICRO_VIT

# prefix-token layouts timm supports: cls token (default), cls + registers with no position on the
# prefix, no prefix token at all.
LAYOUTS = {
    "cls": {},
    "cls_reg_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "no_prefix": dict(class_token=False, global_pool="avg"),
}


def mae_sincos_reference(dim: int, h: int, w: int, prefix: int) -> np.ndarray:
    """MAE paper/reference code, written out per entry: channel quarters are sin(col), cos(col),
    sin(row), cos(row) with frequencies omega_i = 1 / 10000^(i / (dim/4)), i < dim/4; prefix rows 0."""
    quarter = dim // 4
    table = np.zeros((prefix + h * w, dim), dtype=np.float64)
    for r in range(h):
        for c in range(w):
            row = prefix + r * w + c
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                table[row, i] = math.sin(c * omega)
                table[row, quarter + i] = math.cos(c * omega)
                table[row, 2 * quarter + i] = math.sin(r * omega)
                table[row, 3 * quarter + i] = math.cos(r * omega)
    return table


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unmasked_encodings_equal_timm_forward_features(micro_encoder, images, layout):
    enc = micro_encoder(model_kwargs={**MICRO_VIT, **LAYOUTS[layout]}).eval()
    x = images(batch=3)
    # put the inputs exactly on the boundary too
    x[0, :, :4, :4] = 0.0
    x[0, :, -4:, -4:] = 1.0
    with torch.no_grad():
        reference = enc.vit.forward_features(enc.normalize(x))
        keep, mask = random_masking(3, enc.num_patches, 0.0, x.device)
        assert keep.shape == (3, enc.num_patches) and mask.sum() == 0
        visible = enc.forward_visible(x, keep)
        masked = enc.forward_masked(x, torch.zeros(3, enc.num_patches))
        full = enc.forward_features(x)
        vit = enc.vit  # timm's own forward_features up to the final norm
        before_norm = vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(enc.normalize(x))))))
        torch.testing.assert_close(enc.forward_tokens(x, final_norm=False), before_norm, atol=1e-5, rtol=0)
    assert reference.shape == (3, enc.num_prefix_tokens + enc.num_patches, 64)
    for out in (visible, masked, full, enc(x), enc.forward_tokens(x)):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_forward_masked_uses_mask_token_on_masked_patches_only(micro_encoder, images):
    enc = micro_encoder().eval()
    x = images(batch=2)
    mask = torch.zeros(2, enc.num_patches)
    mask[:, ::3] = 1
    with torch.no_grad():
        a = enc.forward_masked(x, mask)
        # a different image on masked patches (only) gives the same encoding
        y = x.clone()
        y[:, :, :4, :4] = 1 - y[:, :, :4, :4]  # patch 0 is masked
        b = enc.forward_masked(y, mask)
        c = enc.forward_features(x)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(a, c, atol=1e-3)


def test_forward_visible_output_shape(micro_encoder, images):
    enc = micro_encoder().eval()
    keep, _ = random_masking(4, enc.num_patches, 0.75, torch.device("cpu"))
    out = enc.forward_visible(images(batch=4), keep)
    assert out.shape == (4, 1 + 16, 64)


@pytest.mark.parametrize("grid, dim, prefix", [((8, 8), 64, 1), ((2, 3), 16, 0), ((3, 5), 32, 2)])
def test_sincos_2d_matches_mae_definition(grid, dim, prefix):
    table = sincos_2d(dim, grid, prefix)
    assert table.dtype == torch.float32
    assert table.shape == (prefix + grid[0] * grid[1], dim)
    expected = mae_sincos_reference(dim, *grid, prefix)
    np.testing.assert_allclose(table.numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim", [6, 10])
def test_sincos_2d_rejects_dim_not_divisible_by_4(dim):
    with pytest.raises(ValueError, match=str(dim)):
        sincos_2d(dim, (2, 2))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_encoder_pos_embed_is_frozen_sincos(micro_encoder, layout):
    enc = micro_encoder(model_kwargs={**MICRO_VIT, **LAYOUTS[layout]})
    pos = enc.vit.pos_embed
    assert pos.requires_grad is False
    prefix = 0 if enc.vit.no_embed_class else enc.num_prefix_tokens
    expected = mae_sincos_reference(64, 8, 8, prefix)
    np.testing.assert_allclose(pos.detach()[0].numpy(), expected, atol=1e-6, rtol=0)


def test_learned_pos_embed_when_sincos_off(micro_encoder):
    enc = micro_encoder(sincos_pos_embed=False)
    assert enc.vit.pos_embed.requires_grad is True
    sincos = mae_sincos_reference(64, 8, 8, 1)
    assert not np.allclose(enc.vit.pos_embed.detach()[0].numpy(), sincos, atol=1e-3)


def test_img_size_not_divisible_by_patch_size(micro_encoder):
    with pytest.raises(ValueError) as info:
        micro_encoder(img_size=30, patch_size=4)
    assert "30" in str(info.value) and "4" in str(info.value)


def test_unknown_model_name(micro_encoder):
    with pytest.raises(ValueError, match="vit_does_not_exist_xyz"):
        micro_encoder(name="vit_does_not_exist_xyz")


def test_vit_state_dict_loads_into_plain_timm_model(micro_encoder, images):
    enc = micro_encoder().eval()
    plain = timm.create_model(
        "vit_base_patch16_224", num_classes=0, img_size=32, patch_size=4, in_chans=1, **MICRO_VIT
    ).eval()
    result = plain.load_state_dict(enc.vit.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = images(batch=2)
    with torch.no_grad():
        expected = plain.forward_features(enc.normalize(x))
        torch.testing.assert_close(enc.vit.forward_features(enc.normalize(x)), expected, atol=0, rtol=0)
        torch.testing.assert_close(enc.forward_features(x), expected, atol=1e-5, rtol=0)
    # the wrapper's extra parameters (mask token, Normalize buffers) are outside `.vit`
    assert not any("mask_token" in k for k in enc.vit.state_dict())


def test_normalize_inside_model(micro_encoder):
    enc = micro_encoder(in_chans=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    expected = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(enc.normalize(x), expected)
    assert isinstance(enc, MaskedViT) and enc.in_chans == 3
