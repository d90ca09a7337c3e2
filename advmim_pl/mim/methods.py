"""Host MIM methods. Each holds its hyperparameters and maps (encoder, images, mask) to a loss.

A method owns no parameters: the LightningModule builds the encoder and asks the method for decoders,
so the same method object can serve a clean and an auxiliary branch.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from torch import Tensor, nn

from advmim_pl.checks import constructor_config
from advmim_pl.mim.losses import TargetNorm, mae_loss, patchify, simmim_loss, unpatchify, upsample_mask
from advmim_pl.mim.masking import block_masking, random_masking
from advmim_pl.models.decoders import MAEDecoder, SimMIMDecoder
from advmim_pl.models.vit import MaskedViT


@dataclass
class Mask:
    """One step's mask. patches (B, N) float, 1 = masked; keep (B, K) kept indices (MAE only)."""

    patches: Tensor
    keep: Tensor | None = None

    def select(self, index: Tensor) -> "Mask":
        """The mask of the images ``index`` (k,) picks."""
        return Mask(self.patches[index], None if self.keep is None else self.keep[index])


def _check_ratio(mask_ratio: float) -> None:
    if not 0 < mask_ratio < 1:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")


class MIMMethod(ABC):
    """Interface every host method implements."""

    uses_mask_token: bool = False  # whether ``encode`` needs the encoder's learned mask token
    pooling: str = "token"  # what a classifier of this method's encoder pools by default: "token" (cls) or "avg"

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` that rebuilds this method; every constructor argument is kept as the
        attribute of the same name. PretrainModule stores it in its hyperparameters (and so in checkpoints)."""
        return constructor_config(self)

    @abstractmethod
    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        """A freshly initialised decoder for ``encoder``."""

    @abstractmethod
    def sample_mask(self, encoder: MaskedViT, batch: int, device: torch.device, generator=None) -> Mask:
        """A random mask for ``batch`` images."""

    @abstractmethod
    def full_view(self, encoder: MaskedViT, batch: int, device: torch.device) -> Mask:
        """A mask that hides nothing (every patch visible)."""

    @abstractmethod
    def complement(self, encoder: MaskedViT, mask: Mask) -> Mask:
        """The view that shows exactly the patches ``mask`` hides."""

    @abstractmethod
    def encode(self, encoder: MaskedViT, images: Tensor, mask: Mask) -> Tensor:
        """Images (B, C, H, W) -> token features (B, T, D) under ``mask``."""

    @abstractmethod
    def decode(self, decoder: nn.Module, latent: Tensor, mask: Mask) -> Tensor:
        """Token features -> the method's raw prediction."""

    @abstractmethod
    def loss(
        self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT, norm: TargetNorm = TargetNorm()
    ) -> Tensor:
        """Scalar loss of ``pred`` against the method's targets of ``images`` (B, C, H, W) (pixels, normalised patches,
        features, ...) on the masked patches. A method whose target is normalised per patch follows ``norm``."""

    @abstractmethod
    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """Prediction -> image (B, C, H, W) for display: predicted masked patches, given visible ones."""


class MAE(MIMMethod):
    """Masked autoencoder: encoder on visible patches, transformer decoder, MSE on masked patches."""

    def __init__(
        self,
        mask_ratio: OpenUnitInterval = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: PositiveInt = 512,
        decoder_depth: NonNegativeInt = 8,
        decoder_heads: PositiveInt = 16,
    ) -> None:
        _check_ratio(mask_ratio)
        if decoder_dim % decoder_heads or decoder_dim % 4:
            raise ValueError(f"decoder_dim {decoder_dim} must be divisible by decoder_heads {decoder_heads} and by 4")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads

    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        return MAEDecoder(
            encoder.embed_dim,
            encoder.grid_size,
            encoder.patch_size,
            encoder.in_chans,
            encoder.num_prefix_tokens,
            self.decoder_dim,
            self.decoder_depth,
            self.decoder_heads,
        )

    def sample_mask(self, encoder: MaskedViT, batch: int, device: torch.device, generator=None) -> Mask:
        keep, mask = random_masking(batch, encoder.num_patches, self.mask_ratio, device, generator)
        return Mask(mask, keep)

    def full_view(self, encoder: MaskedViT, batch: int, device: torch.device) -> Mask:
        keep = torch.arange(encoder.num_patches, device=device).expand(batch, -1)
        return Mask(torch.zeros(batch, encoder.num_patches, device=device), keep)

    def complement(self, encoder: MaskedViT, mask: Mask) -> Mask:
        hidden = encoder.num_patches - mask.keep.shape[1]  # the same count for every sample
        keep = mask.patches.argsort(dim=1, descending=True, stable=True)[:, :hidden].sort(dim=1).values
        return Mask(1 - mask.patches, keep)

    def encode(self, encoder: MaskedViT, images: Tensor, mask: Mask) -> Tensor:
        return encoder.forward_visible(images, mask.keep)

    def decode(self, decoder: nn.Module, latent: Tensor, mask: Mask) -> Tensor:
        return decoder(latent, mask.keep)

    def loss(self, pred, images, mask, encoder, norm=TargetNorm()) -> Tensor:
        p = encoder.patch_size
        stats = None if norm.stats_from is None else patchify(norm.stats_from, p)
        return mae_loss(pred, patchify(images, p), mask.patches, self.norm_pix_loss, norm.var_floor, stats)

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        pred = pred.float()
        if self.norm_pix_loss:
            target = patchify(images, encoder.patch_size)
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        pred = unpatchify(pred, encoder.patch_size, encoder.in_chans, encoder.grid_size)
        pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)
        return (images * (1 - pixel_mask) + pred * pixel_mask).clamp(0, 1)


class SimMIM(MIMMethod):
    """SimMIM: mask-token encoding of all patches, block-wise mask, linear decoder, L1 on masked pixels.

    ``mask_patch_size`` is the side of a masked square in pixels (32 at 224 px in the paper); it must be
    a multiple of the encoder's patch size and divide the image size.
    """

    uses_mask_token = True
    pooling = "avg"  # the decoder drops the cls token's output, so no loss reads it (SimMIM pools patch tokens)

    def __init__(self, mask_ratio: OpenUnitInterval = 0.6, mask_patch_size: PositiveInt = 32) -> None:
        _check_ratio(mask_ratio)
        if mask_patch_size <= 0:
            raise ValueError(f"mask_patch_size must be positive, got {mask_patch_size}")
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size

    def _block(self, encoder: MaskedViT) -> int:
        """Mask-square side in patches, after checking it fits the encoder."""
        img_size = encoder.grid_size[0] * encoder.patch_size
        if self.mask_patch_size % encoder.patch_size or img_size % self.mask_patch_size:
            raise ValueError(
                f"mask_patch_size {self.mask_patch_size} must be a multiple of the patch size "
                f"{encoder.patch_size} and divide the image size {img_size}"
            )
        return self.mask_patch_size // encoder.patch_size

    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        self._block(encoder)
        return SimMIMDecoder(
            encoder.embed_dim,
            encoder.grid_size,
            encoder.patch_size,
            encoder.in_chans,
            encoder.num_prefix_tokens,
        )

    def sample_mask(self, encoder: MaskedViT, batch: int, device: torch.device, generator=None) -> Mask:
        mask = block_masking(batch, encoder.grid_size, self._block(encoder), self.mask_ratio, device, generator)
        return Mask(mask)

    def full_view(self, encoder: MaskedViT, batch: int, device: torch.device) -> Mask:
        return Mask(torch.zeros(batch, encoder.num_patches, device=device))

    def complement(self, encoder: MaskedViT, mask: Mask) -> Mask:
        return Mask(1 - mask.patches)

    def encode(self, encoder: MaskedViT, images: Tensor, mask: Mask) -> Tensor:
        return encoder.forward_masked(images, mask.patches)

    def decode(self, decoder: nn.Module, latent: Tensor, mask: Mask) -> Tensor:
        return decoder(latent)

    def loss(self, pred, images, mask, encoder, norm=TargetNorm()) -> Tensor:
        """L1 on raw pixels: the target is not normalised per patch, so ``norm`` does not apply."""
        return simmim_loss(pred, images, upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size))

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)
        return (images * (1 - pixel_mask) + pred.float() * pixel_mask).clamp(0, 1)
