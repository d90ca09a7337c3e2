"""Config lookup for ``advmim``: ``-c NAME`` names a file or one of the YAML configs shipped inside the package."""

from importlib.resources import files
from pathlib import Path

CONFIG_FLAGS = ("--config", "-c")


def shipped_configs() -> list[str]:
    """Relative paths of the YAML configs shipped inside the package."""
    root = Path(str(files("advmim_pl.configs")))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))


def resolve_config(name: str) -> str:
    """An existing path is used as is; otherwise ``name`` (with or without .yaml, with or without a
    leading ``configs/``) is looked up among the shipped configs."""
    if Path(name).exists():
        return name
    root = Path(str(files("advmim_pl.configs")))
    stem = name.removeprefix("configs/")
    for candidate in (stem, f"{stem}.yaml"):
        if (root / candidate).is_file():
            return str(root / candidate)
    listing = "\n  ".join(shipped_configs())
    raise SystemExit(f"advmim: config {name!r} is neither a file nor a shipped config. Shipped configs:\n  {listing}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every ``--config NAME`` / ``-c NAME`` / ``--config=NAME`` with ``resolve_config``."""
    out, expect_value = [], False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out
