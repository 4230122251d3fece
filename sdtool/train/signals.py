"""Stopping a run cleanly: SIGINT/SIGTERM ask the loop to stop after the current step, which then saves a state
and exits with 130; DataLoader workers leave the signals to the main process.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from sdtool.console import warn
from sdtool.errors import EXIT_INTERRUPTED, SdtoolError


class Interrupted(SdtoolError):
    """SIGINT/SIGTERM stopped the run after a step and a state save: exit 130."""

    exit_code = EXIT_INTERRUPTED


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        warn(f"{self.signal_name}: finishing this step, then saving a state (Ctrl-C again to stop without saving)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which finishes the step and saves a state."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
