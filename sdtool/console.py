"""Where output goes (CONTRACT §B): stdout carries data, stderr carries everything meant for people.

- `err` is the rich console on stderr for progress bars, warnings and summaries;
- `Output` writes data to stdout: written paths, or one JSON object per line with `--json`;
- `SkipReporter` names each skipped input (`skipped <path>: <reason>`) and closes with a summary.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sdtool.errors import StrictModeError

QUIET, NORMAL, VERBOSE = -1, 0, 1

_state = {"verbosity": NORMAL, "warnings": True}
err = Console(stderr=True, highlight=False, soft_wrap=True)


def set_verbosity(level: int) -> None:
    _state["verbosity"] = level


def mute_secondary_process() -> None:
    """Ranks other than 0 of a multi-process run print errors only: rank 0 says everything else, once."""
    _state["verbosity"] = QUIET
    _state["warnings"] = False


def verbosity() -> int:
    return _state["verbosity"]


def debug_enabled() -> bool:
    """Tracebacks and debug lines are shown with `-v` or `SDTOOL_DEBUG=1`."""
    return _state["verbosity"] >= VERBOSE or os.environ.get("SDTOOL_DEBUG", "") not in ("", "0")


def info(message: str) -> None:
    if _state["verbosity"] > QUIET:
        err.print(message)


def debug(message: str) -> None:
    if debug_enabled():
        err.print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    """Warnings are shown even with `-q`: they are about the user's data or results."""
    if _state["warnings"]:
        # The message is text (paths, `pip install 'sdtool[xformers]'`), not markup: escape it.
        err.print(f"[yellow]warning:[/yellow] {escape(message)}", markup=True)


def error_line(message: str) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", markup=True)


def print_table(table: Any) -> None:
    if _state["verbosity"] > QUIET:
        err.print(table)


def make_progress(*extra_columns: Any) -> Progress:
    """A rich progress bar on stderr; silent with `-q`."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err,
        disable=_state["verbosity"] <= QUIET,
        transient=False,
    )


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Any]:
    """`with progress_bar("bucket", n) as advance: advance(1)`."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)

        yield advance


class Output:
    """Data on stdout: a written path per line, or with `json=True` one JSON object per line."""

    def __init__(self, json_lines: bool = False, stream: Any = None):
        self.json_lines = json_lines
        self._stream = stream
        self._lock = threading.Lock()

    @property
    def stream(self) -> Any:
        return self._stream or sys.stdout

    def path(self, path: str | Path) -> None:
        """Print a written path (plain mode only; JSON mode reports through `record`)."""
        if not self.json_lines:
            self._write(str(path))

    def record(self, obj: dict[str, Any]) -> None:
        """Print one JSON object (JSON mode only)."""
        if self.json_lines:
            self._write(json.dumps(obj, ensure_ascii=False, default=_json_default))

    def _write(self, line: str) -> None:
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class SkipReporter:
    """Names every skipped input on stderr and closes with a summary; `strict` turns skips into exit 1."""

    def __init__(self, strict: bool = False, noun: str = "images"):
        self.strict = strict
        self.noun = noun
        self.skipped: list[tuple[str, str]] = []
        self.done = 0
        self._lock = threading.Lock()

    def skip(self, path: str | Path, reason: str) -> None:
        with self._lock:
            self.skipped.append((str(path), reason))
        # Always shown, even with -q: a skipped input is something the user must know about.
        err.print(f"skipped {path}: {reason}", markup=False, highlight=False)

    def ok(self, n: int = 1) -> None:
        with self._lock:
            self.done += n

    def extend(self, items: Iterable[tuple[str | Path, str]]) -> None:
        for path, reason in items:
            self.skip(path, reason)

    def finish(self, action: str = "processed") -> None:
        """Print the closing summary; raise StrictModeError when `--strict` and anything was skipped."""
        n_skipped = len(self.skipped)
        line = f"{action} {self.done} {self.noun}"
        if n_skipped:
            line += f", skipped {n_skipped}"
        info(line)
        if self.strict and n_skipped:
            raise StrictModeError(
                f"{n_skipped} {self.noun} skipped with --strict", hint="fix or remove the files named above"
            )
