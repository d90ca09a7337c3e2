"""Host masked-image-modeling methods: masking, targets and losses, one host per module of this package.

A new host is one module here with a ``MIMMethod`` subclass (docs/method.md, "Adding a host"): ``hosts()`` finds it,
and ``advmim_pl.mim.<ClassName>`` names it in class paths and checkpoints without an edit to this file.
"""

import importlib
import inspect
import pkgutil
import sys

from advmim_pl.mim.maskfeat import MaskFeat
from advmim_pl.mim.methods import MAE, Host, HostStep, Mask, MIMMethod, Perturbed, Progress, SimMIM

__all__ = ["MAE", "Host", "HostStep", "MIMMethod", "MaskFeat", "Mask", "Perturbed", "Progress", "SimMIM", "hosts"]


def hosts() -> list[type[MIMMethod]]:
    """Every concrete ``MIMMethod`` subclass, at any depth, that a class path can name (an attribute of its module),
    those of every module of this package (imported here) and those of modules imported elsewhere (a host a test
    defines), in the order they were defined."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = [], [MIMMethod]
    while todo:
        for cls in todo.pop(0).__subclasses__():
            if cls not in found:
                found.append(cls)
                todo.append(cls)
    named = [cls for cls in found if getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls]
    made = [cls for cls in named if not any(base.__module__.startswith("jsonargparse") for base in cls.__mro__)]
    return [cls for cls in made if not inspect.isabstract(cls)]  # not jsonargparse's lazy_instance classes


def __getattr__(name: str) -> type[MIMMethod]:
    """``advmim_pl.mim.<ClassName>`` for a host in any module of this package."""
    if not name.startswith("_"):
        for cls in hosts():
            if cls.__name__ == name and cls.__module__.startswith(f"{__name__}."):
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
