"""One writer for every results table: a rich table on the console, a Markdown copy and a JSON record.

``write_report(folder, stem, tables, record, heading=..., lines=..., notes=...)`` serves the frozen-feature and
robustness reports of ``advmim test`` and the benchmark scripts alike, so every table is printed and stored the
same way.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ALIGNMENTS = {"l": ("left", "---"), "r": ("right", "---:")}


@dataclass(frozen=True)
class ReportTable:
    """One table: ``columns`` (C,) headers, ``rows`` of C cells each (already formatted strings), an optional
    ``title`` and ``align``, one letter per column, ``l`` (left) or ``r`` (right); empty: all left."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    title: str = ""
    align: str = ""

    def __post_init__(self) -> None:
        if self.align and (len(self.align) != len(self.columns) or set(self.align) - set(ALIGNMENTS)):
            raise ValueError(
                f"align {self.align!r} must give one of 'l' or 'r' for each of the {len(self.columns)} columns"
            )
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row {list(row)} has {len(row)} cells, the table has {len(self.columns)} columns")

    def alignment(self, index: int) -> tuple[str, str]:
        """(rich justification, Markdown separator) of column ``index``."""
        return ALIGNMENTS[self.align[index] if self.align else "l"]

    def markdown(self) -> list[str]:
        """The table as Markdown lines (title as a level-2 heading, when there is one)."""
        out = [f"## {self.title}", ""] if self.title else []
        separators = [self.alignment(i)[1] for i in range(len(self.columns))]
        out += ["| " + " | ".join(self.columns) + " |", "|" + "|".join(separators) + "|"]
        return out + ["| " + " | ".join(row) + " |" for row in self.rows]

    def rich(self) -> Table:
        """The table for the console."""
        table = Table(title=self.title or None)
        for index, column in enumerate(self.columns):
            table.add_column(column, justify=self.alignment(index)[0])
        for row in self.rows:
            table.add_row(*row)
        return table


def report_markdown(
    tables: Sequence[ReportTable], heading: str = "", lines: Sequence[str] = (), notes: Sequence[str] = ()
) -> str:
    """The Markdown document: ``# heading``, the free ``lines`` (e.g. a bulleted setup), every table, then the
    ``notes`` as bullets; parts that are empty are left out."""
    parts = [[f"# {heading}"]] if heading else []
    parts += [list(lines)] if lines else []
    parts += [table.markdown() for table in tables]
    parts += [[f"- {note}" for note in notes]] if notes else []
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def write_report(
    folder: str | Path,
    stem: str,
    tables: Sequence[ReportTable],
    record: Mapping[str, Any],
    heading: str = "",
    lines: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> Path:
    """Print ``tables`` as rich tables (``heading`` above them) and write ``<folder>/<stem>.md``
    (``report_markdown``) and ``<folder>/<stem>.json`` (``record``, indented); returns the Markdown path.
    ``folder`` is created when missing."""
    if not tables:
        raise ValueError(f"write_report({stem!r}) got no table to write")
    console = Console()
    if heading:
        console.print(heading)
    for table in tables:
        console.print(table.rich())
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / f"{stem}.md"
    markdown.write_text(report_markdown(tables, heading, lines, notes))
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    return markdown
