"""Run the whole chain offline on a generated dataset and a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import DEFAULT_DEVICE, DeviceOpt, flag

NAME = "demo"


def command(
    ctx: typer.Context,
    dir: Annotated[
        Path | None, typer.Option("--dir", help="Where the demo writes everything (default: ./sdtool-demo).")
    ] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    overwrite: Annotated[
        bool, flag("--overwrite", help="Replace the folder of an earlier demo (never any other folder).")
    ] = False,
    sdxl: Annotated[
        bool,
        flag(
            "--sdxl",
            help="Train a tiny SDXL model instead of SD-1.x: both text encoders, their outputs cached first, size "
            "conditioning.",
        ),
    ] = False,
) -> None:
    """Run the whole chain offline on a generated dataset and a tiny model."""
    from sdtool.console import QUIET, VERBOSE, verbosity
    from sdtool.demo.run import run_demo

    root_command = ctx.find_root().command
    level = {VERBOSE: ["-v"], QUIET: ["-q"]}.get(verbosity(), [])  # each step runs at the demo's own verbosity

    def run_step(argv: list[str]) -> int | None:
        return root_command.main(args=[*level, *argv], prog_name="sdtool", standalone_mode=False)

    root = run_demo(run_step, dir, device, overwrite, family="sdxl" if sdxl else "v1")
    typer.echo(str(root))
