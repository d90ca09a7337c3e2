"""write_report: the rich table, the Markdown copy and the JSON record say the same thing."""

import json

import pytest

from advmim_pl.report import ReportTable, report_markdown, write_report

TABLE = ReportTable(["pipeline", "workers", "images/s"], [["reference", "1", "1,234"], ["fast", "2", "9"]], align="lrr")


def test_markdown_holds_heading_lines_every_table_and_notes():
    second = ReportTable(["a", "b"], [["x", "y"]], title="second table")
    text = report_markdown([TABLE, second], heading="Throughput", lines=["- device: cpu"], notes=["one", "two"])
    assert text.splitlines() == [
        "# Throughput",
        "",
        "- device: cpu",
        "",
        "| pipeline | workers | images/s |",
        "|---|---:|---:|",
        "| reference | 1 | 1,234 |",
        "| fast | 2 | 9 |",
        "",
        "## second table",
        "",
        "| a | b |",
        "|---|---|",
        "| x | y |",
        "",
        "- one",
        "- two",
    ]


def test_write_report_prints_the_rows_and_writes_markdown_and_json(tmp_path, capsys):
    record = {"results": {"reference": 1234.0}, "notes": ["one"]}
    path = write_report(tmp_path / "new", "pipe", [TABLE], record, heading="Throughput")
    assert path == tmp_path / "new" / "pipe.md"
    assert path.read_text() == report_markdown([TABLE], "Throughput")
    assert json.loads((tmp_path / "new" / "pipe.json").read_text()) == record
    printed = capsys.readouterr().out
    assert "Throughput" in printed and all(cell in printed for row in TABLE.rows for cell in row)


@pytest.mark.parametrize(
    "columns, rows, align, message",
    [
        (["a", "b"], [["1"]], "", r"row \['1'\] has 1 cells, the table has 2 columns"),
        (["a", "b"], [], "lx", "align 'lx' must give one of 'l' or 'r' for each of the 2 columns"),
        (["a", "b"], [], "l", "align 'l' must give"),
    ],
)
def test_bad_tables_are_one_line_errors(columns, rows, align, message):
    with pytest.raises(ValueError, match=message):
        ReportTable(columns, rows, align=align)
    with pytest.raises(ValueError, match="got no table"):
        write_report(".", "x", [], {})
