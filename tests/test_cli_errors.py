"""advmim's parse errors on classes of this file (their options stay as they are while the project's change): one
line naming the full key, the value and the allowed values of a Literal-typed option, wherever the option sits."""

from typing import Literal

import pytest

from advmim_pl.cli_errors import OneLineErrorParser, allowed_values, one_line_error


class Section:
    """A top-level section's class (as ``trainer``)."""

    def __init__(self, mode: Literal["fast", "exact"] = "fast", level: Literal[1, 2, 3] | None = None, n: int = 1):
        self.mode, self.level, self.n = mode, level, n


class Inner:
    """A class chosen by ``class_path`` (as the plug-in)."""

    def __init__(self, colour: Literal["red", "green"] = "red"):
        self.colour = colour


class Forwarding(Inner):
    """Options forwarded with ``**kwargs`` to the base class: the annotation is on ``Inner``."""

    def __init__(self, weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = weight


class Outer:
    """A class chosen by ``class_path`` whose argument is another chosen class (as the model and its plug-in)."""

    def __init__(self, part: Inner | None = None, shape: Literal["square", "round"] = "square"):
        self.part, self.shape = part, shape


def parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="advmim fit", exit_on_error=True)
    parser.add_class_arguments(Section, "section")
    parser.add_subclass_arguments(Outer, "outer", required=False)
    return parser


def error_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("advmim fit: error: ") and err.endswith(" (every option: advmim fit --help)\n"), err
    return err.removeprefix("advmim fit: error: ").removesuffix(" (every option: advmim fit --help)\n")


OUTER = ["--outer", f"{__name__}.Outer"]
CASES = {
    "section": (["--section.mode", "slow"], "section.mode: 'slow' is not one of: fast, exact"),
    "optional_int_literal": (["--section.level", "7"], "section.level: '7' is not one of: 1, 2, 3, null"),
    "chosen_class": ([*OUTER, "--outer.init_args.shape", "oval"], "outer.init_args.shape: 'oval' is not one of: "
                     "square, round"),
    "class_in_a_class": ([*OUTER, "--outer.init_args.part", f"{__name__}.Inner",
                          "--outer.init_args.part.init_args.colour", "blue"],
                         "outer.init_args.part.init_args.colour: 'blue' is not one of: red, green"),
    "forwarded_to_a_base": ([*OUTER, "--outer.init_args.part", f"{__name__}.Forwarding",
                             "--outer.init_args.part.init_args.colour", "blue"],
                            "outer.init_args.part.init_args.colour: 'blue' is not one of: red, green"),
    "not_a_literal": (["--section.n", "many"], "section.n: 'many' is not a valid value: expected int"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_bad_value_is_one_line_with_what_would_be_right(case, capsys):
    args, line = CASES[case]
    assert error_line(capsys, *args) == line


def test_allowed_values_reads_literals_through_unions():
    assert allowed_values(str | Literal["auto"]) == ["auto"]
    assert allowed_values(Literal["a", "b"] | None) == ["a", "b", None]
    assert allowed_values(int | None) == []


def test_the_choices_come_from_the_error_when_the_class_does_not_import():
    message = (
        'Parser key "x":\n'
        "  - Problem with given class_path 'no.such.Module':\n"
        '      Parser key "mode":\n'
        "        Expected a typing.Literal['a', 'b']. Got value: c\n"
    )
    assert one_line_error(message) == "x.init_args.mode: 'c' is not one of: a, b"
