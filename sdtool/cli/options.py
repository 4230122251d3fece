"""Shared option and argument aliases: a flag means the same on every command (CONTRACT §A, §B).

Input arguments check their path before the command runs, so a missing path, or a path of the wrong kind, is a
usage error (exit 2) on every command, with a hint naming the input that was expected.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DEFAULT_DEVICE = "auto"


def _check_device(value: str) -> str:
    v = value.strip().lower()
    if v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise typer.BadParameter("expected auto, cpu, cuda or cuda:N")


def flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean flag: off unless given (every sdtool flag is; none has a --no- form)."""
    return typer.Option(*names, help=help, show_default=False)


# ----------------------------------------------------------------------------------------------- input paths
def _hub_id_like(value: str) -> bool:
    return value.count("/") == 1 and not value.startswith((".", "/", "~"))


def _check_image_inputs(values: list[Path] | None) -> list[Path] | None:
    """Each input is a folder or an image file; anything else is a usage error naming what was expected."""
    from sdtool.images import is_image_path

    for path in values or ():
        if not path.exists():
            raise typer.BadParameter(f"{path} does not exist; expected a folder of images")
        if path.is_file() and not is_image_path(path):
            hint = ""
            if path.suffix.lower() in (".json", ".jsonl"):
                hint = " (to label the images of a metadata file, pass the folder they are in)"
            raise typer.BadParameter(f"{path} is a file, not an image or a folder of images{hint}")
    return values


def _check_metadata_input(value: Path | None) -> Path | None:
    """The metadata JSON written by `sdtool bucket -o`; a folder gets a hint naming the file it may hold."""
    if value is None:
        return value
    if value.is_dir():
        found = sorted(p.name for p in value.glob("*.json*") if p.is_file())
        hint = f"; it holds {', '.join(found[:3])}" if found else f"; sdtool bucket {value} -o {value / 'meta.json'}"
        raise typer.BadParameter(f"{value} is a folder, not the metadata JSON that 'sdtool bucket -o' writes{hint}")
    if not value.exists():
        raise typer.BadParameter(f"{value} does not exist; expected the metadata JSON that 'sdtool bucket -o' writes")
    return value


def _check_config_input(value: Path | None) -> Path | None:
    """The training config (TOML); a folder gets a hint naming the .toml files in it."""
    if value is None:
        return value
    if value.is_dir():
        found = sorted(p.name for p in value.glob("*.toml") if p.is_file())
        hint = f"; it holds {', '.join(found[:3])}" if found else ""
        raise typer.BadParameter(f"{value} is a folder, not a training config (a .toml file){hint}")
    if not value.exists():
        raise typer.BadParameter(f"{value} does not exist; expected a training config (a .toml file)")
    return value


def _check_run_input(value: Path | None) -> Path | None:
    """A training run's output_dir (where metrics.jsonl and run.json are); a file in it gets the folder as a hint."""
    if value is None:
        return value
    expected = "expected the output_dir of a training run (the folder that holds metrics.jsonl)"
    if value.is_file():
        raise typer.BadParameter(f"{value} is a file; {expected}: {value.parent}?")
    if not value.exists():
        raise typer.BadParameter(f"{value} does not exist; {expected}")
    return value


def check_model_source(value: str | None) -> str | None:
    """A single-file checkpoint, a diffusers folder or a hub id (owner/name)."""
    if value is None:
        return value
    path = Path(value).expanduser()
    expected = "expected a .safetensors/.ckpt file, a diffusers folder or a hub id (owner/name)"
    if path.is_dir() and not ((path / "model_index.json").is_file() or (path / "unet").is_dir()):
        raise typer.BadParameter(
            f"{value} is a folder without model_index.json or unet/, not a diffusers model; {expected}"
        )
    if not path.exists() and not _hub_id_like(value):
        raise typer.BadParameter(f"{value} does not exist; {expected}")
    return value


def check_weights_source(value: str | None) -> str | None:
    """A VAE or model given as an option: an existing file or folder, or a hub id."""
    if value is not None and not Path(value).expanduser().exists() and not _hub_id_like(value):
        raise typer.BadParameter(f"{value} does not exist; expected a file, a folder or a hub id (owner/name)")
    return value


ImageDirsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Folders (or image files) to process.",
        metavar="DIR",
        show_default=False,
        callback=_check_image_inputs,
    ),
]
MetadataArg = Annotated[
    Path,
    typer.Argument(
        help="Metadata JSON written by 'sdtool bucket -o'.",
        metavar="META",
        show_default=False,
        callback=_check_metadata_input,
    ),
]
ConfigArg = Annotated[
    Path,
    typer.Argument(
        help="Training config (TOML, kohya key names).",
        metavar="CONFIG",
        show_default=False,
        callback=_check_config_input,
    ),
]
ModelSourceArg = Annotated[
    str,
    typer.Argument(
        help="Single file (.safetensors/.ckpt), diffusers folder or hub id.",
        metavar="SRC",
        show_default=False,
        callback=check_model_source,
    ),
]
RunDirArg = Annotated[
    Path,
    typer.Argument(
        help="The output_dir of a training run (where metrics.jsonl is).",
        metavar="RUN",
        show_default=False,
        callback=_check_run_input,
    ),
]
# What each argument of a command expects, by its metavar (tests/cli/test_conventions.py checks every command's
# arguments against this table, so a new argument states what it takes).
INPUT_KINDS = {
    "DIR": "image folders",
    "META": "metadata file",
    "CONFIG": "config file",
    "SRC": "model",
    "RUN": "training output",
}
OUTPUT_ARGS = {"DST"}

# ----------------------------------------------------------------------------------------------- shared options
ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local diffusers/transformers folder, or single file."),
]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.", callback=_check_device),
]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="Compute precision.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", "-j", min=0, help="Parallel image readers (default: one per CPU core)."),
]
RecursiveOpt = Annotated[bool, flag("--recursive", "-r", help="Walk sub-folders too.")]
OverwriteOpt = Annotated[bool, flag("--overwrite", help="Replace existing outputs instead of keeping them.")]
StrictOpt = Annotated[bool, flag("--strict", help="Exit 1 if any input was skipped.")]
CaptionExtensionOpt = Annotated[str, typer.Option("--caption-extension", help="Caption sidecar extension.")]
TagsExtensionOpt = Annotated[str, typer.Option("--tags-extension", help="Tags sidecar extension.")]
DEFAULT_CAPTION_EXTENSION = ".caption"
DEFAULT_TAGS_EXTENSION = ".txt"


def json_option(what: str) -> typer.models.OptionInfo:
    """`--json`, saying what it prints (each command's records differ)."""
    return flag("--json", help=f"Print {what} on stdout.")


VerboseOpt = Annotated[bool, flag("--verbose", "-v", help="More detail, and tracebacks on errors.")]
QuietOpt = Annotated[bool, flag("--quiet", "-q", help="Only warnings, errors and data.")]
