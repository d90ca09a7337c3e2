"""How a classifier pools an encoder's tokens, and which pooling the method that pre-trained it asks for.

Every host method class declares ``pooling`` ("token" or "avg", ``advmim_pl.mim.MIMMethod.pooling``); the
functions here read that attribute, from a method object or class, or from the class path or class name that a
checkpoint or an exported file records.
"""

import importlib
from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn

GlobalPool = Literal["avg", "token"]
POOLINGS: tuple[str, ...] = ("token", "avg")
POOL_DESCRIPTIONS = {"token": "the cls token after the final norm", "avg": "the mean patch token through fc_norm"}
METHODS_PACKAGE = "advmim_pl.mim"  # where a bare method class name ("SimMIM") is looked up


def method_class(method: str | None) -> type | None:
    """The host method class named by a class path (``advmim_pl.mim.methods.SimMIM``) or by a bare class name of
    ``advmim_pl.mim`` (``SimMIM``, as checkpoints and exported files record it); None when it cannot be found."""
    if not method:
        return None
    module_name, _, name = method.rpartition(".")
    try:
        module = importlib.import_module(module_name or METHODS_PACKAGE)
    except ImportError:
        return None
    found = getattr(module, name, None)
    return found if isinstance(found, type) else None


def method_pooling(method: object | str | None, default: GlobalPool) -> GlobalPool:
    """The pooling a classifier of an encoder pre-trained by ``method`` defaults to: the ``pooling`` attribute of
    the method (an instance, a class, or a name or class path resolved by ``method_class``), or ``default`` when
    the method is unknown or declares none."""
    found = method_class(method) if isinstance(method, str) or method is None else method
    pooling = getattr(found, "pooling", None)
    return pooling if pooling in POOLINGS else default


def resolve_pooling(
    global_pool: GlobalPool | None, method: object | str | None, default: GlobalPool, source: str
) -> GlobalPool:
    """``global_pool``, or the method's pooling (``method_pooling``) when it is None; warns when a token classifier
    reads the cls token of an encoder whose method pools the patch tokens (its loss never trained that token)."""
    if global_pool not in (None, *POOLINGS):
        raise ValueError(f"unknown pooling {global_pool!r}: choose token, avg, or null (the per-method default)")
    if global_pool is None:
        return method_pooling(method, default)
    if global_pool == "token" and method_pooling(method, "token") == "avg":
        rank_zero_warn(
            f"init_from {source!r} was pre-trained with {method}, whose classifiers pool the patch tokens (its loss "
            "never reads the cls token's output): global_pool token classifies from a token that was not trained "
            "to summarise the image. Set model.init_args.global_pool: avg (or null, the per-method default)."
        )
    return global_pool
