"""Shared pieces of the benchmarks: one result type, the machine description and the report printer.

Every benchmark module exposes `run(quick: bool) -> list[BenchResult]`; `run_all.py` collects them and calls
`report`, which prints a rich table on stderr and, with `--json`, one JSON object per result on stdout.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table


@dataclass
class BenchResult:
    """One measured comparison: sdtool's time or rate against the plain reference measured in the same run.

    `ratio` is defined by each benchmark and explained by `target` (e.g. "speed-up ≥ 1×" or "time ratio ≤ 1.10");
    `met` is None when there is no target (GPU step times) or nothing was measured (skipped, failed, missing).
    """

    name: str
    ours: float | None
    reference: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    unit: str = "s"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # JSON has no NaN/inf: unmeasured values become null.
        def clean(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        d = asdict(self)
        d["extra"] = {k: clean(v) for k, v in self.extra.items()}
        return {k: clean(v) for k, v in d.items()}


def speedup(
    name: str, ours_s: float, reference_s: float, at_least: float = 1.0, note: str = "", unit: str = "s"
) -> BenchResult:
    """A result from two durations: ratio = reference / ours (higher is better), met when ≥ `at_least`."""
    ratio = reference_s / ours_s if ours_s > 0 else float("inf")
    return BenchResult(
        name=name,
        ours=ours_s,
        reference=reference_s,
        ratio=ratio,
        target=f"speed-up ≥ {at_least:g}×",
        met=ratio >= at_least,
        unit=unit,
        note=note,
    )


def sd15_config(component: str) -> dict[str, Any]:
    """The SD1.5 `unet` or `vae` config shipped in `sdtool/models/configs/sd15`, as constructor keyword arguments."""
    from sdtool.models.families.sd1 import SD1

    path = SD1.config_dir(v_prediction=False) / component / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if not key.startswith("_")}


def unavailable(name: str, note: str) -> BenchResult:
    """A row for a benchmark that did not produce numbers (missing module, skipped, failed)."""
    return BenchResult(name=name, ours=None, note=note)


def machine() -> dict[str, Any]:
    """CPU model, core count, Python and torch versions, and the CUDA device if there is one."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
    }
    try:
        import torch
    except ImportError:
        info["torch"] = "not installed"
        info["cuda_device"] = None
        return info
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["cuda_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda_version"] = torch.version.cuda
    else:
        info["cuda_device"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(info: dict[str, Any]) -> str:
    """One line for tables and docs, e.g. 'AMD EPYC, 2 cores, torch 2.13.0, no CUDA'."""
    gpu = f"CUDA {info['cuda_device']}" if info.get("cuda_device") else "no CUDA"
    return f"{info['cpu']}, {info['cores']} cores, torch {info.get('torch', '?')}, {gpu}"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def report(
    results: list[BenchResult],
    json_lines: bool = False,
    info: dict[str, Any] | None = None,
    out: TextIO | None = None,
    console: Console | None = None,
) -> None:
    """Print a rich table of `results` on stderr; with `json_lines` also one JSON object per result on stdout."""
    info = info if info is not None else machine()
    # A pipe or a log file gets rich's 80 columns by default, which wraps every note; give the table room.
    console = console or Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
    # The machine line goes above the table, unwrapped: as the table's title it would wrap at the table's width.
    console.print(f"sdtool benchmarks — {describe_machine(info)}", soft_wrap=True, markup=False)
    table = Table()
    for column, justify in [
        ("benchmark", "left"),
        ("sdtool", "right"),
        ("reference", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("met", "center"),
        ("note", "left"),
    ]:
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "–"}[r.met]
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}"
        table.add_row(r.name, _fmt(r.ours, r.unit), _fmt(r.reference, r.unit), ratio, r.target, met, r.note)
    console.print(table)
    if json_lines:
        stream = out or sys.stdout
        for r in results:
            stream.write(json.dumps({**r.to_dict(), "machine": info}, ensure_ascii=False) + "\n")
        stream.flush()
