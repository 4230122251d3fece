"""The sdtool error family and the exit codes it maps to (CONTRACT §B).

Core code raises these; the CLI turns them into one line `error: …` on stderr and an exit code.
Exit codes: 0 done, 1 runtime error, 2 usage or config error.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class SdtoolError(Exception):
    """A failure with a message a user can act on. `hint` says what to do next."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split("\n"))


class UsageError(SdtoolError):
    """Bad flags or arguments: exit 2."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """One or more problems in a training config; all of them are reported at once."""

    def __init__(self, problems: list[str] | str, hint: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        message = self.problems[0] if len(self.problems) == 1 else "; ".join(self.problems)
        super().__init__(message, hint)


class InputError(SdtoolError):
    """An input file (image, checkpoint, metadata) that cannot be used."""

    def __init__(self, path: str | Path, reason: str, hint: str | None = None):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}", hint)


class ImageError(InputError):
    """An image that cannot be read: the command skips it and names it."""


class ModelError(SdtoolError):
    """A model that cannot be loaded, detected or saved."""


class UnsafeCheckpointError(ModelError):
    """A pickled checkpoint that needs more than `weights_only=True` allows."""


class NonFiniteError(SdtoolError):
    """NaN or inf appeared in latents, a loss or gradients."""


class MissingDependencyError(SdtoolError):
    """An optional package the chosen option needs is not installed."""

    def __init__(self, package: str, needed_for: str, extra: str | None = None):
        hint = f"pip install 'sdtool[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{needed_for} needs the package '{package}', which is not installed", hint)


class StrictModeError(SdtoolError):
    """`--strict` turned skipped inputs into a failure."""
