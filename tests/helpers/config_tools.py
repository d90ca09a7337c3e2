"""Helpers for tests that read configs the way the CLI resolves them."""

import pytest
import yaml

from advmim_pl.cli import run


def leaves(tree, prefix=()):
    """{(key, path, ...): value} for every scalar or list in a nested YAML mapping."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, (*prefix, key)).items()}
    return {prefix: tree}


def printed_config(capsys, *args) -> dict:
    """The fully resolved config of ``advmim fit *args --print_config``."""
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def assert_contains(config: dict, expected: dict) -> None:
    composed = leaves(config)
    for key, value in leaves(expected).items():
        got = composed[key]
        if isinstance(value, float) or isinstance(got, float):
            assert got == pytest.approx(value), key
        else:
            assert (list(got) if isinstance(got, tuple) else got) == value, key
