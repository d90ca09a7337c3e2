"""Encoder wrapper, decoders, branch-specific norms and pixel-space normalisation."""

from advmim_pl.models.branch_norm import BranchNorm, add_branch_norms, branch, clean_state_dict
from advmim_pl.models.decoders import MAEDecoder, SimMIMDecoder
from advmim_pl.models.normalize import Normalize
from advmim_pl.models.vit import MaskedViT

__all__ = [
    "BranchNorm",
    "MAEDecoder",
    "MaskedViT",
    "Normalize",
    "SimMIMDecoder",
    "add_branch_norms",
    "branch",
    "clean_state_dict",
]
