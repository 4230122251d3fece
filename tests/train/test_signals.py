"""StopRequest in-process: a stop signal and a worker's exit pending together (train/signals.py).

The run-level behaviour (exit 130, a state, an exact resume) is in tests/hardening/test_signals.py; this file pins
the one ordering those runs meet only on a loaded machine, made deterministic by blocking both signals. It runs in
a fresh interpreter with no other thread, since a blocked signal may still be delivered to another thread.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, threading
    from sdtool.train.signals import StopRequest

    assert threading.active_count() == 1
    ran = []
    unraisable = []
    sys.unraisablehook = unraisable.append
    signal.signal(signal.SIGCHLD, lambda *_: ran.append("torch's handler"))  # torch's raises when a worker died
    blocked = {signal.SIGTERM, signal.SIGCHLD}
    with StopRequest() as stop:
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        subprocess.run([sys.executable, "-c", "pass"], check=True)  # a child exits: SIGCHLD pending
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's SIGTERM: pending too
        assert signal.sigpending() == blocked, signal.sigpending()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)  # Python runs the handlers in signal-number order
    print(stop.signal_name, ran, [str(u.exc_value) for u in unraisable])
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="needs POSIX signals")
def test_a_worker_exit_pending_with_the_stop_signal_is_quiet():
    """SIGTERM to the job and a DataLoader worker's death arrive together: the SIGTERM handler runs first and takes
    SIGCHLD away from torch's raising handler. Before: SIG_DFL there made Python print "Signal 17 ignored due to
    race condition" with a traceback on stderr."""
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SIGTERM [] []"
    assert "Traceback" not in proc.stderr, proc.stderr
