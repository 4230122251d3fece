"""Where output goes (CONTRACT §B): stdout carries data, stderr carries everything meant for people.

- `err` is the rich console on stderr for progress bars, warnings and summaries;
- `Output` writes data to stdout: written paths, or one JSON object per line with `--json`;
- `SkipReporter` names each skipped input (`skipped <path>: <reason>`) and closes with a summary;
- progress: a rich bar on a terminal; when stderr is not a terminal (nohup, a job scheduler, `2> log`) plain lines
  at the start, every `SDTOOL_PROGRESS_EVERY` seconds (30 by default) and at the end, so a long run's log shows
  how far it is instead of one bar drawn when it ends.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`1 image`, `2 images`: counts read as a person writes them."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def live_progress() -> bool:
    """A redrawn progress bar only where someone watches it: stderr is a terminal."""
    return err.is_terminal


PROGRESS_EVERY_ENV = "SDTOOL_PROGRESS_EVERY"


def progress_interval() -> float:
    """Seconds between plain progress lines in logs (`SDTOOL_PROGRESS_EVERY`, default 30)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, "30")))
    except ValueError:
        return 30.0


def duration(seconds: float) -> str:
    """`0:20:47`, for elapsed times and ETAs."""
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _now() -> float:
    return time.perf_counter()


class LineProgress:
    """Progress for logs: a plain line when work starts, then at most one every `interval` seconds, and one at the
    end (count, rate, ETA and any `stats`), instead of a bar that only a terminal can redraw."""

    def __init__(self, description: str, total: int | None, done: int = 0, unit: str = "images"):
        self.description, self.total, self.unit = description, total, unit
        self.start_done = self.done = done
        self.stats = ""
        self.started = _now()
        self.last_line: float | None = None
        self.last_done: int | None = None
        self.interval = progress_interval()

    def update(self, completed: int | None = None, advance: int = 0, stats: str | None = None) -> None:
        self.done = completed if completed is not None else self.done + advance
        if stats is not None:
            self.stats = stats
        now = _now()
        finished = self.total is not None and self.done >= self.total
        if self.last_line is None or finished or now - self.last_line >= self.interval:
            self.line(now)

    def line(self, now: float | None = None) -> None:
        """Print where the work is (once per count)."""
        now = _now() if now is None else now
        if self.done == self.last_done:
            return
        self.last_line, self.last_done = now, self.done
        elapsed = now - self.started
        parts = [f"{self.description}: {self.done}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.stats:
            parts.append(self.stats)
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 0.1 else f"{1 / rate:.1f} s per {self.unit[:-1]}")
            parts.append(f"elapsed {duration(elapsed)}")
            if self.total is not None and self.done < self.total:
                parts.append(f"eta {duration((self.total - self.done) / rate)}")
        info(", ".join(parts))

    def close(self) -> None:
        self.line()


@contextmanager
def loading(what: str, announce_after: float = 2.0) -> Iterator[None]:
    """Say what is loading and, when it took a second or more, how long: a spinner on a terminal; in a log a line once
    the load has taken `announce_after` seconds (a quick load, or one that fails at once, adds no line)."""
    started = time.perf_counter()
    if verbosity() <= QUIET:
        yield
        return
    if live_progress():
        with err.status(f"loading {escape(what)} …"):
            yield
    else:
        timer = threading.Timer(announce_after, info, [f"loading {escape(what)} …"])
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
    elapsed = time.perf_counter() - started
    if elapsed >= 1.0:
        info(f"loaded {escape(what)} in {elapsed:.1f} s")


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
def progress_bar(description: str, total: int | None, unit: str = "images") -> Iterator[Callable[[int], None]]:
    """`with progress_bar("bucket", n) as advance: advance(1)`: a bar on a terminal, lines in a log."""
    if not live_progress():
        lines = LineProgress(description, total, unit=unit)
        quiet = verbosity() <= QUIET

        def step(n: int = 1) -> None:
            if not quiet:
                lines.update(advance=n)

        try:
            yield step
        finally:
            if not quiet:
                lines.close()
        return
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
        line = f"{action} {plural(self.done, self.noun.removesuffix('s'), self.noun)}"
        if n_skipped:
            line += f", skipped {n_skipped}"
        info(line)
        if self.strict and n_skipped:
            raise StrictModeError(
                f"{n_skipped} {self.noun} skipped with --strict", hint="fix or remove the files named above"
            )
