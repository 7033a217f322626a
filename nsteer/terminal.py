"""How the command line prints: rich tables on a terminal, plain lines in a pipe, JSON on request.

Results go to standard output, everything else (what is being opened, progress, notes, errors) to standard error.
Every string shown goes through :func:`nsteer.text.visible` and reaches rich only as ``Text`` (rich never parses
markup here), so a prompt holding ``[/x]`` or ``[link=...]`` prints as typed and an escape sequence is shown, not
obeyed. JSON is written with every non-ASCII character escaped, so it carries no control character either.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from nsteer.progress import ProgressFactory, text_progress
from nsteer.text import visible

Format = Literal["text", "json", "jsonl"]


def _console(*, stderr: bool) -> Console:
    # markup/emoji/highlight off: nothing printed is ever parsed ("include:ocean:" stays text, "[b]" stays text).
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, paths as strings and non-finite floats as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


class Output:
    """Where one command's results go: ``text`` (rich on a terminal, plain otherwise), ``json`` or ``jsonl``."""

    def __init__(self, format: Format = "text") -> None:
        self.format = format
        self.out = _console(stderr=False)
        self.err = _console(stderr=True)

    @property
    def text(self) -> bool:
        """Whether results are printed for people (not as JSON)."""
        return self.format == "text"

    @property
    def rich(self) -> bool:
        """Whether results are drawn with rich: text format on a terminal."""
        return self.text and self.out.is_terminal

    # ------------------------------------------------------------------------------------------------- stderr

    def note(self, message: str) -> None:
        """A line on standard error (what is being opened, where files went, hints)."""
        self._write(sys.stderr, visible(message))

    def error(self, problems: Sequence[str]) -> None:
        """``error: ...`` on standard error, one line per problem, every character of it visible."""
        lines = [visible(problem) for problem in problems] or [""]
        if self.err.is_terminal:
            text = Text("error: ", style="bold red")
            text.append("\n".join(lines))
            self.err.print(text, soft_wrap=True)
        else:
            self._write(sys.stderr, "error: " + "\n".join(lines))

    @contextmanager
    def progress(self) -> Iterator[ProgressFactory]:
        """A factory of progress callbacks: bars with time left on a terminal, plain lines with time left otherwise."""
        if not self.err.is_terminal:
            yield text_progress()
            return
        with Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.err,
            transient=False,
            redirect_stdout=False,  # results printed meanwhile stay on standard output
            redirect_stderr=False,
        ) as bars:
            tasks: dict[str, Any] = {}

            def factory(label: str) -> Any:
                def update(done: int, total: int) -> None:
                    if label not in tasks:
                        tasks[label] = bars.add_task(visible(label), total=total)
                    bars.update(tasks[label], completed=done, total=total)

                return update

            yield factory

    # ------------------------------------------------------------------------------------------------- stdout

    def line(self, message: str) -> None:
        """One result line (text format only)."""
        if self.text:
            self._write(sys.stdout, visible(message))

    def table(
        self,
        title: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        right: Sequence[str] = (),
        header: bool = True,
    ) -> None:
        """A table of results: rich on a terminal; in a pipe, a title line and space-aligned columns."""
        if not self.text:
            return
        cells = [[str(cell) for cell in row] for row in rows]
        if self.rich:
            table = Table(title=Text(visible(title)), show_header=header, show_lines=False)
            for column in columns:
                table.add_column(Text(visible(column)), justify="right" if column in right else "left")
            for row in cells:
                table.add_row(*(Text(visible(cell)) for cell in row))
            self.out.print(table)
            return
        shown = ([[visible(c) for c in columns]] if header else []) + [[visible(c) for c in row] for row in cells]
        widths = [max(len(row[i]) for row in shown) for i in range(len(columns))]
        lines = [visible(title)] if title else []
        for row in shown:
            padded = [
                cell.rjust(width) if column in right else cell.ljust(width)
                for cell, width, column in zip(row, widths, columns)
            ]
            lines.append("  ".join(padded).rstrip())
        self._write(sys.stdout, "\n".join(lines))

    def answers(self, records: Sequence[Mapping[str, Any]], steering: str) -> None:
        """Generated answers: each prompt and its answer, or without and with steering side by side."""
        if not self.text:
            return
        compare = any(r.get("unsteered") is not None for r in records) and any(
            r.get("steered") is not None for r in records
        )
        if compare and self.rich:
            table = Table(show_lines=True, title=Text(visible(f"Steering: {steering}")))
            table.add_column("prompt", ratio=1)
            table.add_column("without steering", ratio=2)
            table.add_column("with steering", ratio=2)
            for record in records:
                table.add_row(
                    *(Text(visible(record[key], newlines=True)) for key in ("prompt", "unsteered", "steered"))
                )
            self.out.print(table)
            return
        for record in records:
            if self.rich:
                self.out.rule(Text(visible(record["prompt"])), style="dim")
            else:
                self._write(sys.stdout, f"=== {visible(record['prompt'])}")
            if compare:
                for key, label in (("unsteered", "without steering"), ("steered", "with steering")):
                    self._write(sys.stdout, f"--- {label}")
                    self._write(sys.stdout, visible(record[key], newlines=True))
            else:
                answer = record["steered"] if record.get("steered") is not None else record["unsteered"]
                self._write(sys.stdout, visible(answer, newlines=True))

    # --------------------------------------------------------------------------------------------------- JSON

    def document(self, data: Mapping[str, Any]) -> None:
        """The whole result as one JSON document (json format only)."""
        if self.format == "json":
            self._write(sys.stdout, json.dumps(jsonable(data), indent=2, allow_nan=False))

    def records(self, records: Sequence[Mapping[str, Any]]) -> None:
        """One JSON object per line (jsonl format only)."""
        if self.format == "jsonl":
            for record in records:
                self._write(sys.stdout, json.dumps(jsonable(record), allow_nan=False))

    @staticmethod
    def _write(stream: Any, text: str) -> None:
        stream.write(text + "\n")
        stream.flush()
