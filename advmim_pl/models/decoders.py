"""Reconstruction decoders: MAE's transformer decoder and SimMIM's linear decoder."""

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from advmim_pl.models.checkpointing import run_blocks
from advmim_pl.models.pos_embed import sincos_2d


class MAEDecoder(nn.Module):
    """Lightweight transformer decoder of MAE.

    Visible-token features (B, P + K, D_enc) and keep indices (B, K) -> per-patch pixel predictions
    (B, N, p*p*C). Masked positions get a learned mask token; positions are fixed 2-D sin-cos.
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        num_prefix_tokens: int = 1,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = sincos_2d(decoder_dim, grid_size, num_prefix_tokens).unsqueeze(0)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.base_grid = self.grid_size = tuple(grid_size)
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the decoder blocks' activations (recomputed in the backward), as timm's models do."""
        self.grad_checkpointing = enable

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Decode a patch grid of ``grid_size`` from now on (progressive resolution): fixed sin-cos positions of it."""
        self.grid_size = tuple(grid_size)

    def position_table(self) -> Tensor:
        """Fixed 2-D sin-cos positions (1, P + N, D) of the current grid."""
        if self.grid_size == self.base_grid:
            return self.pos_embed
        table = sincos_2d(self.pos_embed.shape[-1], self.grid_size, self.num_prefix_tokens)
        return table.unsqueeze(0).to(self.pos_embed)

    def forward(self, latent: Tensor, keep: Tensor) -> Tensor:
        x = self.embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        pos = self.position_table()
        batch, num_patches = keep.shape[0], pos.shape[1] - self.num_prefix_tokens
        full = self.mask_token.to(x.dtype).expand(batch, num_patches, -1)
        index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        full = full.scatter(1, index, visible)
        x = torch.cat([prefix, full], dim=1) + pos
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        return self.pred(x[:, self.num_prefix_tokens :])


class SimMIMDecoder(nn.Module):
    """SimMIM's linear decoder: 1x1 conv to p*p*C channels and PixelShuffle(p).

    Token features (B, P + N, D) on an (h, w) grid -> image (B, C, h*p, w*p).
    """

    def __init__(
        self,
        embed_dim: int,
        grid_size: tuple[int, int],
        patch_size: int,
        in_chans: int,
        num_prefix_tokens: int,
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Conv2d(embed_dim, patch_size**2 * in_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch_size)

    def set_grid(self, grid_size: tuple[int, int]) -> None:
        """Decode a patch grid of ``grid_size`` from now on (progressive resolution)."""
        self.grid_size = tuple(grid_size)

    def forward(self, latent: Tensor) -> Tensor:
        tokens = latent[:, self.num_prefix_tokens :]
        h, w = self.grid_size
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return self.shuffle(self.proj(fmap))
