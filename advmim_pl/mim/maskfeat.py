"""MaskFeat (Wei et al. 2022): predict the histograms of oriented gradients (HOG) of the masked patches.

The target is a deterministic function of the image, so the plug-in's auxiliary branch, which asks the host for the
targets of the adversarial example x_a, reconstructs HOG(x_a) with no change to the plug-in. MaskFeat is SimMIM with
another target and head: it inherits SimMIM's masking, encoding and decoding.
"""

import math
from typing import Literal

import torch
from jsonargparse.typing import OpenUnitInterval, PositiveInt
from torch import Tensor, nn
from torch.nn import functional as F

from advmim_pl.checks import require, require_choice, require_positive
from advmim_pl.mim.losses import mae_loss, unpatchify
from advmim_pl.mim.methods import Host, Mask, Perturbed, SimMIM, paste
from advmim_pl.models.vit import MaskedViT

HOG_EPS = 1e-5  # L2 normalisation h / sqrt(|h|^2 + eps^2), as scikit-image's block_norm="L2"
HogNorm = Literal["patch", "cell"]


def image_gradients(images: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences ``x[i + 1] - x[i - 1]``: images (B, C, H, W) -> (g_row, g_col), each (B, C, H, W).

    g_row is zero on the first and last row and g_col on the first and last column, as in scikit-image's ``hog``.
    """
    g_row = F.pad(images[:, :, 2:] - images[:, :, :-2], (0, 0, 1, 1))
    g_col = F.pad(images[..., 2:] - images[..., :-2], (1, 1))
    return g_row, g_col


def gaussian_window(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, size) weights ``exp(-d^2 / (2 sigma^2))`` about the centre, sigma = size / 2, peak at most 1."""
    n = torch.arange(size, dtype=dtype, device=device)
    w = torch.exp(-0.5 * ((n - n.mean()) / (size / 2)) ** 2)
    return w[:, None] * w[None, :]


def hog_targets(
    images: Tensor,
    patch_size: int,
    cell_size: int = 8,
    bins: int = 9,
    norm: HogNorm = "patch",
    window: bool = False,
) -> Tensor:
    """HOG of every patch: images (B, C, H, W) -> (B, N, C * k * k * bins), k = patch_size / cell_size.

    Patches are row-major as in ``patchify``; a patch's vector is laid out (channel, cell row, cell column, bin).
    Per channel: gradients by ``image_gradients``; magnitude ``hypot(g_row, g_col)``; unsigned orientation
    ``atan2(g_row, g_col)`` in degrees mod 180, hard-binned (bin i holds [i, i + 1) * 180 / bins); a cell's histogram
    is the mean over its pixels of the magnitude falling in each bin. ``window`` first weights the magnitudes by a
    ``gaussian_window`` over each patch. ``norm`` L2-normalises each channel's histograms over the patch's k * k
    cells (``patch``) or over each cell (``cell``), ``h / sqrt(|h|^2 + HOG_EPS^2)``. Without the window this is
    scikit-image's ``hog(channel, bins, (cell_size,) * 2, cells_per_block, block_norm="L2")`` on the blocks that
    tile the patches, with cells_per_block (k, k) for ``patch`` and (1, 1) for ``cell``.
    """
    b, c, h, w = images.shape
    require(patch_size % cell_size == 0, "cell_size", cell_size, f"a divisor of the patch size {patch_size}")
    require(h % patch_size == 0 and w % patch_size == 0, "patch_size", patch_size, f"a divisor of {h}x{w}")
    require_choice(HogNorm, norm=norm)
    g_row, g_col = image_gradients(images)
    magnitude = torch.hypot(g_row, g_col)
    if window:
        magnitude = magnitude * gaussian_window(patch_size, images.dtype, images.device).repeat(
            h // patch_size, w // patch_size
        )
    angle = torch.rad2deg(torch.atan2(g_row, g_col)).remainder(180)
    index = torch.div(angle, 180 / bins, rounding_mode="floor").long().remainder(bins)  # 180.0 after rounding: 0
    which = index.unsqueeze(2) == torch.arange(bins, device=images.device).view(bins, 1, 1)  # (B, C, bins, H, W)
    votes = magnitude.unsqueeze(2) * which
    cells = F.avg_pool2d(votes.flatten(1, 2), cell_size).unflatten(1, (c, bins))  # (B, C, bins, H / s, W / s)
    k, (gh, gw) = patch_size // cell_size, (h // patch_size, w // patch_size)
    per_patch = cells.reshape(b, c, bins, gh, k, gw, k).permute(0, 3, 5, 1, 4, 6, 2).reshape(b, gh * gw, c, k * k, bins)
    dims = (-2, -1) if norm == "patch" else (-1,)
    normalised = per_patch / (per_patch.pow(2).sum(dims, keepdim=True) + HOG_EPS**2).sqrt()
    return normalised.reshape(b, gh * gw, -1)


def hog_glyphs(hog: Tensor, patch_size: int, cell_size: int, bins: int, channels: int) -> Tensor:
    """HOG vectors (B, N, C * k * k * bins) -> drawings (B, N, p * p), p = patch_size, pixels row-major.

    Each cell gets, for every bin, a line through its centre along the edges that bin's gradients cross
    (perpendicular to the bin's mid orientation), as bright as the bin's value (negative values count as 0, channels
    are averaged); each patch is scaled to peak 1 (a flat patch stays 0).
    """
    k = patch_size // cell_size
    hist = hog.float().clamp_min(0).unflatten(-1, (channels, k, k, bins)).mean(2)  # (B, N, k, k, bins)
    r = torch.arange(cell_size, dtype=hist.dtype, device=hist.device) - (cell_size - 1) / 2
    edge = (torch.arange(bins, dtype=hist.dtype, device=hist.device) + 0.5) * math.pi / bins + math.pi / 2
    distance = (r[:, None, None] * edge.cos() - r[None, :, None] * edge.sin()).abs()  # (s, s, bins), to the line
    strokes = (1 - distance).clamp_min(0)
    glyph = torch.einsum("bnijk,uvk->bniujv", hist, strokes).flatten(2)  # (B, N, k * s * k * s)
    return glyph / glyph.amax(dim=-1, keepdim=True).clamp_min(1e-12)


class HOGHead(nn.Module):
    """MaskFeat's linear head: token features (B, P + N, D) -> per-patch HOG predictions (B, N, out_dim)."""

    def __init__(self, embed_dim: int, out_dim: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Linear(embed_dim, out_dim)

    def forward(self, latent: Tensor) -> Tensor:
        return self.proj(latent[:, self.num_prefix_tokens :])


class MaskFeat(SimMIM):
    """MaskFeat: SimMIM's block-wise masking and mask-token encoding of every patch (inherited), a linear head
    predicting each patch's HOG (``hog_targets``), MSE on the masked patches.

    ``mask_patch_size`` is the side of a masked square in pixels, a multiple of the encoder's patch size (the paper
    masks BEiT-style random rectangles at 40%; this uses SimMIM's squares). ``cell_size`` must divide the patch
    size (8 px at 16-px patches: 2 x 2 cells per patch). ``hog_norm`` and ``gaussian_window`` as in ``hog_targets``;
    the authors' code weights each 16-px patch by a Gaussian of std 8 px, which ``gaussian_window: true`` matches.
    """

    def __init__(
        self,
        mask_ratio: OpenUnitInterval = 0.4,
        mask_patch_size: PositiveInt = 32,
        cell_size: PositiveInt = 8,
        bins: PositiveInt = 9,
        hog_norm: HogNorm = "patch",
        gaussian_window: bool = True,
    ) -> None:
        super().__init__(mask_ratio, mask_patch_size)
        require_positive(cell_size=cell_size, bins=bins)
        require_choice(HogNorm, hog_norm=hog_norm)
        self.cell_size, self.bins, self.hog_norm, self.gaussian_window = cell_size, bins, hog_norm, gaussian_window

    def target_dim(self, encoder: MaskedViT) -> int:
        """Length of a patch's HOG vector, after checking that ``cell_size`` divides the encoder's patches."""
        p = encoder.patch_size
        require(p % self.cell_size == 0, "cell_size", self.cell_size, f"a divisor of the patch size {p}")
        return encoder.in_chans * (p // self.cell_size) ** 2 * self.bins

    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        self._block(encoder)
        return HOGHead(encoder.embed_dim, self.target_dim(encoder), encoder.num_prefix_tokens)

    def targets(self, host: Host, images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        """HOG (B, N, target_dim) of images (B, C, H, W) in pixel space, fp32 and without gradient. A HOG vector is
        L2-normalised by its definition, so a perturbation's size changes nothing."""
        with torch.no_grad():
            p = host.encoder.patch_size
            return hog_targets(images.float(), p, self.cell_size, self.bins, self.hog_norm, self.gaussian_window)

    def loss(self, pred: Tensor, targets: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """Mean over masked patches of the MSE between pred and the HOG targets, both (B, N, target_dim)."""
        return mae_loss(pred, targets, mask.patches, norm_pix=False)

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """The visible pixels, and on each masked patch the predicted HOG drawn as ``hog_glyphs`` (grey)."""
        p, c = encoder.patch_size, encoder.in_chans
        glyphs = hog_glyphs(pred.detach(), p, self.cell_size, self.bins, c)
        return paste(images, unpatchify(glyphs, p, 1, encoder.grid_size).expand(-1, c, -1, -1), mask, encoder)
