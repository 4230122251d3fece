"""Check the machine: CUDA, VRAM, xformers, bitsandbytes, onnxruntime, disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import json_option

NAME = "doctor"


def command(
    json_lines: Annotated[
        bool, json_option('the checks as one JSON object, {"checks": [{"name", "status", "detail"}, …]},')
    ] = False,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Folder whose free disk space to check (default: here).")
    ] = None,
) -> None:
    """Check the machine: CUDA, VRAM, xformers, bitsandbytes, onnxruntime, disk."""
    from rich.table import Table

    from sdtool import doctor
    from sdtool.console import print_table

    checks = doctor.run_checks(output_dir)
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}
    table = Table(title="sdtool doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{colour[c.status]}]{c.status}[/]", c.detail)
    print_table(table)
    if json_lines:
        typer.echo(json.dumps({"checks": [c.as_json() for c in checks]}, ensure_ascii=False))
    failed = doctor.failed_required(checks)
    if failed:
        from sdtool.errors import SdtoolError

        names = ", ".join(c.name for c in failed)
        raise SdtoolError(f"required checks failed: {names}", hint="see the table above")
