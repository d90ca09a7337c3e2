"""Masked-encoding wrapper around any timm VisionTransformer."""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from advmim_pl.models.checkpointing import run_blocks
from advmim_pl.models.normalize import Normalize
from advmim_pl.models.pos_embed import sincos_2d
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD

ARCHITECTURE = ("encoder", "img_size", "patch_size", "in_chans", "mean", "std", "sincos_pos_embed", "encoder_kwargs")


def timm_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` arguments of the plain timm ViT behind a module with these ``ARCHITECTURE`` settings
    (its hyperparameters), without a classifier head."""
    return {
        "model_name": settings["encoder"],
        "num_classes": 0,
        "img_size": settings["img_size"],
        "patch_size": settings["patch_size"],
        "in_chans": settings["in_chans"],
        **(settings.get("encoder_kwargs") or {}),
    }


class MaskedViT(nn.Module):
    """A timm ViT (``self.vit``) behind a pixel-space ``Normalize``, with two masked encodings.

    - ``forward_visible``: MAE-style, the transformer sees only the kept patch tokens.
    - ``forward_masked``: SimMIM-style, masked patch embeddings are replaced by a learned mask token
      (built only with ``mask_token=True``, so that methods which never use it leave no unused parameter).

    Inputs are images in [0, 1], (B, C, H, W). Outputs are final-norm token features (B, P + N, D),
    P prefix (cls) tokens first. ``self.vit`` stays a plain timm model, so its ``state_dict`` loads into
    ``timm.create_model(name, num_classes=0, img_size=..., patch_size=..., in_chans=...)``.
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_path_rate: float = 0.0,
        sincos_pos_embed: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        mask_token: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}: "
                f"choose a patch size that divides the image size (e.g. {_divisors(img_size)})"
            )
        if len(mean) != in_chans:
            raise ValueError(f"mean/std have {len(mean)} channels but in_chans is {in_chans}")
        vits = timm.list_models(module="vision_transformer")
        if name not in vits:
            examples = [m for m in vits if m.endswith("patch16_224")][:5]
            raise ValueError(f"encoder {name!r} is not a timm VisionTransformer model name; e.g. {examples}")
        self.normalize = Normalize(mean, std)
        self.vit = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            **(model_kwargs or {}),
        )
        if not isinstance(self.vit, VisionTransformer) or self.vit.pos_embed is None:
            raise ValueError(f"{name!r} is not a timm VisionTransformer with absolute position embeddings")
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim)) if mask_token else None
        self.sincos_pos_embed, self.base_grid = sincos_pos_embed, self.grid_size
        self._init_weights(sincos_pos_embed)

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], drop_path_rate: float = 0.0, mask_token: bool = False, **model_kwargs
    ) -> "MaskedViT":
        """The encoder of a module whose hyperparameters ``settings`` hold the ``ARCHITECTURE`` keys; ``model_kwargs``
        are added to its ``encoder_kwargs`` (e.g. ``global_pool``). The one place settings become an encoder."""
        return cls(
            settings["encoder"],
            settings["img_size"],
            settings["patch_size"],
            settings["in_chans"],
            settings["mean"],
            settings["std"],
            drop_path_rate,
            settings.get("sincos_pos_embed", True),
            {**(settings.get("encoder_kwargs") or {}), **model_kwargs},
            mask_token,
        )

    def _init_weights(self, sincos_pos_embed: bool) -> None:
        """MAE init: xavier-uniform linears and patch projection, normal(0.02) tokens, fixed sin-cos."""
        for module in self.vit.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        for token in (self.vit.cls_token, self.vit.reg_token, self.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)
        if sincos_pos_embed:
            prefix = 0 if self.vit.no_embed_class else self.num_prefix_tokens
            table = sincos_2d(self.embed_dim, self.grid_size, prefix)
            self.vit.pos_embed.data.copy_(table.unsqueeze(0))
            self.vit.pos_embed.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def in_chans(self) -> int:
        return self.vit.patch_embed.proj.in_channels

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def img_size(self) -> int:
        """The side of the images the encoder takes now (``set_img_size``)."""
        return self.vit.patch_embed.img_size[0]

    def set_img_size(self, img_size: int) -> None:
        """Take images of ``img_size`` x ``img_size`` from now on (progressive resolution): the patch grid, and with
        it every mask and the position embeddings, follow. Parameters keep their shapes: learned positions stay at the
        grid the encoder was built for and are resampled per forward (timm's ``resample_abs_pos_embed``); fixed
        sin-cos ones are regenerated for the grid."""
        if img_size % self.patch_size:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {self.patch_size}: choose a multiple of "
                f"{self.patch_size}"
            )
        self.vit.patch_embed.set_input_size(img_size=img_size)

    def position_table(self) -> Tensor:
        """The position embeddings (1, P' + N, D) of the current grid (P' prefix positions, 0 with
        ``no_embed_class``)."""
        vit, grid = self.vit, self.grid_size
        if grid == self.base_grid:
            return vit.pos_embed
        prefix = 0 if vit.no_embed_class else self.num_prefix_tokens
        if self.sincos_pos_embed:
            return sincos_2d(self.embed_dim, grid, prefix).unsqueeze(0).to(vit.pos_embed)
        return resample_abs_pos_embed(vit.pos_embed, list(grid), list(self.base_grid), prefix)

    def _embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> patch embeddings (B, N, D), no positions yet."""
        return self.vit.patch_embed(self.normalize(x))

    def _add_positions(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Patch embeddings (B, N, D) -> prefix tokens (B, P, D), patch tokens (B, N, D) with positions."""
        vit = self.vit
        pos = self.position_table()
        if vit.no_embed_class:
            prefix_pos, patch_pos = pos[:, :0], pos
        else:
            prefix_pos, patch_pos = pos[:, : self.num_prefix_tokens], pos[:, self.num_prefix_tokens :]
        prefix = [t for t in (vit.cls_token, vit.reg_token) if t is not None]
        prefix = torch.cat(prefix, dim=1) if prefix else patches[:, :0]
        prefix = prefix.expand(patches.shape[0], -1, -1)
        if prefix_pos.shape[1]:
            prefix = prefix + prefix_pos
        return prefix, patches + patch_pos

    def _transform(self, prefix: Tensor, patches: Tensor, final_norm: bool = True) -> Tensor:
        """Transformer blocks, and the final norm unless ``final_norm`` is false, over (B, P + N', D) tokens."""
        vit = self.vit
        x = vit.norm_pre(vit.pos_drop(torch.cat([prefix, patches], dim=1)))
        x = run_blocks(vit.blocks, x, vit.grad_checkpointing)  # timm's flag: vit.set_grad_checkpointing()
        return vit.norm(x) if final_norm else x

    def forward_tokens(self, x: Tensor, final_norm: bool = True) -> Tensor:
        """All tokens, no masking: images (B, C, H, W) in [0, 1] -> (B, P + N, D), P prefix tokens first; after
        the final norm, or the last block's output with ``final_norm=False`` (what average pooling reads)."""
        return self._transform(*self._add_positions(self._embed(x)), final_norm)

    def forward_features(self, x: Tensor) -> Tensor:
        """All tokens after the final norm, no masking: (B, C, H, W) -> (B, P + N, D)."""
        return self.forward_tokens(x)

    def _inputs(self, x: Tensor, keep: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The block stack's input: prefix tokens (B, P, D) and patch tokens with positions, all N of them (neither
        ``keep`` nor ``mask``), the K kept ones (``keep`` (B, K)) or all N with the masked ones (``mask`` (B, N), 1 =
        masked) replaced by the mask token."""
        if keep is not None and mask is not None:
            raise ValueError("give keep (visible-only encoding) or mask (mask-token encoding), not both")
        patches = self._embed(x)
        if mask is not None:
            if self.mask_token is None:
                raise RuntimeError("a mask-token encoding needs MaskedViT(mask_token=True)")
            w = mask.unsqueeze(-1).to(patches.dtype)
            patches = patches * (1 - w) + self.mask_token.to(patches.dtype) * w
        prefix, patches = self._add_positions(patches)
        if keep is not None:
            patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return prefix, patches

    def forward_visible(self, x: Tensor, keep: Tensor) -> Tensor:
        """Encode only kept patches: x (B, C, H, W), keep (B, K) patch indices -> (B, P + K, D)."""
        return self._transform(*self._inputs(x, keep=keep))

    def forward_masked(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encode all patches with masked ones replaced: mask (B, N), 1 = masked -> (B, P + N, D)."""
        if self.mask_token is None:
            raise RuntimeError("forward_masked needs MaskedViT(mask_token=True)")
        return self._transform(*self._inputs(x, mask=mask))

    def block_indices(self, indices: int | Sequence[int]) -> list[int]:
        """Block numbers, ascending, from timm's ``forward_intermediates`` convention: an int n is the last n blocks,
        a sequence names blocks (negative counts from the end, as in Python)."""
        depth = len(self.vit.blocks)
        if isinstance(indices, int):
            if not 1 <= indices <= depth:
                raise ValueError(f"indices {indices}: the number of last blocks must be in [1, {depth}]")
            return list(range(depth - indices, depth))
        chosen = set()
        for i in indices:
            if not -depth <= i < depth:
                raise ValueError(f"block index {i} is out of range for {depth} blocks: use [{-depth}, {depth - 1}]")
            chosen.add(i % depth)
        if not chosen:
            raise ValueError("indices is empty: name at least one block")
        return sorted(chosen)

    def forward_blocks(
        self,
        x: Tensor,
        indices: int | Sequence[int],
        keep: Tensor | None = None,
        mask: Tensor | None = None,
        tensor: Literal["block", "ffn"] = "block",
    ) -> list[Tensor]:
        """The outputs of chosen transformer blocks: images (B, C, H, W) in [0, 1] -> a list of (B, P + T, D), P
        prefix tokens first, one per block of ``indices`` (``block_indices``) in ascending block order.

        T is N for the whole unmasked image (no ``keep``, no ``mask``), K with ``keep`` (B, K) (the visible-only
        encoding of ``forward_visible``) and N with ``mask`` (B, N) (the mask-token encoding of ``forward_masked``).
        ``tensor`` picks which tensor of a block:

        - ``"block"``: the block's output, after its last residual connection and before any final norm; the tensor
          timm's ``forward_intermediates`` returns (with ``norm=False``) and the next block's input.
        - ``"ffn"``: the output of the block's feed-forward branch before that residual connection,
          ``ls2(mlp(norm2(h)))`` of a timm ``Block`` (``h`` the stream after the attention residual; layer scale
          included, stochastic depth not). This is the target tensor of data2vec (``end_of_block_targets: false`` in
          the released data2vec 2.0 image config). Read by a forward hook on ``ls2``, so it needs blocks that have
          ``mlp`` and ``ls2`` (timm's ``Block``).

        Blocks after the last chosen one are not run. Activation checkpointing (``vit.set_grad_checkpointing()``)
        applies block by block as in the other encodings, with the same gradients."""
        vit = self.vit
        take = self.block_indices(indices)
        if tensor not in ("block", "ffn"):
            raise ValueError(f"tensor {tensor!r} is not one of 'block' (block output), 'ffn' (feed-forward output)")
        if tensor == "ffn":
            bad = [i for i in take if not (hasattr(vit.blocks[i], "ls2") and hasattr(vit.blocks[i], "mlp"))]
            if bad:
                kind = type(vit.blocks[bad[0]]).__name__
                raise ValueError(f"tensor='ffn' needs timm Block-style blocks (mlp, ls2); block {bad[0]} is a {kind}")
        prefix, patches = self._inputs(x, keep, mask)
        h = vit.norm_pre(vit.pos_drop(torch.cat([prefix, patches], dim=1)))
        outputs, ffn = [], []
        chosen = take if tensor == "ffn" else []
        hooks = [vit.blocks[i].ls2.register_forward_hook(lambda m, a, out: ffn.append(out)) for i in chosen]
        try:
            for i in range(take[-1] + 1):
                h = run_blocks(vit.blocks[i : i + 1], h, vit.grad_checkpointing)
                if i in take:
                    outputs.append(ffn.pop() if tensor == "ffn" else h)
        finally:
            for hook in hooks:
                hook.remove()
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0][:6]
