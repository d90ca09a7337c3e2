"""data2vec 2.0 for images (Baevski, Babu, Hsu, Auli 2022, arXiv:2212.07525): the pieces that the
host ``advmim_pl.mim.data2vec2.Data2Vec2`` puts together.

A student encoder sees M masked versions of each image ("multi-mask"); a teacher, an exponential moving average (EMA)
of the student, encodes the unmasked image once; a light convolutional decoder predicts, from the student's visible
tokens, the teacher's contextualised targets at the masked positions, with an L2 loss. The pieces here:

- ``encode_targets`` / ``teacher_targets``: the targets from the teacher's top-K blocks;
- ``ema_decay`` / ``ema_update``: the teacher's schedule and update;
- ``Data2Vec2Decoder``: the convolutional decoder;
- ``repeat_for_masks``: one image's targets shared by its M masked versions;
- ``regression_loss`` / ``cls_loss``: the losses.

The settings are those of the released data2vec 2.0 ViT-B image config (``base_images_only_task.yaml`` of the authors'
data2vec 2.0 code) and are named as such below: top K = 10 of 12 blocks,
the feed-forward output before the last residual as each block's target tensor (the released model's blocks are
post-norm; in timm's pre-norm blocks the same branch is ``ls2(mlp(norm2(h)))``), instance norm per block, then a layer
norm of the average, EMA decay 0.9998 -> 0.99999 over the first 100k of 375,300 updates, M = 16 masks per image, a
decoder of 6 convolutions (kernel 3, 16 groups, 768 channels), masked positions filled with N(0, 0.01^2) noise, and a
class-token loss of weight 0.01. Its masking (inverse block masking, mask_prob 0.8, mask_length 3) is not here: the
pieces take any keep indices and (B, N) masks.
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advmim_pl.checks import require_non_negative, require_positive
from advmim_pl.models.vit import MaskedViT


def teacher_targets(layer_outputs: Sequence[Tensor], final_norm: bool = True) -> Tensor:
    """Targets from the teacher's top-K block outputs: K tensors (B, N, D) of patch tokens (no prefix tokens) ->
    (B, N, D), float32.

    Each block's output is instance-normalised: per sample and channel, over the N tokens, ``(y - mean) /
    sqrt(var + 1e-5)`` with the biased variance and no affine parameters (``F.instance_norm`` on (B, D, N)). The K are
    averaged, and with ``final_norm`` the average is layer-normalised over the D channels of each token (no affine,
    eps 1e-5). That is the released image config's ``instance_norm_target_layer: true``, ``layer_norm_targets: true``
    (and ``layer_norm_target_layer: false``: no layer norm per block)."""
    if not layer_outputs:
        raise ValueError("layer_outputs is empty: give the outputs of at least one teacher block")
    shape = layer_outputs[0].shape
    if len(shape) != 3 or any(y.shape != shape for y in layer_outputs):
        raise ValueError(
            f"layer outputs must all be (B, N, D) of one shape; got {[tuple(y.shape) for y in layer_outputs]}"
        )
    if shape[1] < 2:
        raise ValueError(f"instance norm over tokens needs at least 2 tokens, got N={shape[1]}")
    total = sum(F.instance_norm(y.float().transpose(1, 2)).transpose(1, 2) for y in layer_outputs)
    average = total / len(layer_outputs)
    return F.layer_norm(average, average.shape[-1:]) if final_norm else average


@torch.no_grad()
def encode_targets(
    teacher: MaskedViT,
    images: Tensor,
    top_k: int = 10,
    tensor: Literal["block", "ffn"] = "ffn",
    final_norm: bool = True,
) -> Tensor:
    """The teacher's targets of unmasked images (B, C, H, W) in [0, 1] -> (B, N, D) float32, without gradient.

    The teacher encodes every patch; the outputs of its last ``top_k`` blocks (``MaskedViT.forward_blocks``; by
    default the feed-forward output before each block's last residual connection, data2vec's target tensor) lose
    their prefix tokens and go through ``teacher_targets``. Put the teacher in eval mode first, as the released code
    does (no stochastic depth or dropout in the targets)."""
    outputs = teacher.forward_blocks(images, top_k, tensor=tensor)
    return teacher_targets([y[:, teacher.num_prefix_tokens :] for y in outputs], final_norm)


def repeat_for_masks(x: Tensor, num_masks: int) -> Tensor:
    """Each sample repeated ``num_masks`` times, copies adjacent: (B, ...) -> (B * M, ...), row ``b * M + m`` is
    sample ``b``. Used on the images the student encodes (each copy gets its own mask) and on the teacher's targets
    (B, N, D), which the M masked versions of an image share: the teacher runs once per image, not per mask."""
    require_positive(num_masks=num_masks)
    return x.repeat_interleave(num_masks, dim=0)


def ema_decay(step: int, total: int, start: float = 0.9998, end: float = 0.99999) -> float:
    """The teacher's EMA decay at optimizer step ``step``: linear from ``start`` at step 0 to ``end`` at step
    ``total``, then ``end``, as the released code anneals it. The defaults are the values of the released ViT-B image
    config, whose ``total`` (``ema_anneal_end_step``) is 100,000 of its 375,300 updates, not the whole run."""
    require_positive(total=total)
    require_non_negative(step=step)
    for name, value in (("start", start), ("end", end)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} decay must be in [0, 1], got {value}")
    if step >= total:
        return end
    return start + (end - start) * step / total


def branch_aux_entry(name: str) -> bool:
    """``skip`` for ``ema_update`` when the student carries the AEMIM plug-in's ``BranchNorm`` layers: their
    auxiliary copies (a ``aux`` name segment), which the teacher, an encoder of the clean branch, does not have."""
    return "aux" in name.split(".")


def clean_branch_name(name: str) -> str:
    """``rename`` for ``ema_update`` with such a student: a clean copy's name without its ``clean`` segment, which is
    the plain encoder's name (as ``clean_state_dict`` maps checkpoints)."""
    return ".".join(part for part in name.split(".") if part != "clean")


@torch.no_grad()
def ema_update(
    teacher: nn.Module,
    student: nn.Module,
    decay: float,
    skip: Callable[[str], bool] | None = None,
    rename: Callable[[str], str] | None = None,
) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student``, in place, for every parameter; buffers (running
    statistics) are copied from the student.

    Entries pair by name: the student's ``name`` is the teacher's ``rename(name)`` (default: the same name). Student
    entries for which ``skip(name)`` is true are left out (e.g. ``branch_aux_entry``: the plug-in's auxiliary norms).
    Every other entry of either module must have a partner of the same shape, else a ValueError names it: a teacher
    entry without a student partner would silently stop following the student."""
    if not 0 <= decay <= 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    skip = skip or (lambda name: False)
    rename = rename or (lambda name: name)
    for kind, teacher_entries, student_entries in (
        ("parameter", dict(teacher.named_parameters()), student.named_parameters()),
        ("buffer", dict(teacher.named_buffers()), student.named_buffers()),
    ):
        pairs = {}
        for name, value in student_entries:
            if skip(name):
                continue
            target = rename(name)
            if target not in teacher_entries:
                raise ValueError(
                    f"student {kind} {name!r} has no teacher {kind} {target!r}; pass skip= to leave it out"
                )
            pairs[target] = value
        missing = sorted(set(teacher_entries) - set(pairs))
        if missing:
            raise ValueError(f"teacher {kind} {missing[0]!r} has no student partner ({len(missing)} such entries)")
        for target, value in pairs.items():
            mine = teacher_entries[target]
            if mine.shape != value.shape:
                raise ValueError(
                    f"teacher {kind} {target!r} is {tuple(mine.shape)}, the student's {tuple(value.shape)}"
                )
            if kind == "buffer" or not mine.is_floating_point():
                mine.copy_(value)
            else:
                mine.lerp_(value.to(mine.dtype), 1 - decay)


class ConvLayer(nn.Module):
    """One decoder layer on a token grid (B, C_in, h, w) -> (B, C_out, h, w): a grouped ``kernel`` x ``kernel``
    convolution (same padding), a layer norm over channels without affine parameters (eps 1e-5), GELU, and the
    layer's input added back when ``C_in == C_out``."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2, groups=groups)
        self.residual = in_dim == out_dim

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        y = F.gelu(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2]).permute(0, 3, 1, 2))
        return x + y if self.residual else y


class Data2Vec2Decoder(nn.Module):
    """data2vec 2.0's convolutional decoder for images.

    Student token features (B, P + K, D_enc) (P prefix tokens, dropped) and keep indices (B, K) -> predictions
    (B, N, D_target) at every position of the (h, w) patch grid. The K visible tokens are scattered into the grid;
    the masked positions get ``N(0, mask_noise_std^2)`` noise (zeros with 0), no learned token and no positions, as
    in the released code (the convolutions see where a token sits). The grid (B, D_enc, h, w), row-major as the
    patches, goes through ``depth`` ``ConvLayer``s of ``decoder_dim`` channels (the first adds no residual when
    ``D_enc != decoder_dim``) and a linear projection to ``target_dim`` (default ``D_enc``). Without ``keep`` the
    latent already holds all N tokens (a mask-token encoding). Released image config (ViT-B): 6 layers, kernel 3,
    16 groups, 768 channels, noise std 0.01. ``set_grid`` follows progressive resolution; the weights do not depend
    on the grid.
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int = 1,
        decoder_dim: int = 768,
        depth: int = 6,
        kernel: int = 3,
        groups: int = 16,
        target_dim: int | None = None,
        mask_noise_std: float = 0.01,
    ) -> None:
        super().__init__()
        require_positive(embed_dim=embed_dim, decoder_dim=decoder_dim, depth=depth, kernel=kernel, groups=groups)
        require_non_negative(num_prefix_tokens=num_prefix_tokens, mask_noise_std=mask_noise_std)
        if kernel % 2 == 0:
            raise ValueError(f"kernel {kernel} must be odd (same padding keeps the grid), e.g. {kernel + 1}")
        if embed_dim % groups or decoder_dim % groups:
            raise ValueError(f"groups {groups} must divide embed_dim {embed_dim} and decoder_dim {decoder_dim}")
        self.num_prefix_tokens, self.mask_noise_std = num_prefix_tokens, mask_noise_std
        self.grid_size = tuple(grid_size)
        dims = [embed_dim] + [decoder_dim] * depth
        self.layers = nn.Sequential(
            *[ConvLayer(a, b, kernel, groups) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.proj = nn.Linear(decoder_dim, target_dim or embed_dim)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Decode a patch grid of ``grid_size`` from now on (progressive resolution)."""
        self.grid_size = tuple(grid_size)

    def forward(self, latent: Tensor, keep: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        tokens = latent[:, self.num_prefix_tokens :]
        (h, w), (b, k, d) = self.grid_size, tokens.shape
        if keep is None:
            if k != h * w:
                raise ValueError(f"{k} tokens without keep indices do not fill the {h}x{w} grid ({h * w} patches)")
            full = tokens
        else:
            if keep.shape != (b, k):
                raise ValueError(f"keep is {tuple(keep.shape)}, expected ({b}, {k}) for {k} visible tokens")
            if self.mask_noise_std > 0:
                noise = torch.randn(b, h * w, d, generator=generator, device=tokens.device, dtype=tokens.dtype)
                full = noise * self.mask_noise_std
            else:
                full = tokens.new_zeros(b, h * w, d)
            full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, d), tokens)
        fmap = self.layers(full.transpose(1, 2).reshape(b, d, h, w))
        return self.proj(fmap.flatten(2).transpose(1, 2))


def regression_loss(pred: Tensor, target: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """L2 regression of the teacher's targets at the masked positions: pred, target (B, N, D), mask (B, N) 1 = masked
    -> a scalar (fp32), the mean over masked positions of ``scale * sum_d (pred - target)^2``.

    ``scale`` defaults to ``1 / sqrt(D)``, as the released code (``loss_scale: null``); the loss per masked token
    summed over channels and averaged over masked tokens is how its criterion normalises (by the masked-token count).
    With M masks per image pass the repeated targets (``repeat_for_masks``) and the (B * M, N) masks."""
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must be one (B, N, D) shape")
    if mask.shape != pred.shape[:2]:
        raise ValueError(f"mask is {tuple(mask.shape)}, expected {tuple(pred.shape[:2])} (1 = masked)")
    scale = 1 / math.sqrt(pred.shape[-1]) if scale is None else scale
    per_token = (pred.float() - target.float()).square().sum(dim=-1) * scale
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def cls_loss(cls_pred: Tensor, targets: Tensor, scale: float | None = None) -> Tensor:
    """The class-token loss: the student's class token (B, D) regresses the mean over tokens of its image's targets
    (B, N, D) -> a scalar (fp32), the mean over samples of ``scale * sum_d (pred - mean target)^2``, ``scale``
    defaulting to ``1 / sqrt(D)``. The released image config's weight 0.01 multiplies a sum over the B * M rows of a
    GPU's batch (its criterion scales the term by the masked-token count that the gradient is later divided by), so
    by our reading it amounts to a weight of ``0.01 * B * M`` (B per GPU: 16 * 16 there) on this mean."""
    if targets.dim() != 3 or cls_pred.shape != (targets.shape[0], targets.shape[2]):
        raise ValueError(
            f"cls_pred {tuple(cls_pred.shape)} must be (B, D) for targets (B, N, D) {tuple(targets.shape)}"
        )
    scale = 1 / math.sqrt(cls_pred.shape[-1]) if scale is None else scale
    return ((cls_pred.float() - targets.float().mean(dim=1)).square().sum(dim=-1) * scale).mean()
