"""The `sdtool` command line: Typer wiring only.

Each command lives in its own module and imports the heavy core (torch, diffusers …) inside its function, so that
`sdtool --help` and tab completion stay fast. Known errors become one line `error: …` and an exit code here, in
one place (`guarded`).
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer

from sdtool import __version__
from sdtool.cli import bucket, cache, caption, convert, demo, doctor, report, tag, train
from sdtool.cli.options import QuietOpt, VerboseOpt
from sdtool.console import NORMAL, QUIET, VERBOSE, debug_enabled, err, error_line, set_verbosity, verbosity
from sdtool.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, SdtoolError, UsageError
from sdtool.runtime import quiet_third_party

app = typer.Typer(
    name="sdtool",
    help="Fine-tune Stable Diffusion (v1, v2, SDXL): caption, tag, bucket, cache, train, report, convert.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdtool {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, show_default=False, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Fine-tune Stable Diffusion (v1, v2, SDXL): caption, tag, bucket, cache, train, report, convert."""
    if verbose and quiet:
        raise typer.BadParameter("--verbose and --quiet exclude each other")
    set_verbosity(VERBOSE if verbose else QUIET if quiet else NORMAL)
    quiet_third_party()  # before any command imports transformers/diffusers (they read it at import time)


def with_verbosity_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the global -v/-q too, so `sdtool CMD … -q` works as well as `sdtool -q CMD …`.

    The flags are added to the command's signature (which Typer reads), so every command has them without
    declaring them itself.
    """
    signature = inspect.signature(fn, eval_str=True)

    @functools.wraps(fn)
    def wrapper(*args: Any, verbose: bool = False, quiet: bool = False, **kwargs: Any) -> Any:
        level = verbosity()
        if (verbose and quiet) or (verbose and level == QUIET) or (quiet and level == VERBOSE):
            raise UsageError("--verbose and --quiet exclude each other")
        if verbose or quiet:
            set_verbosity(VERBOSE if verbose else QUIET)
        return fn(*args, **kwargs)

    extra = [
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=VerboseOpt),
        inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=QuietOpt),
    ]
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**fn.__annotations__, "verbose": VerboseOpt, "quiet": QuietOpt}
    return wrapper


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
            # A second Ctrl-C during training lands here too: stopped at once, nothing more saved.
            error_line("interrupted: outputs already written are whole and kept; run the same command to continue")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if debug_enabled():
                err.print(traceback.format_exc(), markup=False, highlight=False)
            from sdtool.fsutil import os_error

            known = os_error(exc) if isinstance(exc, OSError) else None  # a full disk, a read-only folder …
            if known is not None:
                error_line(known.one_line())
                raise typer.Exit(known.exit_code) from None
            error_line(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
            raise typer.Exit(EXIT_RUNTIME) from None

    return wrapper


for _module in (caption, tag, bucket, cache, train, report, convert, doctor, demo):
    # A command run without its arguments prints a short usage and the error on stderr (exit 2), never the help.
    app.command(_module.NAME)(guarded(with_verbosity_flags(_module.command)))


def main() -> None:
    """Entry point of the `sdtool` executable and of `python -m sdtool`."""
    app(prog_name="sdtool")


if __name__ == "__main__":  # pragma: no cover
    main()
