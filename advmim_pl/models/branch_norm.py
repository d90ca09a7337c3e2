"""Branch-specific normalisation layers (AdvProp idea) for any encoder.

``add_branch_norms(module)`` replaces every LayerNorm / BatchNorm inside ``module`` by a ``BranchNorm``
holding two copies, ``clean`` and ``aux``. ``branch(module, "aux")`` selects the auxiliary copy for the
duration of a ``with`` block. Everything else stays shared. ``clean_named_parameters`` gives the parameters under the
names the module had before (for an EMA teacher that pairs with them), ``aux_parameters`` the auxiliary copies.
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


def branch_norms(module: nn.Module) -> dict[str, BranchNorm]:
    """Every ``BranchNorm`` under ``module``, by its qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, BranchNorm)}


def aux_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of every auxiliary copy under ``module`` (what only the auxiliary branch trains)."""
    return [p for norm in branch_norms(module).values() for p in norm.aux.parameters()]


def clean_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``module``'s parameters under the names they had before ``add_branch_norms``: each ``BranchNorm``'s clean copy
    under the layer's own name, the auxiliary copies left out. A copy of the module made before the branch norms were
    added (an EMA teacher) has exactly these names, so it pairs with them by name."""
    norms = branch_norms(module)
    aux = {id(p) for p in aux_parameters(module)}
    renamed = {(f"{name}.clean." if name else "clean."): (f"{name}." if name else "") for name in norms}
    out = []
    for name, param in module.named_parameters():
        if id(param) in aux:
            continue
        for before, after in renamed.items():
            if name.startswith(before):
                name = after + name.removeprefix(before)
                break
        out.append((name, param))
    return out


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


def clean_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with each ``BranchNorm``'s clean copy under the original names and the aux copy dropped.

    ``BranchNorm`` stores its copies under the key segments ``clean`` and ``aux``; timm never uses those
    segment names, so the mapping works on plain checkpoint dictionaries too.
    """
    return {
        ".".join(part for part in key.split(".") if part != "clean"): value
        for key, value in state.items()
        if "aux" not in key.split(".")
    }
