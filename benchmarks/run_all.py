"""Run sdtool's benchmarks in one go and print a table of ratios against their plain references.

    python benchmarks/run_all.py [--quick] [--only bucket,cache,tag,caption,train,hypernetwork,unet] [--json]

Each benchmark module in this folder exposes `run(quick) -> list[BenchResult]` and is called in this process; a
module without it is run as a script and the ratios are read from its output. A module that is not there yet is
reported as "not available", and one that fails is reported with its error: the others still run. The table goes
to stderr; `--json` also writes one JSON object per result (with the machine) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import BenchResult, machine, report, unavailable  # noqa: E402


@dataclass(frozen=True)
class Bench:
    """Where a benchmark lives and how to run its script small when the module has no `run(quick)`."""

    module: str
    script_args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()


# tag and caption share bench_label.py; its script takes --only to run one of them.
BENCHES: dict[str, Bench] = {
    "bucket": Bench("bench_bucket", quick_args=("--count", "300", "--max-side", "1024")),
    "cache": Bench("bench_cache", quick_args=("--images", "4")),
    "tag": Bench("bench_label", ("--only", "tag"), ("--images", "16", "--repeats", "1")),
    "caption": Bench("bench_label", ("--only", "caption"), ("--caption-images", "4", "--repeats", "1")),
    "train": Bench("bench_train"),
    "hypernetwork": Bench("bench_hypernetwork"),
    "unet": Bench("bench_unet_gpu"),
}
SUBPROCESS_TIMEOUT_S = 3600


def parse_only(text: str | None) -> list[str]:
    """The benchmarks named by `--only` (comma-separated), in the table's order; unknown names are an error."""
    if not text:
        return list(BENCHES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(map(repr, unknown)) or '(none given)'}; choose from {', '.join(BENCHES)}"
        )
    return [n for n in BENCHES if n in names]


def _module_path(module: str) -> Path:
    return ROOT / "benchmarks" / f"{module}.py"


def _select(results: list[BenchResult], key: str, shared: bool) -> list[BenchResult]:
    # A module that serves several keys (bench_label: tag and caption) names its rows "<key>…"; keep ours.
    if not shared:
        return results
    picked = [r for r in results if r.name.lower().startswith(key)]
    return picked or results


def run_in_process(key: str, fn: Callable[..., list[BenchResult]], quick: bool, shared: bool) -> list[BenchResult]:
    """Call a module's `run(quick)` (with `parts=[key]` when it accepts it) and keep this key's rows."""
    params = inspect.signature(fn).parameters
    results = fn(quick=quick, parts=[key]) if "parts" in params else fn(quick)
    return _select(list(results), key, shared)


_RATIO_LINE = re.compile(
    r"^(?P<label>[^:]*(?:ratio|speed-up|speedup)[^:]*):\s*(?P<value>[0-9.]+)\s*x?"
    r"(?:\s*\(target\s*(?P<op>[≤≥<>]=?)\s*(?P<target>[0-9.]+)\s*x?\))?",
    re.IGNORECASE,
)
_TABLE_ROW = re.compile(r"^(?P<label>[A-Za-z][\w-]*)\s+.*?\s(?P<value>[0-9.]+)x\s*$")


def parse_script_output(key: str, text: str) -> list[BenchResult]:
    """Ratios from a benchmark script's plain output: 'ratio …: 0.95 (target ≤ 1.00)', 'speed-up: 27x', table rows."""
    results = []
    for line in text.splitlines():
        line = line.strip()
        m = _RATIO_LINE.match(line) or _TABLE_ROW.match(line)
        if not m:
            continue
        label, value = m["label"].strip(), float(m["value"])
        if _TABLE_ROW.match(line) and not _RATIO_LINE.match(line) and label.lower() != key:
            continue
        groups = m.groupdict()
        target, met = "", None
        if groups.get("op") and groups.get("target"):
            bound = float(groups["target"])
            target = f"ratio {groups['op']} {bound:g}"
            met = value <= bound if groups["op"] in ("≤", "<", "<=") else value >= bound
        name = label if label.lower().startswith(key) else f"{key}: {label}"
        results.append(
            BenchResult(name, None, ratio=value, target=target, met=met, note="read from the script's output")
        )
    return results


def run_as_script(key: str, bench: Bench, quick: bool) -> list[BenchResult]:
    """Run a module that has no `run(quick)` as a script and read the ratios it prints."""
    args = [sys.executable, str(_module_path(bench.module)), *bench.script_args, *(bench.quick_args if quick else ())]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [unavailable(key, f"failed (exit {proc.returncode}): {tail}")]
    return parse_script_output(key, proc.stdout) or [
        unavailable(key, "ran as a script but printed no ratio: " + " | ".join(proc.stdout.strip().splitlines()[-3:]))
    ]


def run_one(key: str, quick: bool, modules: dict[str, object]) -> list[BenchResult]:
    """One benchmark's rows; never raises: a missing or failing benchmark becomes a row that says so."""
    bench = BENCHES[key]
    if not _module_path(bench.module).is_file():
        return [unavailable(key, f"not available (benchmarks/{bench.module}.py is not there yet)")]
    shared = sum(b.module == bench.module for b in BENCHES.values()) > 1
    try:
        # stdout is for the --json records only: whatever a benchmark prints goes to stderr with the progress lines.
        with contextlib.redirect_stdout(sys.stderr):
            if bench.module not in modules:
                modules[bench.module] = importlib.import_module(f"benchmarks.{bench.module}")
            fn = getattr(modules[bench.module], "run", None)
            if callable(fn):
                return run_in_process(key, fn, quick, shared) or [unavailable(key, "returned no results")]
            return run_as_script(key, bench, quick)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a benchmark's failure (even SystemExit from its argparse) must not stop the rest
        traceback.print_exc(file=sys.stderr)
        return [unavailable(key, f"failed: {type(exc).__name__}: {exc}")]


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the chosen benchmarks one after another and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a few minutes on a 2-core CPU")
    parser.add_argument(
        "--only", type=parse_only, default=list(BENCHES), metavar="NAMES", help=f"comma-separated: {','.join(BENCHES)}"
    )
    parser.add_argument("--json", action="store_true", help="also one JSON object per result on stdout")
    args = parser.parse_args(argv)

    results: list[BenchResult] = []
    modules: dict[str, object] = {}
    for key in args.only:
        print(f"running {key}…", file=sys.stderr, flush=True)
        t = time.perf_counter()
        rows = run_one(key, args.quick, modules)
        print(f"{key}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        results.extend(rows)
    report(results, json_lines=args.json, info=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
