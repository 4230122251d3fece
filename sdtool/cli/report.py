"""Write a run's report: loss curves, validation, samples, bucket plan and config in one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import OverwriteOpt, RunDirArg

NAME = "report"


def command(
    output_dir: RunDirArg,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the page here, and its curves beside it as <stem>-loss.png (default: RUN/report.html).",
            show_default=False,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a run's report: loss curves, validation, samples, bucket plan and config in one HTML page.

    RUN/report.html is the run's own (training rewrites it at every end) and is always replaced; a file named
    with -o is replaced only with --overwrite.
    """
    from sdtool.report import check_report_output, write_report

    if output is not None:
        check_report_output(output_dir, output, overwrite)
    files = write_report(output_dir, output)
    typer.echo(str(files.html))
    if files.png is not None:
        typer.echo(str(files.png))
