"""Fixed 2-D sine-cosine position embeddings (MAE recipe)."""

import torch
from torch import Tensor


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """Sine-cosine embedding of scalar positions.

    positions (N,) -> (N, dim): first half sin, second half cos, frequencies 1/10000^(2i/dim).
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
    """2-D sine-cosine embedding of a (h, w) token grid, row-major.

    Returns (num_prefix_tokens + h*w, dim) float32; prefix (cls) rows are zero. Half of the channels
    encode the column index, half the row index, as in the reference MAE code.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be divisible by 4, got {dim}")
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    prefix = torch.zeros(num_prefix_tokens, dim, dtype=emb.dtype)
    return torch.cat([prefix, emb], dim=0).float()
