"""The `sdtool` command line: Typer wiring only.

Each command lives in its own module and imports the heavy core (torch, diffusers …) inside its function, so that
`sdtool --help` and tab completion stay fast. Known errors become one line `error: …` and an exit code here, in
one place (`guarded`).
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from sdtool import __version__
from sdtool.cli import bucket, cache, caption, convert, demo, doctor, report, tag, train
from sdtool.console import NORMAL, QUIET, VERBOSE, debug_enabled, err, error_line, set_verbosity
from sdtool.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, SdtoolError
from sdtool.runtime import quiet_third_party

app = typer.Typer(
    name="sdtool",
    help="Fine-tune Stable Diffusion (v1, v2, SDXL): caption, tag, bucket, cache, train, report, convert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail, and tracebacks on errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings, errors and data.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune Stable Diffusion (v1, v2, SDXL): caption, tag, bucket, cache, train, report, convert."""
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet exclude each other")
    set_verbosity(VERBOSE if verbose else QUIET if quiet else NORMAL)
    quiet_third_party()  # before any command imports transformers/diffusers (they read it at import time)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn sdtool errors into `error: …` + exit code; other exceptions into a one-line internal error."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except SdtoolError as exc:
            if debug_enabled():
                err.print(traceback.format_exc(), markup=False, highlight=False)
            error_line(exc.one_line())
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if debug_enabled():
                err.print(traceback.format_exc(), markup=False, highlight=False)
            error_line(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


for _module in (caption, tag, bucket, cache, train, report, convert, doctor, demo):
    app.command(_module.NAME, no_args_is_help=_module.NO_ARGS_IS_HELP)(guarded(_module.command))


def main() -> None:
    """Entry point of the `sdtool` executable and of `python -m sdtool`."""
    app(prog_name="sdtool")


if __name__ == "__main__":  # pragma: no cover
    main()
