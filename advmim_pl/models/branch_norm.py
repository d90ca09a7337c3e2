"""Branch-specific normalisation layers (AdvProp idea) for any encoder.

``add_branch_norms(module)`` replaces every LayerNorm / BatchNorm inside ``module`` by a ``BranchNorm``
holding two copies, ``clean`` and ``aux``. ``branch(module, "aux")`` selects the auxiliary copy for the
duration of a ``with`` block. Everything else stays shared.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

Branch = Literal["clean", "aux"]
NORM_TYPES = (nn.LayerNorm, _NormBase, nn.GroupNorm)


class BranchNorm(nn.Module):
    """Two copies of one normalisation layer (affine parameters and running statistics)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.clean = norm
        self.aux = copy.deepcopy(norm)
        self.active: Branch = "clean"

    def forward(self, x: Tensor) -> Tensor:
        return self.aux(x) if self.active == "aux" else self.clean(x)


def add_branch_norms(module: nn.Module) -> int:
    """Wrap every normalisation layer of ``module`` in place; returns how many were wrapped."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, NORM_TYPES):
            setattr(module, name, BranchNorm(child))
            count += 1
        elif not isinstance(child, BranchNorm):
            count += add_branch_norms(child)
    return count


@contextmanager
def branch(module: nn.Module, name: Branch) -> Iterator[None]:
    """Route every ``BranchNorm`` under ``module`` to branch ``name`` inside the block; restores after."""
    norms = [m for m in module.modules() if isinstance(m, BranchNorm)]
    previous = [m.active for m in norms]
    for m in norms:
        m.active = name
    try:
        yield
    finally:
        for m, active in zip(norms, previous, strict=True):
            m.active = active


def clean_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with the clean branch under the original names and the aux branch dropped."""
    state = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if "aux" in parts and _is_branch_key(module, parts, "aux"):
            continue
        if "clean" in parts and _is_branch_key(module, parts, "clean"):
            parts.remove("clean")
        state[".".join(parts)] = value
    return state


def _is_branch_key(module: nn.Module, parts: list[str], branch_name: str) -> bool:
    """Whether ``parts`` addresses a tensor inside a ``BranchNorm``'s ``branch_name`` copy."""
    index = parts.index(branch_name)
    return isinstance(module.get_submodule(".".join(parts[:index])), BranchNorm)
