"""Activation checkpointing of transformer blocks that stays correct under the plug-in's branch switch.

``torch.utils.checkpoint`` recomputes a block's forward during the backward pass. By then the ``with branch(encoder,
"aux")`` block that routed the auxiliary pass through its own normalisation layers has exited, so a plain wrap would
recompute the auxiliary pass with the clean norms and give silently wrong gradients. ``run_blocks`` binds the routing
in force at the forward into each block's checkpointed function.
"""

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from advmim_pl.models.branch_norm import Branch, BranchNorm, branch


def routed(block: nn.Module, x: Tensor, route: Branch | None) -> Tensor:
    """``block(x)`` with the block's ``BranchNorm`` layers routed to ``route`` (None: the block has none)."""
    if route is None:
        return block(x)
    with branch(block, route):
        return block(x)


def run_blocks(blocks: nn.Sequential, x: Tensor, checkpointed: bool) -> Tensor:
    """``blocks(x)``, (B, T, D) -> (B, T, D); with ``checkpointed`` and autograd recording, each block keeps only its
    input for the backward and recomputes its internals there (one extra forward of compute), with the branch routing
    of this forward. Stochastic depth draws the same masks in the recompute (the RNG state is saved per block)."""
    if not (checkpointed and torch.is_grad_enabled()):
        return blocks(x)
    for block in blocks:
        route = next((m.active for m in block.modules() if isinstance(m, BranchNorm)), None)
        x = checkpoint(routed, block, x, route, use_reentrant=False)
    return x
