"""MaskFeat: its HOG targets against scikit-image, the plug-in on it, resume, and its quickstart job."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from skimage.feature import hog

from advmim_pl.adversarial import AEMIM, Attacker, StepContext
from advmim_pl.cli import AdvMIMCLI, resolve_config_args
from advmim_pl.data import SyntheticDataModule
from advmim_pl.mim import MaskFeat
from advmim_pl.mim.maskfeat import HOG_EPS, hog_glyphs, hog_targets
from advmim_pl.models.branch_norm import branch
from advmim_pl.modules import PretrainModule
from tests.helpers.micro import MICRO, MICRO_FLAGS, bundled_sample, smooth_images, trainer

BINS = 9


def skimage_hog(images: torch.Tensor, patch_size: int, cell_size: int, norm: str) -> torch.Tensor:
    """``hog_targets`` computed by scikit-image, channel by channel: its blocks of k x k cells (``patch``) or of one
    cell (``cell``) with block_norm "L2", keeping the blocks that tile the patches. (B, C, H, W) -> (B, N, C*k*k*9)."""
    k = patch_size // cell_size
    per_image = []
    for image in images.double().numpy():
        channels = []
        for channel in image:
            block = (k, k) if norm == "patch" else (1, 1)
            blocks = hog(channel, BINS, (cell_size, cell_size), block, block_norm="L2", feature_vector=False)
            if norm == "patch":  # blocks (rows, cols, k, k, bins) start at every cell; a patch's starts at k * i
                cells = blocks[::k, ::k]
            else:  # blocks (cell rows, cols, 1, 1, bins) -> (patch rows, patch cols, k, k, bins)
                rows, cols = blocks.shape[0] // k, blocks.shape[1] // k
                cells = blocks.reshape(rows, k, cols, k, BINS).transpose(0, 2, 1, 3, 4)
            channels.append(cells.reshape(cells.shape[0] * cells.shape[1], -1))
        per_image.append(np.concatenate(channels, axis=1))
    return torch.from_numpy(np.stack(per_image))


@pytest.mark.parametrize(
    "patch_size, cell_size, norm",
    [(16, 8, "patch"), (16, 8, "cell"), (4, 2, "patch"), (6, 3, "patch"), (12, 4, "cell"), (4, 4, "patch")],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hog_targets_agree_with_scikit_image(patch_size, cell_size, norm, dtype):
    """Central differences, unsigned hard-binned orientations, cell means, L2 over the patch's (or a cell's)
    histograms: scikit-image's cell histograms are single precision, hence 1e-6 (the values are at most 1)."""
    images = torch.rand(2, 3, 48, 96, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = hog_targets(images.to(dtype), patch_size, cell_size, BINS, norm)
    k = patch_size // cell_size
    assert ours.shape == (2, (48 // patch_size) * (96 // patch_size), 3 * k * k * BINS)
    torch.testing.assert_close(ours.double(), skimage_hog(images, patch_size, cell_size, norm), atol=1e-6, rtol=0)
    # unit length per channel over the normalised group, and non-negative
    groups = ours.double().unflatten(-1, (3, k * k, BINS))
    lengths = groups.pow(2).sum(dim=(-2, -1) if norm == "patch" else -1).sqrt()
    torch.testing.assert_close(lengths, torch.ones_like(lengths), atol=1e-6, rtol=0)
    assert (ours >= 0).all()


def test_the_gaussian_window_weights_each_pixel_by_its_distance_to_the_patch_centre():
    """Against a loop over pixels: gradient, bin, and weight exp(-d^2 / (2 (p/2)^2)) per axis from the patch centre."""
    p, s = 8, 4
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = image[0, 0].numpy()
    hist = np.zeros((2, 2, 2, 2, BINS))  # patch row, patch col, cell row, cell col, bin
    centre = (p - 1) / 2
    for r in range(16):
        for c in range(16):
            g_row = x[r + 1, c] - x[r - 1, c] if 0 < r < 15 else 0.0
            g_col = x[r, c + 1] - x[r, c - 1] if 0 < c < 15 else 0.0
            angle = np.degrees(np.arctan2(g_row, g_col)) % 180
            weight = np.exp(-0.5 * (((r % p) - centre) ** 2 + ((c % p) - centre) ** 2) / (p / 2) ** 2)
            hist[r // p, c // p, (r % p) // s, (c % p) // s, int(angle // (180 / BINS))] += weight * np.hypot(
                g_row, g_col
            )
    hist = hist.reshape(4, -1) / s**2
    expected = hist / np.sqrt((hist**2).sum(-1, keepdims=True) + HOG_EPS**2)
    ours = hog_targets(image, p, s, BINS, "patch", window=True)
    torch.testing.assert_close(ours[0], torch.from_numpy(expected), atol=1e-12, rtol=0)
    assert not torch.allclose(ours, hog_targets(image, p, s, BINS, "patch"), atol=1e-3)


def test_a_vertical_edge_is_drawn_as_vertical_strokes():
    """Vertical stripes: every gradient is horizontal (bin 0), so each cell's glyph is a near-vertical line whose
    brightest columns are the cell's two middle ones."""
    image = (torch.arange(32) % 8 < 4).double().expand(1, 1, 32, 32)
    target = hog_targets(image, 16, 8, BINS, "cell")
    assert (target.unflatten(-1, (4, BINS))[..., 1:] == 0).all()  # nothing outside bin 0
    glyphs = hog_glyphs(target, 16, 8, BINS, channels=1).unflatten(-1, (2, 8, 2, 8))
    column_mass = glyphs.sum(dim=(-4, -3))  # (B, N, cells across, columns of a cell)
    assert set(column_mass.argmax(-1).flatten().tolist()) <= {3, 4}


def test_bad_sizes_fail_naming_the_value():
    with pytest.raises(ValueError, match="^cell_size must be a divisor of the patch size 16, got 3$"):
        hog_targets(torch.rand(1, 3, 32, 32), 16, 3)
    with pytest.raises(ValueError, match="^patch_size must be a divisor of 40x32, got 16$"):
        hog_targets(torch.rand(1, 3, 40, 32), 16, 8)
    with pytest.raises(ValueError, match="^cell_size must be a divisor of the patch size 4, got 3$"):
        PretrainModule(method=MaskFeat(mask_patch_size=8, cell_size=3), **MICRO)
    with pytest.raises(ValueError, match=r"^hog_norm must be one of \('patch', 'cell'\), got 'block'$"):
        MaskFeat(hog_norm="block")


def maskfeat_module(seed: int = 0) -> PretrainModule:
    torch.manual_seed(seed)
    method = MaskFeat(mask_patch_size=8, cell_size=2)
    return PretrainModule(method=method, plugin=AEMIM(Attacker(eps=8 / 255)), **MICRO)


def test_one_plugin_step_reconstructs_the_hog_of_the_adversarial_example():
    module = maskfeat_module()
    method, encoder, x = module.method, module.encoder, smooth_images(8, seed=0)
    mask = method.sample_mask(encoder, 8, x.device, torch.Generator().manual_seed(0))
    latent = method.encode(encoder, x, mask)
    out = module.plugin.step(StepContext(module.host(aux=True), x, mask, latent, visuals=True))
    x_a, loss = out.images["adversarial"], out.logs["train/loss_aux"]
    assert torch.equal(out.loss, loss)  # aux_weight 1, no warm-up
    assert torch.isfinite(loss) and 0 < (x_a - x).abs().max() <= 8 / 255 + 1e-6

    # the auxiliary loss is the MSE, on the masked patches, of the aux branch's prediction from x_a to HOG(x_a)
    with torch.no_grad(), branch(encoder, "aux"):
        pred = module.aux_decoder(method.encode(encoder, x_a, mask))
    masked = mask.patches.bool()

    def mse_to(images: torch.Tensor) -> torch.Tensor:
        return (pred - hog_targets(images, 4, 2, BINS, "patch", window=True)).pow(2).mean(-1)[masked].mean()

    torch.testing.assert_close(loss, mse_to(x_a))
    assert (mse_to(x) - loss).abs() > 1e-3 * loss  # HOG(x) is another target: x_a moved it
    assert pred.shape == (8, 64, 36) and masked.sum() == 8 * 24  # 6 of 16 squares of 2 x 2 patches (40%)

    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    for name in ("encoder.vit.blocks.0.attn.qkv.weight", "encoder.mask_token", "aux_decoder.proj.weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    aux_norms = [g for name, g in grads.items() if ".aux." in name]
    assert aux_norms and all(g is not None and g.abs().sum() > 0 for g in aux_norms)
    assert all(p.grad is None for p in module.decoder.parameters())  # the clean head is not on this path


def fit_plugin(root: Path, ckpt_path: Path | None = None, seed: int = 0) -> PretrainModule:
    """MaskFeat + AEMIM on 24 synthetic images, 3 batches of 8 per epoch, for 6 steps, with a checkpoint after every
    step in ``root`` (as ``tests/test_resume.py`` runs the micro MAE)."""
    L.seed_everything(0, verbose=False)
    data = SyntheticDataModule(
        num_samples=24, num_val_samples=8, batch_size=8, img_size=32, channels=1, num_workers=0, pin_memory=False
    )
    checkpoints = ModelCheckpoint(root, "{step}", every_n_train_steps=1, save_top_k=-1)
    run = trainer(6, [checkpoints], enable_checkpointing=True, limit_val_batches=0, default_root_dir=root)
    module = maskfeat_module(seed)
    run.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore:The dirpath has changed",  # the resumed run writes its checkpoints into a folder of its own
    "ignore:You're resuming from a checkpoint that ended",  # the data module resumes mid-epoch
)
@pytest.mark.parametrize("step", [2, 3], ids=["mid_epoch", "epoch_end"])
def test_a_resumed_maskfeat_plugin_run_ends_where_the_uninterrupted_one_does(tmp_path, step):
    straight = fit_plugin(tmp_path / "straight")
    half = tmp_path / "straight" / f"step={step}.ckpt"
    resumed = fit_plugin(tmp_path / "resumed", half, seed=1)  # other initial weights: all must come from the file
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert resumed.plugin.attack.generator.get_state().equal(straight.plugin.attack.generator.get_state())
    assert resumed.mask_stream.generator.get_state().equal(straight.mask_stream.generator.get_state())
    loaded = PretrainModule.load_from_checkpoint(half)
    assert type(loaded.method) is MaskFeat and loaded.method.config() == straight.method.config()


@pytest.mark.filterwarnings("ignore:.*does not have many workers", "ignore:LightningCLI's args parameter")
def test_the_quickstart_jobs_build_the_heads_and_lower_the_loss():
    # the full lr from the first step (no warm-up), so that 40 steps show the trend
    args = ["-c", "quickstart_maskfeat.yaml", *MICRO_FLAGS, "--model.init_args.warmup_epochs", "0"]
    cli = AdvMIMCLI(args=resolve_config_args(args), run=False)
    method, head = cli.model.method, cli.model.decoder
    assert isinstance(method, MaskFeat) and (method.cell_size, method.bins, method.mask_ratio) == (2, 9, 0.4)
    # one linear map from a 64-d token to a patch's 1 channel x 2 x 2 cells x 9 bins
    assert sum(p.numel() for p in head.parameters()) == (64 + 1) * 36
    plugin_job = AdvMIMCLI(args=resolve_config_args(["-c", "quickstart_maskfeat_adv.yaml", *MICRO_FLAGS]), run=False)
    aux_head = plugin_job.model.aux_decoder
    assert isinstance(plugin_job.model.plugin, AEMIM) and plugin_job.model.method.config() == method.config()
    assert type(aux_head) is type(head) and sum(p.numel() for p in aux_head.parameters()) == (64 + 1) * 36
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    L.seed_everything(0)
    trainer(40, [Record()]).fit(cli.model, datamodule=bundled_sample(64))
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
