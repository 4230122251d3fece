"""Fine-tune a Stable Diffusion model from a TOML config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NAME = "train"
NO_ARGS_IS_HELP = True


def command(
    config: Annotated[Path, typer.Argument(help="Training config (TOML, kohya key names).", show_default=False)],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key: key=value (repeatable).", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate, load the dataset, print the plan; do not train.")
    ] = False,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the resolved config as TOML.")] = False,
    num_processes: Annotated[
        int | None, typer.Option("--num-processes", min=1, help="Launch this many processes (accelerate).")
    ] = None,
    num_machines: Annotated[int | None, typer.Option("--num-machines", min=1, help="Machines taking part.")] = None,
    machine_rank: Annotated[int | None, typer.Option("--machine-rank", min=0, help="This machine's rank.")] = None,
    main_process_ip: Annotated[
        str | None, typer.Option("--main-process-ip", help="Address of the rank-0 machine.")
    ] = None,
    main_process_port: Annotated[
        int | None, typer.Option("--main-process-port", help="Port of the rank-0 machine.")
    ] = None,
    accelerate_config: Annotated[
        Path | None, typer.Option("--accelerate-config", help="An accelerate config file to launch with.")
    ] = None,
) -> None:
    """Fine-tune a Stable Diffusion model from a TOML config."""
    from sdtool.errors import NotImplementedYetError

    raise NotImplementedYetError(NAME)
