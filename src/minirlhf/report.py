"""report.md, the page a finished run leaves for a person: one builder for every stage's.

A report is a title and blocks (lists of Markdown lines): a paragraph, a table of figures, the run's plots, a section
of samples. `write_report` joins them with blank lines and replaces RUN_DIR/report.md atomically.
"""

from __future__ import annotations

from pathlib import Path

from minirlhf.checkpoint import atomic_write_text
from minirlhf.rundir import RunDir


def md_cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table; cells are written as given (numbers formatted by the caller, text through md_cell)."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def before_after(rows: list[tuple[str, str, str]], before: str = "before", after: str = "after") -> list[str]:
    """The usual figures table: (what, value before training, value after) per row."""
    return table(["", before, after], [list(r) for r in rows])


def plot_links(run_dir, names) -> list[str]:
    """Markdown image links to those of the run's `NAME.png` plots that exist now, so a report never links a
    missing one (PPO on the LSTM, say, trains no critic: no value.png). run_dir: a Path or a RunDir."""
    return [f"![{name}]({name}.png)" for name in names if (Path(run_dir) / f"{name}.png").is_file()]


def section(title: str, *blocks: list[str]) -> list[str]:
    """`## title` and its blocks, a blank line between each."""
    return _join([[f"## {title}"], *blocks])


def write_report(run_dir, title: str, *blocks: list[str] | str) -> Path:
    """RUN_DIR/report.md: `# title`, then the blocks (a string is a paragraph); empty blocks are left out."""
    path = RunDir(run_dir).report
    atomic_write_text(path, "\n".join(_join([[f"# {title}"], *(([b] if b else []) if isinstance(b, str) else b for b in blocks)]))
                      + "\n")
    return path


def _join(blocks) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        if block:
            lines += ([""] if lines else []) + list(block)
    return lines
