"""One-line errors for ``advmim``: jsonargparse's nested parse error becomes the full key, the given value and what
would be right (for an option typed with ``Literal``, its allowed values, read from the annotation); a refused
checkpoint is one line with ``REFUSED_EXIT_CODE``."""

import ast
import functools
import importlib
import inspect
import operator
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from lightning.pytorch.cli import LightningArgumentParser

from advmim_pl.reliability import REFUSED_EXIT_CODE, UnsafeCheckpointError

KEY = re.compile(r'Parser key "([^"]+)"')
CLASS_PATH = re.compile(r"(?:- )?Problem with given class_path '([^']+)':")
EXPECTED = re.compile(r"(?:- )?Expected a (?:<class '([^']+)'>|(.+?))(?:\. Got value: .*)?$")
GIVEN = re.compile(r"(?:Got value|Given value): (.*)$")
NESTED_ARG = re.compile(r"NestedArg\(key='[^']*', val='(.*)'\)$")
LITERAL = re.compile(r"typing\.Literal\[(.*?)\](?:\. Got value: |$)")
NOT_REASONS = ("Does not validate", "Subtypes:", "Given value", "Expected a")


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def enclosing(lines: list[str], index: int) -> list[str]:
    """The lines that enclose ``lines[index]`` in jsonargparse's indented error (each less indented than the one
    below it), nearest first, stripped."""
    out, level = [], indent(lines[index])
    for line in reversed(lines[:index]):
        if line.strip() and indent(line) < level:
            out.append(line.strip())
            level = indent(line)
    return out


def block(lines: list[str], index: int) -> list[str]:
    """The lines below ``lines[index]`` that are more indented than it (what jsonargparse says about that key),
    stripped."""
    out = []
    for line in lines[index + 1 :]:
        if line.strip() and indent(line) <= indent(lines[index]):
            break
        if line.strip():
            out.append(line.strip())
    return out


def unbullet(line: str) -> str:
    return line.removeprefix("- ")


def class_from_path(class_path: str) -> type | None:
    """The class ``class_path`` (``package.module.Class``) names, or None when it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if inspect.isclass(found) else None


def annotation(owner: type, name: str) -> Any:
    """The type annotation of the constructor argument ``name`` of ``owner`` or of the first base class whose
    constructor has it (where ``**kwargs`` lead); None when none has it."""
    for klass in owner.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or name not in inspect.signature(init).parameters:
            continue
        try:
            return typing.get_type_hints(init).get(name)
        except Exception:  # an annotation that does not resolve at run time: the signature's own object
            found = inspect.signature(init).parameters[name].annotation
            return None if found is inspect.Parameter.empty else found
    return None


def named_literals(lines: list[str]) -> Any:
    """The ``Literal`` types an error's lines name (``Expected a typing.Literal['a', 'b']``), as one annotation:
    where an argument's annotation is not on its class (options forwarded to another object), jsonargparse's
    error still names the type it checked. None when the lines name none."""
    literals = []
    for line in lines:
        if (m := LITERAL.search(line)) is not None:
            try:
                values = ast.literal_eval(f"[{m.group(1)}]")
            except (ValueError, SyntaxError):
                continue
            literals.append(Literal[tuple(values)])
    return functools.reduce(operator.or_, literals) if literals else None


def allowed_values(hint: Any) -> list[Any]:
    """The values a ``Literal`` in ``hint`` allows, through ``Optional``/``Union`` (None where the union has
    NoneType); [] when ``hint`` has no ``Literal``. E.g. ``Literal["a", "b"] | None`` -> ``["a", "b", None]``."""
    values, has_literal = [], False

    def walk(part: Any) -> None:
        nonlocal has_literal
        origin = typing.get_origin(part)
        if origin is Literal:
            has_literal = True
            values.extend(typing.get_args(part))
        elif origin in (Union, types.UnionType):
            for arg in typing.get_args(part):
                walk(arg)
        elif part is type(None):
            values.append(None)

    walk(hint)
    return values if has_literal else []


def other_types(hint: Any) -> list[str]:
    """The names of the types in the union ``hint`` other than ``Literal`` and NoneType."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [name for arg in typing.get_args(hint) for name in other_types(arg)]
    if typing.get_origin(hint) is Literal or hint is type(None):
        return []
    return [getattr(hint, "__name__", str(hint))]


def choice_reason(given: str, hint: Any) -> str | None:
    """``'x' is not one of: a, b, null`` for a value outside the ``Literal`` values of ``hint``; None when ``hint``
    has no ``Literal`` or allows ``given`` (the error is then about something else)."""
    values = allowed_values(hint)
    shown = list(dict.fromkeys("null" if value is None else str(value) for value in values))
    if not values or given in shown:
        return None
    others = other_types(hint)
    reason = f"{given!r} is not one of: {', '.join(shown)}"
    return f"{reason} (or a value of type {' or '.join(others)})" if others else reason


def innermost_key(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """For jsonargparse's error ``lines`` (indented, one key inside another): the keys from the outermost to the
    innermost, the lines that enclose the innermost key (nearest first) and its own lines (stripped); ([], [], [])
    when no line names a key."""
    keyed = [i for i, line in enumerate(lines) if KEY.search(line)]
    if not keyed:
        return [], [], []
    above = enclosing(lines, keyed[-1])
    keys = [m.group(1) for line in reversed(above) if (m := KEY.match(line))] + [KEY.search(lines[keyed[-1]]).group(1)]
    return keys, above, block(lines, keyed[-1])


def argument_owner(keys: list[str], above: list[str], section_class: Callable[[str], type | None]) -> tuple:
    """``(class, argument name)`` of the innermost key: an argument of the class that the nearest enclosing
    ``class_path`` names, or of a top-level section's class (``trainer.precision``); class None when unknown."""
    owner_path = next((m.group(1) for line in above if (m := CLASS_PATH.match(line))), None)
    if owner_path is not None:
        return class_from_path(owner_path), keys[-1]
    section, _, name = keys[-1].rpartition(".")
    return (section_class(section) if section else None), name


def one_line_error(message: str, section_class: Callable[[str], type | None] = lambda section: None) -> str:
    """jsonargparse's nested parse error -> one line: the full key (``model.init_args.aux_weight``) and the
    innermost reason, which names the value and the bound, the type or the allowed values; other errors with their
    lines joined. ``section_class`` maps a top-level section (``trainer``) to the class its options belong to, for
    keys that no ``class_path`` encloses."""
    lines = [line for line in message.splitlines() if line.strip()]
    keys, above, inner = innermost_key(lines)
    if not keys:
        return " ".join(line.strip() for line in lines)
    given = next((m.group(1) for line in inner if (m := GIVEN.search(line))), None)
    if given is not None and (nested := NESTED_ARG.match(given)):
        given = nested.group(1)
    owner, name = argument_owner(keys, above, section_class)
    hint = annotation(owner, name) if owner is not None else None
    choices = given is not None and (choice_reason(given, hint) or choice_reason(given, named_literals(inner)))
    reasons = [line for line in map(unbullet, inner) if not line.endswith(":") and not line.startswith(NOT_REASONS)]
    classes = [m.group(1) for line in inner if (m := CLASS_PATH.match(line))]
    if choices:
        reason = choices
    elif reasons:
        reason = f"{classes[-1]}: {reasons[0]}" if classes else reasons[0]
    elif given is not None:
        expected = [m.group(1) or m.group(2) for line in inner if (m := EXPECTED.match(line))]
        reason = f"{given!r} is not a valid value" + (f": expected {' or '.join(expected)}" if expected else "")
    else:
        reason = next(line.strip() for line in reversed(lines) if KEY.search(line))
    return f"{'.init_args.'.join(keys)}: {reason}"


class OneLineErrorParser(LightningArgumentParser):
    """Lightning's parser, whose parse errors are one line naming the key, the value and the bound, the type or the
    allowed values (the usage text belongs to ``--help``); exit code 2, as argparse's."""

    def add_class_arguments(self, theclass: type, nested_key: str | None = None, *args, **kwargs):
        """jsonargparse's, noting which class each section (``trainer``, ``checkpoint``) holds the arguments of."""
        if nested_key is not None:
            self.section_classes = {**getattr(self, "section_classes", {}), nested_key: theclass}
        return super().add_class_arguments(theclass, nested_key, *args, **kwargs)

    def section_class(self, section: str) -> type | None:
        """The class whose arguments the parser's section ``section`` holds (None for another section)."""
        return getattr(self, "section_classes", {}).get(section)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying the alternatives of a Union: it catches the exception
            return super().error(message, ex)
        subcommand = self.prog.replace(" [options]", "").split()[1:]  # the program's own name depends on how it ran
        prog = " ".join(["advmim", *subcommand[-1:]])
        reason = one_line_error(str(message), self.section_class)
        sys.stderr.write(f"{prog}: error: {reason} (every option: {prog} --help)\n")
        raise SystemExit(2)


def refuse(prog: str, err: UnsafeCheckpointError) -> None:
    """Print a refused file's one line and exit with ``REFUSED_EXIT_CODE``."""
    sys.stderr.write(f"{prog}: {err}\n")
    raise SystemExit(REFUSED_EXIT_CODE) from None
