"""Write a run's report: loss curves, validation, samples, bucket plan and config in one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "report"
NO_ARGS_IS_HELP = True


def command(
    output_dir: Annotated[
        Path, typer.Argument(help="The output_dir of a training run (where metrics.jsonl is).", show_default=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write the page here (default: OUTPUT_DIR/report.html).", show_default=False
        ),
    ] = None,
) -> None:
    """Write a run's report: loss curves, validation, samples, bucket plan and config in one HTML page."""
    from sdtool.report import write_report

    files = write_report(output_dir, output)
    typer.echo(str(files.html))
    if files.png is not None:
        typer.echo(str(files.png))
