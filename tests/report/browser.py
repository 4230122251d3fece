"""A real headless Chromium (Debian's `chromium` package) driven over the DevTools protocol, to look at a page the
way a person's browser shows it: console messages, thrown exceptions, what the DOM holds, and a screenshot.

The protocol runs over a pipe (`--remote-debugging-pipe`: commands in on fd 3, replies and events out on fd 4, each
a JSON object ended by a NUL byte), so no port is opened and no client library is needed. Written by hand because
the clients that exist (Playwright, pyppeteer) download a browser build of their own instead of driving the
system's one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    """The system's Chromium, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageView:
    """What the browser saw: console errors and warnings, exceptions, the result of `probe`, a PNG screenshot."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    probe: Any = None
    screenshot: bytes = b""


class Chromium:
    """One headless browser process with a fresh profile in `profile`."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends on fds 3 and 4, where Chromium looks for them
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,  # only dup2 calls, before exec
            pass_fds=(3, 4),
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, RuntimeError):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------- protocol
    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Send a command and wait for its reply (events that arrive meanwhile are kept in `events`)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        """The first event `method` (already received or still to come)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    # ---------------------------------------------------------------------------------------------- the page
    def view(self, url: str, probe: str, width: int = 1280) -> PageView:
        """Open `url`, wait for its load event, evaluate the JavaScript expression `probe` (its JSON value is
        returned) and take a full-page screenshot; console messages and exceptions are collected."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send(
            "Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1, mobile=False
        )
        self.send("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired")
        result = self.send("Runtime.evaluate", session, expression=probe, returnByValue=True, awaitPromise=True)
        height = self.send("Page.getLayoutMetrics", session)["cssContentSize"]["height"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=width,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = self.send("Page.captureScreenshot", session, format="png")
        view = PageView(probe=result.get("result", {}).get("value"), screenshot=base64.b64decode(shot["data"]))
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                (view.errors if params.get("type") in ("error", "assert") else view.warnings).append(text)
            elif method == "Runtime.exceptionThrown":
                view.errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                text = f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
                (view.errors if entry.get("level") == "error" else view.warnings).append(text)
        return view


def view_page(path: Path, probe: str, profile: Path, executable: str | None = None) -> PageView:
    """Open a local file in a fresh headless Chromium and report what it saw."""
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError("chromium is not installed")
    with Chromium(executable, profile) as browser:
        return browser.view(path.resolve().as_uri(), probe)


# What the report test asks the page: every image decoded, the curves drawn, the sections there.
REPORT_PROBE = """JSON.parse(JSON.stringify({
  images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth})),
  svgPaths: Array.from(document.querySelectorAll('.curves svg path')).length,
  svgWidth: (document.querySelector('.curves svg') || {getBoundingClientRect: () => ({width: 0})})
    .getBoundingClientRect().width,
  headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  sampleColumns: document.querySelectorAll('table.samples thead th').length,
  scripts: document.scripts.length,
}))"""


if __name__ == "__main__":  # python -m tests.report.browser PAGE.html SCREENSHOT.png
    import sys
    import tempfile

    page, out = Path(sys.argv[1]), Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        seen = view_page(page, REPORT_PROBE, Path(tmp) / "profile")
    out.write_bytes(seen.screenshot)
    print(json.dumps({"errors": seen.errors, "warnings": seen.warnings, "probe": seen.probe}, indent=2))
