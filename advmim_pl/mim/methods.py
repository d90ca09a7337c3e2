"""The host contract (``MIMMethod``, ``Host``) and two hosts, MAE and SimMIM.

A host holds its hyperparameters and maps (encoder, images, mask) to a loss. PretrainModule builds the encoder and asks
the host for the rest: its decoder, the modules it owns (a teacher, a target encoder, a tokenizer), its step, a hook
after every optimizer step (an EMA update) and its checkpoint state. The AEMIM plug-in sees a host only through
``Host``, the method bound to the module's networks: masks, passes, and the host's targets of any images.
docs/method.md ("Adding a host") is the page to read before writing one.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, OpenUnitInterval, PositiveInt
from torch import Tensor, nn

from advmim_pl.checks import (
    constructor_config,
    require,
    require_between,
    require_choice,
    require_non_negative,
    require_positive,
)
from advmim_pl.mim.losses import mae_loss, normalize_patches, patchify, simmim_loss, unpatchify, upsample_mask
from advmim_pl.mim.masking import block_masking, random_masking
from advmim_pl.models.decoders import MAEDecoder, SimMIMDecoder
from advmim_pl.models.vit import MaskedViT

AuxTargetNorm = Literal["floor", "clean", "patch"]


@dataclass
class Mask:
    """One step's mask. patches (B, N) float, 1 = masked; keep (B, K) kept indices (MAE only)."""

    patches: Tensor
    keep: Tensor | None = None

    def select(self, index: Tensor) -> "Mask":
        """The mask of the images ``index`` (k,) picks."""
        return Mask(self.patches[index], None if self.keep is None else self.keep[index])


@dataclass(frozen=True)
class Perturbed:
    """What the plug-in says about the images whose targets it asks for: they lie within an L-inf ball of ``eps``
    (pixel units) around ``clean`` (B, C, H, W). A host whose targets react to a perturbation's size reads it (MAE's
    per-patch normalisation); the others ignore it."""

    clean: Tensor
    eps: float


@dataclass(frozen=True)
class Progress:
    """Where training stands at the per-step hook: optimizer steps done (this one included) and the run's total."""

    step: int
    total_steps: int


@dataclass
class HostStep:
    """One step of a host: the images it trained on (B, C, H, W), its mask, the clean latent (B, T, D), the decoder's
    prediction, the targets and the loss () fp32."""

    images: Tensor
    mask: Mask
    latent: Tensor
    pred: Tensor
    targets: Tensor
    loss: Tensor


class MIMMethod(ABC):
    """What every host implements (abstract), and the hooks it may override (their defaults do nothing)."""

    uses_mask_token: bool = False  # whether ``encode`` needs the encoder's learned mask token
    pooling: str = "token"  # what a classifier of this method's encoder pools by default: "token" (cls) or "avg"

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` that rebuilds this method; every constructor argument is kept as the
        attribute of the same name. PretrainModule stores it in its hyperparameters (and so in checkpoints)."""
        return constructor_config(self)

    # ---- what the host builds -----------------------------------------------------------------------
    @abstractmethod
    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        """A freshly initialised decoder for ``encoder``. The plug-in's auxiliary decoder is another one (or a copy)."""

    def make_modules(self, encoder: MaskedViT) -> dict[str, nn.Module]:
        """The modules the host owns besides its decoder (a teacher, a target encoder, a tokenizer), made from the
        encoder as loaded by ``init_from`` and before the plug-in adds its branch norms. PretrainModule keeps them in
        ``host_modules``: checkpoints hold them, and the optimizer trains those of their parameters that require a
        gradient. An EMA teacher pairs its parameters with ``branch_norm.clean_named_parameters(encoder)``."""
        return {}

    # ---- masks and passes ---------------------------------------------------------------------------
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

    def attack_features(self, host: "Host", images: Tensor, view: Mask) -> Tensor:
        """The features (B, T, D) of images (B, C, H, W) under ``view`` that the plug-in's attack objective compares
        (the adversarial ones under the auxiliary branch, the clean target without gradient). Default: ``encode``."""
        return self.encode(host.encoder, images, view)

    # ---- targets and loss ---------------------------------------------------------------------------
    @abstractmethod
    def targets(self, host: "Host", images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        """The method's targets of images (B, C, H, W) in [0, 1], without gradient: pixels, normalised patches,
        features, ... ``perturbed`` (from the plug-in) says that ``images`` are a perturbation of clean ones."""

    @abstractmethod
    def loss(self, pred: Tensor, targets: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """Scalar loss () fp32 of ``pred`` against ``targets`` on the masked patches."""

    def step(self, host: "Host", images: Tensor, generator: torch.Generator | None = None) -> HostStep:
        """One step: a mask from ``generator``, the clean pass, the targets and the loss. A host that masks several
        copies of an image overrides it and returns the images its mask and latent belong to."""
        mask = host.sample_mask(images.shape[0], images.device, generator)
        latent = host.encode(images, mask)
        pred = host.decode(latent, mask)
        targets = host.targets(images)
        return HostStep(images, mask, latent, pred, targets, host.loss(pred, targets, mask))

    @abstractmethod
    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """Prediction -> image (B, C, H, W) for display: predicted masked patches, given visible ones."""

    # ---- per-step hook and checkpoint state -----------------------------------------------------------
    def after_optimizer_step(self, host: "Host", progress: Progress) -> None:
        """Runs after every optimizer step (an EMA teacher's update, with its schedule read from ``progress``)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The host's own state besides its modules' tensors (counters, schedules), saved in checkpoints as plain
        values and restored on resume by ``load_state_dict``."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        return None


@dataclass
class Host:
    """A host method bound to a module's networks: the encoder (shared by both branches), the decoder of the branch at
    hand (the clean one, or the plug-in's auxiliary one: ``with_decoder``) and the modules the host owns. Everything
    the plug-in does to a host goes through it."""

    method: MIMMethod
    encoder: MaskedViT
    decoder: nn.Module
    modules: nn.ModuleDict

    def with_decoder(self, decoder: nn.Module) -> "Host":
        return replace(self, decoder=decoder)

    def networks(self) -> nn.ModuleList:
        """Every network of the host, for a mode switch (the attack runs them in eval mode)."""
        return nn.ModuleList([self.encoder, self.decoder, self.modules])

    def sample_mask(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> Mask:
        return self.method.sample_mask(self.encoder, batch, device, generator)

    def full_view(self, batch: int, device: torch.device) -> Mask:
        return self.method.full_view(self.encoder, batch, device)

    def complement(self, mask: Mask) -> Mask:
        return self.method.complement(self.encoder, mask)

    def encode(self, images: Tensor, mask: Mask) -> Tensor:
        return self.method.encode(self.encoder, images, mask)

    def decode(self, latent: Tensor, mask: Mask) -> Tensor:
        return self.method.decode(self.decoder, latent, mask)

    def attack_features(self, images: Tensor, view: Mask) -> Tensor:
        return self.method.attack_features(self, images, view)

    def targets(self, images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        return self.method.targets(self, images, perturbed)

    def loss(self, pred: Tensor, targets: Tensor, mask: Mask) -> Tensor:
        return self.method.loss(pred, targets, mask, self.encoder)

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask) -> Tensor:
        return self.method.to_image(pred, images, mask, self.encoder)


def paste(images: Tensor, fill: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
    """images (B, C, H, W) with the masked patches taken from ``fill`` (B, C, H, W), clamped to [0, 1]."""
    pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)
    return (images * (1 - pixel_mask) + fill.float() * pixel_mask).clamp(0, 1)


class MAE(MIMMethod):
    """Masked autoencoder: encoder on visible patches, transformer decoder, MSE on masked patches.

    ``aux_target_norm`` and ``aux_norm_floor`` say how the per-patch normalisation (``norm_pix_loss``) treats the
    targets of a perturbed image (the plug-in's x_a, ``Perturbed``): ``floor``, the target patch's own statistics with
    a variance floor of ``(aux_norm_floor * eps)^2``, so an eps-sized perturbation of a flat patch stays about
    ``1 / aux_norm_floor`` in size instead of becoming unit-variance noise; ``clean``, the clean patch's statistics
    with the same floor; ``patch``, MAE's plain normalisation. Without the plug-in they do nothing.
    """

    def __init__(
        self,
        mask_ratio: OpenUnitInterval = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: PositiveInt = 512,
        decoder_depth: NonNegativeInt = 8,
        decoder_heads: PositiveInt = 16,
        aux_target_norm: AuxTargetNorm = "floor",
        aux_norm_floor: NonNegativeFloat = 2.0,
    ) -> None:
        require_between(0, 1, "()", mask_ratio=mask_ratio)
        divisible = decoder_dim % decoder_heads == 0 and decoder_dim % 4 == 0
        require(divisible, "decoder_dim", decoder_dim, f"divisible by decoder_heads ({decoder_heads}) and by 4")
        require_choice(AuxTargetNorm, aux_target_norm=aux_target_norm)
        require_non_negative(aux_norm_floor=aux_norm_floor)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_dim, self.decoder_depth, self.decoder_heads = decoder_dim, decoder_depth, decoder_heads
        self.aux_target_norm, self.aux_norm_floor = aux_target_norm, aux_norm_floor

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

    def targets(self, host: Host, images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        """Pixel patches (B, N, p*p*C) fp32, with ``norm_pix_loss`` normalised per patch (``normalize_patches``);
        for a ``perturbed`` image as ``aux_target_norm`` says."""
        p = host.encoder.patch_size
        target = patchify(images, p).float()
        if not self.norm_pix_loss:
            return target
        if perturbed is None or self.aux_target_norm == "patch":
            return normalize_patches(target)
        stats = patchify(perturbed.clean, p) if self.aux_target_norm == "clean" else None
        return normalize_patches(target, (self.aux_norm_floor * perturbed.eps) ** 2, stats)

    def loss(self, pred: Tensor, targets: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        return mae_loss(pred, targets, mask.patches, norm_pix=False)

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        pred = pred.float()
        if self.norm_pix_loss:
            target = patchify(images, encoder.patch_size)
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        return paste(images, unpatchify(pred, encoder.patch_size, encoder.in_chans, encoder.grid_size), mask, encoder)


class SimMIM(MIMMethod):
    """SimMIM: mask-token encoding of all patches, block-wise mask, linear decoder, L1 on masked pixels.

    ``mask_patch_size`` is the side of a masked square in pixels (32 at 224 px in the paper); it must be
    a multiple of the encoder's patch size and divide the image size.
    """

    uses_mask_token = True
    pooling = "avg"  # the decoder drops the cls token's output, so no loss reads it (SimMIM pools patch tokens)

    def __init__(self, mask_ratio: OpenUnitInterval = 0.6, mask_patch_size: PositiveInt = 32) -> None:
        require_between(0, 1, "()", mask_ratio=mask_ratio)
        require_positive(mask_patch_size=mask_patch_size)
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size

    def _block(self, encoder: MaskedViT) -> int:
        """Mask-square side in patches, after checking it fits the encoder."""
        p, img_size = encoder.patch_size, encoder.grid_size[0] * encoder.patch_size
        fits = self.mask_patch_size % p == 0 and img_size % self.mask_patch_size == 0
        expected = f"a multiple of the patch size {p} that divides the image size {img_size}"
        require(fits, "mask_patch_size", self.mask_patch_size, expected)
        return self.mask_patch_size // p

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

    def targets(self, host: Host, images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        """The pixels themselves (B, C, H, W): not normalised, so a perturbation's size changes nothing."""
        return images

    def loss(self, pred: Tensor, targets: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """L1 on the masked pixels."""
        return simmim_loss(pred, targets, upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size))

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        return paste(images, pred, mask, encoder)
