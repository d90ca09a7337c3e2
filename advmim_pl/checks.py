"""Argument checks for Python callers (the CLI already enforces the same ranges through jsonargparse types)."""


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
