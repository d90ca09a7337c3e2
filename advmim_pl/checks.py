"""Argument checks for Python callers (the CLI already enforces the same ranges through jsonargparse types), and the
conversion of checked arguments back to plain numbers."""

import inspect
import typing
from typing import Any


def require(ok: bool, name: str, value: Any, expected: str) -> None:
    """ValueError ``{name} must be {expected}, got {value!r}`` unless ``ok``: every argument check's one line."""
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def require_positive(**values: float) -> None:
    """ValueError naming the first argument that is not > 0."""
    for name, value in values.items():
        require(value > 0, name, value, "positive")


def require_non_negative(**values: float) -> None:
    """ValueError naming the first argument that is < 0."""
    for name, value in values.items():
        require(value >= 0, name, value, "non-negative")


def require_between(low: float, high: float, closed: str = "[]", **values: float) -> None:
    """ValueError naming the first argument outside the interval from ``low`` to ``high``; ``closed`` says which ends
    belong to it, as the brackets of the interval: ``[]``, ``(]``, ``[)`` or ``()``."""
    for name, value in values.items():
        above = value >= low if closed[0] == "[" else value > low
        below = value <= high if closed[1] == "]" else value < high
        require(above and below, name, value, f"in {closed[0]}{low:g}, {high:g}{closed[1]}")


def choices(literal: Any) -> tuple:
    """The allowed values of a ``Literal[...]`` type, in order."""
    return typing.get_args(literal)


def require_choice(literal: Any, **values: Any) -> None:
    """ValueError naming the first argument that is not one of the ``Literal[...]`` type's values."""
    for name, value in values.items():
        require(value in choices(literal), name, value, f"one of {choices(literal)}")


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
    ``**kwargs``), each read from the attribute of the same name; an attribute that has a ``config()`` of its own (a
    nested object, such as a plug-in's attack) is given as its config."""
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = inspect.signature(type(obj).__init__).parameters.values()
    names = [p.name for p in parameters if p.name != "self" and p.kind not in kinds]
    values = {name: getattr(obj, name) for name in names}
    return {
        "class_path": f"{type(obj).__module__}.{type(obj).__qualname__}",
        "init_args": {name: v.config() if callable(getattr(v, "config", None)) else v for name, v in values.items()},
    }
