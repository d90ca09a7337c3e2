"""Argument checks for Python callers (the CLI already enforces the same ranges through jsonargparse types), and the
conversion of checked arguments back to plain numbers."""

import inspect
from typing import Any


def require_positive(**values: float) -> None:
    """ValueError naming the first argument that is not > 0."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def require_non_negative(**values: float) -> None:
    """ValueError naming the first argument that is < 0."""
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")


def plain(value: Any) -> Any:
    """``value`` with jsonargparse's constrained numbers (``PositiveInt``, ``NonNegativeFloat``, ...) turned into
    plain ``int``/``float``, through dicts, lists and tuples; torch's safe unpickler refuses those subclasses."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain(item) for item in value)
    return value


def constructor_config(obj: Any) -> dict:
    """``{"class_path", "init_args"}`` that rebuilds ``obj``: its constructor's named arguments (not ``*args`` or
    ``**kwargs``), each read from the attribute of the same name."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = inspect.signature(type(obj).__init__).parameters.values()
    names = [p.name for p in parameters if p.name != "self" and p.kind not in kinds]
    return {
        "class_path": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "init_args": {name: getattr(obj, name) for name in names},
    }
