"""What a person sees while training runs: the progress line on stderr, and `metrics.jsonl` kept in step with a
resumed run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sdtool.console import QUIET, LineProgress, info, live_progress, make_progress, verbosity, warn


def truncate_metrics(path: Path, step: int, last: dict[str, Any] | None = None) -> None:
    """Keep the lines of steps up to `step`: a resumed run continues the file with the next step.

    `last` is the state's own copy of step `step`'s line: a run killed after saving the state but before writing
    that line gets it back here.
    """
    from sdtool.fsutil import atomic_write_text

    if not path.is_file():
        warn(f"{path} does not exist; the resumed run starts a new one at step {step + 1}")
        return
    kept = []
    kept_step = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill
        if not isinstance(record, dict) or record.get("step", step + 1) > step:
            break
        kept.append(line + "\n")
        kept_step = record.get("step")
    if last is not None and last.get("step") == step and kept_step != step:
        kept.append(json.dumps(last) + "\n")
    atomic_write_text(path, "".join(kept))


class TrainProgress:
    """The progress of training on stderr: loss, learning rate, it/s and ETA, as a bar on a terminal or as lines in
    a log (see sdtool.console)."""

    def __init__(self, total: int, done: int):
        self.total, self.done = total, done
        self.started = time.perf_counter()
        self.validation = ""  # the last validation result, kept on the line
        self.step_stats = ("", "")
        self.lines: LineProgress | None = None
        self.live = live_progress()
        if self.live:
            from rich.progress import TextColumn

            self.progress = make_progress(TextColumn("{task.fields[stats]}"))
        elif verbosity() > QUIET:
            self.lines = LineProgress("train", total, done, unit="steps")

    def __enter__(self) -> TrainProgress:
        if self.live:
            self.progress.__enter__()
            self.task = self.progress.add_task("train", total=self.total, completed=self.done, stats="")
        return self

    def update(self, record: dict[str, Any]) -> None:
        lrs = " ".join(f"{v:.2e}" for v in record["lr"].values())
        if self.lines is not None:
            parts = (f"loss {record['loss']:.4f}", self.validation, f"lr {lrs}")
            self.lines.update(completed=record["step"], stats=", ".join(part for part in parts if part))
            return
        if not self.live:
            return
        steps = record["step"] - self.done
        rate = steps / max(time.perf_counter() - self.started, 1e-9)
        self.step_stats = (f"loss {record['loss']:.4f}", f"lr {lrs}  {rate:.2f} it/s")
        self._show(completed=record["step"])

    def set_validation(self, text: str) -> None:
        """Show a validation result (e.g. "val 0.1234 (best 0.1200 @ 40)") on the line from now on."""
        self.validation = text
        if self.lines is not None:
            info(f"validation at step {self.lines.done}: {text}")  # a log gets every result, as it comes
        elif self.live:
            self._show()

    def _show(self, **fields: Any) -> None:
        loss, rest = self.step_stats
        stats = "  ".join(part for part in (loss, self.validation, rest) if part)
        self.progress.update(self.task, stats=stats, **fields)

    def __exit__(self, *exc: Any) -> None:
        if self.lines is not None:
            self.lines.close()
        elif self.live:
            self.progress.__exit__(*exc)
