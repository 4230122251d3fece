"""Stopping a run cleanly: SIGINT/SIGTERM ask the run to stop after the current step, which then saves a state and
exits with 130; the request holds from setup to the end of the final save, so a signal never cuts a save short.

Schedulers (systemd, Slurm's `scancel`, `kill -TERM -PGID`) signal every process of the job, DataLoader workers
included. Workers therefore leave SIGINT and SIGTERM to the main process (`ignore_stop_signals`), and once a stop is
requested a worker that dies anyway (killed after a grace period, say) is part of the stop, not an error:
`batches` ends there, recording the failure in `StopRequest.loader_failure`, and the recipe saves the state of its
last whole step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from sdtool.console import warn
from sdtool.errors import EXIT_INTERRUPTED, SdtoolError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SdtoolError):
    """SIGINT/SIGTERM stopped the run after a step and a state save: exit 130."""

    exit_code = EXIT_INTERRUPTED


class StopRequest:
    """SIGINT/SIGTERM ask the run to stop after the current step; a second SIGINT stops at once.

    While it is active (a context manager), the first signal only sets `signal_name`; whatever is being written
    (a step's save, the final model) is finished before the run stops.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.loader_failure: str | None = None  # why the data loader ended after the request (see `batches`)
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # a scheduler repeating SIGTERM: the stop is under way
        self.signal_name = signal.Signals(signum).name
        # torch's DataLoader raises from its SIGCHLD handler, anywhere in this thread, when a worker dies. After a
        # stop request a dying worker is expected (the job is being torn down) and must not cut a save short; the
        # loader still notices a dead worker when it is next asked for a batch (see `batches`). A Python handler
        # that does nothing, not SIG_DFL: a SIGCHLD already pending would find no Python handler, and Python would
        # print "Signal 17 ignored due to race condition" with a traceback.
        if hasattr(signal, "SIGCHLD"):
            signal.signal(signal.SIGCHLD, _child_exited)
        warn(f"{self.signal_name}: finishing this step, then saving a state (Ctrl-C again to stop without saving)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _child_exited(signum: int, frame: Any) -> None:
    """SIGCHLD after a stop request: nothing to do (see `StopRequest._handle`)."""


def batches(loader: Iterable[Any], stop: StopRequest) -> Iterator[Any]:
    """The loader's batches. A loader failure after a stop request ends them and is kept in `stop.loader_failure`
    (its workers went down with the job); before a request it is an error, raised as it is."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            if not stop.requested:
                raise
            stop.loader_failure = f"{type(exc).__name__}: {exc}"
            return
        yield batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes the step and saves a state."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
