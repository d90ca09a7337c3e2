"""data2vec 2.0 (Baevski, Babu, Hsu, Auli 2022, arXiv:2212.07525) as a host: multi-mask student, EMA teacher.

The pieces (targets, EMA, decoder, losses) and the released settings they follow are in
``advmim_pl.mim.data2vec2_parts``; this module puts them together behind the host contract (docs/method.md, "Adding a
host", and its "data2vec 2.0" section).
"""

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, OpenUnitInterval, PositiveInt
from torch import Tensor, nn

from advmim_pl.checks import require, require_between, require_choice, require_non_negative, require_positive
from advmim_pl.mim.data2vec2_parts import (
    Data2Vec2Decoder,
    branch_aux_entry,
    clean_branch_name,
    cls_loss,
    ema_decay,
    ema_update,
    encode_targets,
    regression_loss,
    repeat_for_masks,
)
from advmim_pl.mim.masking import random_masking
from advmim_pl.mim.methods import Host, Mask, MIMMethod, Perturbed, Progress, paste
from advmim_pl.models.vit import MaskedViT
from advmim_pl.rng import generator_for

TargetTensor = Literal["ffn", "block"]


@dataclass
class MultiMask(Mask):
    """M masks for each of B images: patches (B, M, N) float, 1 = masked; keep (B, M, K) kept indices, sorted.
    ``noise_seed`` seeds the decoder's noise at the masked positions: drawn with the masks from the step's generator,
    so a resumed run decodes with the noise the uninterrupted one used, and the plug-in's auxiliary pass under the
    same masks gets the same noise."""

    noise_seed: int = 0

    def select(self, index: Tensor) -> "MultiMask":
        """The masks of the images ``index`` (k,) picks, all M of each."""
        return MultiMask(self.patches[index], self.keep[index], self.noise_seed)


class Data2Vec2(MIMMethod):
    """data2vec 2.0 for images: a student encodes M masked views of each image (visible patches only, MAE-style); a
    convolutional decoder (``Data2Vec2Decoder``) predicts, at every masked position, the targets an EMA teacher of
    the student computes from the unmasked image: the average of its top ``top_k`` blocks' ``target_tensor``,
    instance-normalised per block and layer-normalised after averaging (``encode_targets``). The loss is
    ``regression_loss`` on the masked positions plus ``cls_weight`` times the class-token loss (``cls_loss``).

    Shapes: a step's B images give a ``MultiMask`` (B, M, ...); ``encode`` -> (B, M, P + K, D) (each image repeated
    M times, ``repeat_for_masks``); ``decode`` -> (B, M, P + N, D), the student's P prefix-token outputs (the class
    token first: the class-token loss's prediction) followed by the decoder's N predictions; ``targets`` -> (B, N, D),
    one teacher pass per image, shared by its M views inside ``loss``. Masks are uniform random per view
    (``mask_ratio``); the paper's inverse block masking is not implemented.

    Teacher (``make_modules``): a copy of the encoder as ``init_from`` loaded it, without gradient (so not in the
    optimizer), run in eval mode. After every optimizer step, ``teacher <- d * teacher + (1 - d) * student``
    (``ema_update``) over the student's clean parameters, pairing by name without the plug-in's auxiliary norms, with
    d = ``ema_decay(updates, ema_anneal_steps, ema_start, ema_end)`` and ``updates`` the updates done before, kept
    in checkpoints (``state_dict``).

    With the AEMIM plug-in: ``HostStep.images`` are the B images, not their B * M views, so the plug-in crafts one x_a
    per image, and ``targets(x_a)`` is one teacher pass per image, shared by its M views: shared are x_a and the
    teacher's targets of it; not shared are the auxiliary branch's student passes, one per view (B * M), as in the
    clean branch. The attack's features (``attack_features``) are the student's final tokens under the attack's view,
    its V views of an image concatenated along the tokens (B, V * (P + K), D): one view for ``attack_mask: none`` (the
    whole image, B passes per PGD step), the step's M masks (or their complements, or M fresh ones) otherwise
    (B * M passes per PGD step). ``Perturbed`` changes nothing: the teacher's features of x_a are the targets.

    Args (released: the value of the authors' ViT-B image config, ``base_images_only_task.yaml``):
        num_masks: M, masked views per image (released: 16; ``clone_batch`` of the released config).
        mask_ratio: fraction of patches hidden in each view (released: 0.8).
        top_k: teacher blocks averaged into the targets, the last ones (released: 10 of ViT-B's 12); at most the depth.
        target_tensor: ``ffn``, each block's feed-forward output before its last residual (the released config's), or
            ``block``, the block's output (``MaskedViT.forward_blocks``).
        decoder_dim: channels of the decoder's convolutions (released: 768).
        decoder_depth: convolution layers of the decoder (released: 6).
        decoder_kernel: odd kernel side of those convolutions (released: 3).
        decoder_groups: convolution groups; divides ``decoder_dim`` and the encoder's width (released: 16).
        mask_noise_std: std of the noise the decoder puts at masked positions (released: 0.01).
        ema_start: teacher EMA decay at the first update (released: 0.9998).
        ema_end: decay from ``ema_anneal_steps`` updates on (released: 0.99999).
        ema_anneal_steps: updates over which the decay rises linearly (released: 100,000).
        cls_weight: weight of the class-token loss (released: 0.01), on its sum over the step's B * M views, as the
            released code scales it (``cls_loss``'s docstring); 0 turns it off. Needs an encoder with a class token.
    """

    def __init__(
        self,
        num_masks: PositiveInt = 16,
        mask_ratio: OpenUnitInterval = 0.8,
        top_k: PositiveInt = 10,
        target_tensor: TargetTensor = "ffn",
        decoder_dim: PositiveInt = 768,
        decoder_depth: PositiveInt = 6,
        decoder_kernel: PositiveInt = 3,
        decoder_groups: PositiveInt = 16,
        mask_noise_std: NonNegativeFloat = 0.01,
        ema_start: ClosedUnitInterval = 0.9998,
        ema_end: ClosedUnitInterval = 0.99999,
        ema_anneal_steps: PositiveInt = 100_000,
        cls_weight: NonNegativeFloat = 0.01,
    ) -> None:
        require_positive(num_masks=num_masks, top_k=top_k, decoder_dim=decoder_dim, decoder_depth=decoder_depth)
        require_positive(decoder_groups=decoder_groups, ema_anneal_steps=ema_anneal_steps)
        require_between(0, 1, "()", mask_ratio=mask_ratio)
        require_between(0, 1, "[]", ema_start=ema_start, ema_end=ema_end)
        require_non_negative(mask_noise_std=mask_noise_std, cls_weight=cls_weight)
        require_choice(TargetTensor, target_tensor=target_tensor)
        require(decoder_kernel > 0 and decoder_kernel % 2 == 1, "decoder_kernel", decoder_kernel, "odd (e.g. 3)")
        require(decoder_dim % decoder_groups == 0, "decoder_dim", decoder_dim, f"a multiple of {decoder_groups}")
        self.num_masks, self.mask_ratio, self.top_k, self.target_tensor = num_masks, mask_ratio, top_k, target_tensor
        self.decoder_dim, self.decoder_depth = decoder_dim, decoder_depth
        self.decoder_kernel, self.decoder_groups, self.mask_noise_std = decoder_kernel, decoder_groups, mask_noise_std
        self.ema_start, self.ema_end, self.ema_anneal_steps = ema_start, ema_end, ema_anneal_steps
        self.cls_weight = cls_weight
        self.updates = 0  # teacher updates done: the EMA schedule's position, kept in checkpoints

    # ---- what the host builds -------------------------------------------------------------------------
    def make_decoder(self, encoder: MaskedViT) -> nn.Module:
        depth = len(encoder.vit.blocks)
        require(self.top_k <= depth, "top_k", self.top_k, f"at most the encoder's depth {depth}")
        has_cls = getattr(encoder.vit, "cls_token", None) is not None
        require(has_cls or self.cls_weight == 0, "cls_weight", self.cls_weight, "0 for an encoder without class token")
        return Data2Vec2Decoder(
            encoder.embed_dim,
            encoder.grid_size,
            encoder.num_prefix_tokens,
            self.decoder_dim,
            self.decoder_depth,
            self.decoder_kernel,
            self.decoder_groups,
            mask_noise_std=self.mask_noise_std,
        )

    def make_modules(self, encoder: MaskedViT) -> dict[str, nn.Module]:
        """The teacher: a copy of the encoder (as loaded, before the plug-in's branch norms), without gradient."""
        return {"teacher": copy.deepcopy(encoder).requires_grad_(False)}

    # ---- masks and passes -------------------------------------------------------------------------------
    def sample_mask(self, encoder: MaskedViT, batch: int, device: torch.device, generator=None) -> MultiMask:
        """``num_masks`` uniform random masks per image, then the decoder's noise seed, all from ``generator``."""
        keep, mask = random_masking(batch * self.num_masks, encoder.num_patches, self.mask_ratio, device, generator)
        source = device if generator is None else generator.device
        seed = int(torch.randint(2**62, (1,), device=source, generator=generator))
        views = (batch, self.num_masks)
        return MultiMask(mask.unflatten(0, views), keep.unflatten(0, views), seed)

    def full_view(self, encoder: MaskedViT, batch: int, device: torch.device) -> MultiMask:
        """One view per image that hides nothing: patches (B, 1, N) zeros, keep (B, 1, N)."""
        n = encoder.num_patches
        keep = torch.arange(n, device=device).expand(batch, 1, n)
        return MultiMask(torch.zeros(batch, 1, n, device=device), keep)

    def complement(self, encoder: MaskedViT, mask: Mask) -> MultiMask:
        """Each view's complement: the patches it hides, and only those, visible."""
        hidden = encoder.num_patches - mask.keep.shape[-1]  # the same count for every view
        keep = mask.patches.argsort(dim=-1, descending=True, stable=True)[..., :hidden].sort(dim=-1).values
        return MultiMask(1 - mask.patches, keep, mask.noise_seed)

    def encode(self, encoder: MaskedViT, images: Tensor, mask: Mask) -> Tensor:
        """Images (B, C, H, W) under V views (B, V, ...) -> (B, V, P + K, D): each image repeated V times."""
        b, v = mask.keep.shape[:2]
        latent = encoder.forward_visible(repeat_for_masks(images, v), mask.keep.flatten(0, 1))
        return latent.unflatten(0, (b, v))

    def decode(self, decoder: nn.Module, latent: Tensor, mask: Mask) -> Tensor:
        """(B, M, P + K, D) -> (B, M, P + N, D): the P prefix-token outputs, then the decoder's N predictions, the
        masked positions' noise drawn from ``mask.noise_seed``."""
        noise = generator_for(latent.device).manual_seed(mask.noise_seed)
        pred = decoder(latent.flatten(0, 1), mask.keep.flatten(0, 1), noise).unflatten(0, latent.shape[:2])
        prefix = latent[:, :, : decoder.num_prefix_tokens]
        return torch.cat([prefix.to(pred.dtype), pred], dim=2)

    def attack_features(self, host: Host, images: Tensor, view: Mask) -> Tensor:
        """The student's final tokens of images (B, C, H, W) under the V views of ``view``, concatenated per image
        along the tokens: (B, V * (P + K), D), so that a per-image distance averages over the views."""
        return self.encode(host.encoder, images, view).flatten(1, 2)

    # ---- targets and loss ---------------------------------------------------------------------------------
    def targets(self, host: Host, images: Tensor, perturbed: Perturbed | None = None) -> Tensor:
        """The teacher's targets (B, N, D) fp32 of the unmasked images (B, C, H, W), in eval mode and without
        gradient (``encode_targets``); for the plug-in's x_a the teacher's features of x_a (``perturbed`` unused)."""
        teacher = host.modules["teacher"]
        mode = teacher.training
        teacher.eval()
        try:
            return encode_targets(teacher, images, self.top_k, self.target_tensor)
        finally:
            teacher.train(mode)

    def loss(self, pred: Tensor, targets: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """``regression_loss`` of the N predictions of each of the B * M views against its image's targets (B, N, D)
        at its masked positions, plus ``cls_weight`` times the sum over the views of the class-token loss."""
        b, m = mask.patches.shape[:2]
        rows, shared = pred.flatten(0, 1), repeat_for_masks(targets, m)
        loss = regression_loss(rows[:, encoder.num_prefix_tokens :], shared, mask.patches.flatten(0, 1))
        if self.cls_weight > 0:
            loss = loss + self.cls_weight * b * m * cls_loss(rows[:, 0], shared)
        return loss

    def to_image(self, pred: Tensor, images: Tensor, mask: Mask, encoder: MaskedViT) -> Tensor:
        """The images with the patches the first of their M masks hides in grey (0.5): the predictions are teacher
        features, which have no picture."""
        first = Mask(mask.patches[:, 0])
        return paste(images, torch.full_like(images, 0.5), first, encoder)

    # ---- per-step hook and checkpoint state -----------------------------------------------------------------
    def after_optimizer_step(self, host: Host, progress: Progress) -> None:
        """The teacher's EMA update toward the student's clean parameters (buffers copied), decay by ``ema_decay``."""
        decay = ema_decay(self.updates, self.ema_anneal_steps, self.ema_start, self.ema_end)
        ema_update(host.modules["teacher"], host.encoder, decay, skip=branch_aux_entry, rename=clean_branch_name)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
