"""`sdtool report OUTPUT_DIR`: a training run at a glance, as one self-contained HTML page (CONTRACT §O).

The page (`report.html` in the output folder) holds the training and validation loss curves and the learning
rate (matplotlib, inline SVG), the validation table, the sample images of every sampling point side by side, the
bucket plan with the validation split, the resolved config and the files the run wrote; `report-loss.png` beside
it holds the curves for terminals that show images. Training writes both at the end of every run.

`collect` reads the output folder, `plots` draws the curves, `page` writes the HTML.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sdtool.console import info, warn
from sdtool.errors import MissingDependencyError, SdtoolError

REPORT = "report.html"
CURVES_PNG = "report-loss.png"


@dataclass
class ReportFiles:
    """What `write_report` wrote: the page, and the curves' PNG (None without matplotlib or data)."""

    html: Path
    png: Path | None
    note: str | None = None  # why the curves are missing, when they are


def write_report(folder: Path, output: Path | None = None) -> ReportFiles:
    """Write the report of the run in `folder` to `output` (default `folder/report.html`) and the curves' PNG
    beside it (`<stem>-loss.png`, default `report-loss.png`). UsageError when `folder` is not a run's output."""
    from sdtool import __version__
    from sdtool.fsutil import atomic_write_bytes, atomic_write_text
    from sdtool.report.collect import read_run
    from sdtool.report.page import page

    data = read_run(folder)
    html_path = output or folder / REPORT
    png_path = html_path.with_name(CURVES_PNG if output is None else f"{html_path.stem}-loss.png")
    svg: str | None = None
    note: str | None = None
    png: Path | None = None
    try:
        from sdtool.report.plots import curves_figure, render

        figure = curves_figure(data)
        if figure is None:
            note = "No step has finished yet: nothing to draw."
        else:
            svg = _inline_svg(render(figure, "svg").decode("utf-8"))
            png = atomic_write_bytes(png_path, render(figure, "png"))
    except MissingDependencyError as exc:
        note = f"The curves need matplotlib, which is not installed ({exc.hint}); the rest of the report is here."
        warn(f"report without curves: {exc.message}; {exc.hint}")
    written = time.strftime("%Y-%m-%d %H:%M:%S")
    html = atomic_write_text(html_path, page(data, svg, note, written, __version__))
    return ReportFiles(html, png, note)


def check_report_output(folder: Path, output: Path, overwrite: bool) -> None:
    """`-o FILE`: never an input of the report (a file of the run folder it reads), never named like an image, and
    an existing page or curves file is replaced only with `overwrite`. UsageError (exit 2) otherwise."""
    from sdtool.errors import UsageError
    from sdtool.images import check_output_path

    pngs = output.with_name(f"{output.stem}-loss.png")
    inputs = (
        [p for p in folder.rglob("*") if p.is_file() and p.name not in (REPORT, CURVES_PNG)] if folder.is_dir() else []
    )
    check_output_path(output, "--output", inputs)
    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--output {output}: the report is an HTML page", hint="name it <something>.html")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder", hint="name the page to write, e.g. report.html")
    existing = [p for p in (output, pngs) if p.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"--output {output}: {', '.join(map(str, existing))} already exists",
            hint="pass --overwrite to replace it, or another -o",
        )


def _inline_svg(text: str) -> str:
    """matplotlib's SVG document as an element for the page (without its XML declaration and doctype)."""
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def write_report_after_training(folder: Path) -> None:
    """The report at the end of a run; a problem writing it is a warning, never a failed run."""
    try:
        files = write_report(folder)
    except SdtoolError as exc:
        warn(f"the run report could not be written: {exc.one_line()}")
        return
    except Exception as exc:  # the model is saved: nothing about a report may fail the run
        warn(f"the run report could not be written: {type(exc).__name__}: {exc} (sdtool report {folder} retries)")
        return
    info(f"run report: {files.html}" + (f" (curves: {files.png})" if files.png else ""))
