"""Argument checks for Python callers (the CLI already enforces the same ranges through jsonargparse types), and the
conversion of checked arguments back to plain numbers."""

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
