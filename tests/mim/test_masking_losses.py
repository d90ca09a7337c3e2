"""Masking and reconstruction losses against direct computations from their definitions."""

import pytest
import torch
import torch.nn.functional as F

from advmim_pl.mim import MAE, Host, Perturbed, SimMIM
from advmim_pl.mim.losses import (
    feature_distance,
    mae_loss,
    normalize_patches,
    patchify,
    simmim_loss,
    unpatchify,
    upsample_mask,
)
from advmim_pl.mim.masking import block_masking, num_kept, random_masking

CPU = torch.device("cpu")


@pytest.mark.parametrize("num_patches", [64, 49, 10])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.6, 0.75, 0.9])
def test_random_masking(num_patches, ratio):
    g = torch.Generator().manual_seed(1)
    keep, mask = random_masking(6, num_patches, ratio, CPU, g)
    k = int(num_patches * (1 - ratio))
    assert num_kept(num_patches, ratio) == k
    assert keep.shape == (6, k) and mask.shape == (6, num_patches)
    assert keep.dtype == torch.int64 and mask.dtype == torch.float32
    for b in range(6):
        row = keep[b].tolist()
        assert row == sorted(set(row))  # unique and sorted
        assert all(0 <= i < num_patches for i in row)
        expected = torch.ones(num_patches)
        expected[row] = 0.0
        assert torch.equal(mask[b], expected)
    if 0 < k < num_patches:  # per-sample, not one mask for the batch
        assert not all(torch.equal(keep[0], keep[b]) for b in range(1, 6))


def test_random_masking_is_reproducible_with_generator():
    a = random_masking(3, 64, 0.75, CPU, torch.Generator().manual_seed(7))
    b = random_masking(3, 64, 0.75, CPU, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("grid, block", [((8, 8), 2), ((8, 8), 4), ((6, 4), 2), ((8, 8), 1)])
@pytest.mark.parametrize("ratio", [0.25, 0.4, 0.6, 0.75])
def test_block_masking(grid, block, ratio):
    h, w = grid
    units = (h // block) * (w // block)
    g = torch.Generator().manual_seed(3)
    mask = block_masking(5, grid, block, ratio, CPU, g)
    assert mask.shape == (5, h * w) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    expected_fraction = round(ratio * units) / units
    for b in range(5):
        m = mask[b].view(h, w)
        assert m.mean().item() == pytest.approx(expected_fraction)
        for i in range(0, h, block):
            for j in range(0, w, block):
                square = m[i : i + block, j : j + block]
                assert bool((square == square[0, 0]).all()), (b, i, j)


def test_upsample_mask():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    pixel = upsample_mask(mask, (2, 2), 3)
    assert pixel.shape == (1, 1, 6, 6)
    expected = torch.zeros(6, 6)
    expected[:3, :3] = 1
    expected[3:, 3:] = 1
    assert torch.equal(pixel[0, 0], expected)


def loop_patchify(images, p):
    b, c, h, w = images.shape
    out = torch.empty(b, (h // p) * (w // p), p * p * c)
    for n in range(b):
        for i in range(h // p):
            for j in range(w // p):
                for u in range(p):
                    for v in range(p):
                        for ch in range(c):
                            pixel = images[n, ch, i * p + u, j * p + v]
                            out[n, i * (w // p) + j, (u * p + v) * c + ch] = pixel
    return out


def test_patchify_matches_loop_and_round_trips():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 2, 6, 9, generator=g)
    patches = patchify(images, 3)
    assert patches.shape == (2, 6, 18)
    assert torch.equal(patches, loop_patchify(images, 3))
    assert torch.equal(unpatchify(patches, 3, 2, (2, 3)), images)
    random_patches = torch.rand(2, 6, 18, generator=g)
    assert torch.equal(patchify(unpatchify(random_patches, 3, 2, (2, 3)), 3), random_patches)


def loop_mae_loss(pred, target, mask, norm_pix):
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if mask[b, n] == 0:
                continue
            t = target[b, n].double()
            if norm_pix:
                d = t.numel()
                mean = sum(t.tolist()) / d
                var = sum((v - mean) ** 2 for v in t.tolist()) / (d - 1)  # unbiased, as the MAE code
                t = (t - mean) / (var + 1e-6) ** 0.5
            total += ((pred[b, n].double() - t) ** 2).mean().item()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_definition(norm_pix):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 8, generator=g)
    target = torch.rand(2, 5, 8, generator=g)
    target[0, 1] = 0.3  # a constant patch: variance 0, eps keeps it finite
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0, 1.0]])
    loss = mae_loss(pred, target, mask, norm_pix=norm_pix)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(loop_mae_loss(pred, target, mask, norm_pix), rel=1e-5)
    # unmasked patches do not count
    pred2 = pred.clone()
    pred2[mask == 0] += 10.0
    assert mae_loss(pred2, target, mask, norm_pix=norm_pix).item() == pytest.approx(loss.item(), rel=1e-6)


def test_mae_loss_half_precision_inputs_give_fp32():
    pred = torch.randn(2, 4, 8).to(torch.bfloat16)
    target = torch.rand(2, 4, 8).to(torch.bfloat16)
    mask = torch.ones(2, 4)
    assert mae_loss(pred, target, mask).dtype == torch.float32


def test_simmim_loss_counts_masked_pixels_only():
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 3, 4, 4
    pred = torch.rand(b, c, h, w, generator=g)
    target = torch.rand(b, c, h, w, generator=g)
    pixel_mask = (torch.rand(b, 1, h, w, generator=g) > 0.5).float()
    pixel_mask[0, 0, 0, 0] = 1.0
    total, count = 0.0, 0
    for n in range(b):
        for y in range(h):
            for x in range(w):
                if pixel_mask[n, 0, y, x]:
                    for ch in range(c):
                        total += abs(pred[n, ch, y, x].item() - target[n, ch, y, x].item())
                        count += 1
    loss = simmim_loss(pred, target, pixel_mask)
    assert loss.dim() == 0 and loss.item() == pytest.approx(total / count, rel=1e-5)
    changed = pred + 7.0 * (1 - pixel_mask)  # only unmasked pixels change
    assert simmim_loss(changed, target, pixel_mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed_masked = pred + 1.0 * pixel_mask
    assert simmim_loss(changed_masked, target, pixel_mask).item() != pytest.approx(loss.item(), rel=1e-3)


def test_simmim_loss_with_empty_mask_is_zero():
    pred, target = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    assert simmim_loss(pred, target, torch.zeros(1, 1, 4, 4)).item() == 0.0


@pytest.mark.parametrize("kind", ["mse", "cosine", "kl"])
def test_feature_distance_matches_functional_reference(kind):
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, 8, generator=g)
    t = torch.randn(3, 5, 8, generator=g)
    got = feature_distance(f, t, kind)
    assert got.shape == (3,) and got.dtype == torch.float32
    for b in range(3):
        if kind == "mse":
            ref = F.mse_loss(f[b], t[b])
        elif kind == "cosine":
            ref = (1 - F.cosine_similarity(f[b], t[b], dim=-1)).mean()
        else:  # KL(softmax(target) || softmax(features)) summed over channels, mean over tokens
            ref = F.kl_div(
                F.log_softmax(f[b], dim=-1),
                F.log_softmax(t[b], dim=-1),
                reduction="batchmean",
                log_target=True,
            )
        torch.testing.assert_close(got[b], ref, atol=1e-6, rtol=1e-5)
    assert (got > 0).all()
    torch.testing.assert_close(feature_distance(t, t, kind), torch.zeros(3), atol=1e-6, rtol=0)


def test_feature_distance_is_not_symmetric_for_kl():
    g = torch.Generator().manual_seed(1)
    f, t = torch.randn(2, 3, 4, generator=g) * 3, torch.randn(2, 3, 4, generator=g)
    assert not torch.allclose(feature_distance(f, t, "kl"), feature_distance(t, f, "kl"))


def test_feature_distance_unknown_kind():
    with pytest.raises(ValueError, match="l3"):
        feature_distance(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), "l3")


@pytest.mark.parametrize("floor_in_eps", [1.0, 2.0, 4.0])
def test_variance_floor_keeps_a_flat_patch_perturbation_at_eps_over_the_floor(floor_in_eps):
    """On a flat patch MAE's normalisation turns a +-eps perturbation into unit-variance noise; with the floor
    the target moves by at most eps / floor (RMS), whatever the patch's level."""
    eps = 4 / 255
    g = torch.Generator().manual_seed(0)
    level = torch.rand(64, 1, 1, generator=g)
    flat = level.expand(64, 8, 48).clone()  # (B, L, p*p*C) flat patches
    delta = eps * (torch.rand(flat.shape, generator=g) < 0.5).float().mul(2).sub(1)
    perturbed = flat + delta
    plain = (normalize_patches(perturbed) - normalize_patches(flat)).pow(2).mean().sqrt().item()
    floor = floor_in_eps * eps
    floored = normalize_patches(perturbed, floor**2) - normalize_patches(flat, floor**2)
    assert plain > 0.9  # order 1: the perturbation fills the whole unit variance
    assert floored.pow(2).mean().sqrt().item() <= eps / floor
    with_clean_stats = normalize_patches(perturbed, floor**2, stats_from=flat) - normalize_patches(flat, floor**2)
    assert with_clean_stats.pow(2).mean().sqrt().item() <= eps / floor * (1 + 1e-3)


def test_mae_loss_normalises_with_the_floor_and_the_given_statistics():
    g = torch.Generator().manual_seed(1)
    pred, target, stats = (torch.randn(2, 5, 12, generator=g) for _ in range(3))
    mask = torch.tensor([[1.0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    mean, var = stats.mean(-1, keepdim=True), stats.var(-1, keepdim=True)
    expected = (((pred - (target - mean) / (var + 1e-6 + 0.3).sqrt()) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(mae_loss(pred, target, mask, True, 0.3, stats), expected)
    torch.testing.assert_close(mae_loss(pred, target, mask, True), mae_loss(pred, target, mask, True, 0.0, None))


@pytest.mark.parametrize("aux_target_norm", ["floor", "clean", "patch"])
def test_mae_normalises_a_perturbed_target_as_aux_target_norm_says(micro_encoder, images, aux_target_norm):
    """MAE's per-patch target of a perturbed image (what the plug-in asks for): a variance floor of
    ``(aux_norm_floor * eps)^2`` and the statistics of the image itself (``floor``) or of the clean one (``clean``),
    or the plain norm_pix_loss (``patch``, and any target of an unperturbed image); computed here from the
    definition. SimMIM's raw pixels ignore the perturbation."""
    encoder, g = micro_encoder(), torch.Generator().manual_seed(2)
    x, clean = images(4, seed=1), images(4, seed=2)
    mae = MAE(norm_pix_loss=True, aux_target_norm=aux_target_norm, aux_norm_floor=3.0)
    host = Host(mae, encoder, torch.nn.Identity(), torch.nn.ModuleDict())
    mask = mae.sample_mask(encoder, 4, CPU, g)
    pred = torch.randn(4, 64, 16, generator=g)  # (B, N, p*p*C): 8 x 8 patches of 4 x 4 grey pixels

    def expected(floor: float, stats: torch.Tensor) -> torch.Tensor:
        target, source = patchify(x, 4), patchify(stats, 4)
        mean, var = source.mean(-1, keepdim=True), source.var(-1, keepdim=True)
        error = ((pred - (target - mean) / (var + 1e-6 + floor).sqrt()) ** 2).mean(-1)
        return (error * mask.patches).sum() / mask.patches.sum()

    eps = 0.1
    floor = 0.0 if aux_target_norm == "patch" else (3.0 * eps) ** 2
    stats = clean if aux_target_norm == "clean" else x
    perturbed = host.targets(x, Perturbed(clean, eps))
    torch.testing.assert_close(host.loss(pred, perturbed, mask), expected(floor, stats))
    torch.testing.assert_close(host.loss(pred, host.targets(x), mask), expected(0.0, x))
    simmim = SimMIM(mask_patch_size=8)
    host = Host(simmim, encoder, torch.nn.Identity(), torch.nn.ModuleDict())
    assert torch.equal(host.targets(x, Perturbed(clean, eps)), host.targets(x))
