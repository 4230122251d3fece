"""Encode bucketed images with the VAE and store their latents on disk."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cache.fingerprint import vae_fingerprint
from sdtool.cache.store import cache_status, count_statuses
from sdtool.cli.options import (
    DEFAULT_DEVICE,
    BatchSizeOpt,
    DeviceOpt,
    MetadataArg,
    OverwriteOpt,
    Precision,
    StrictOpt,
    WorkersOpt,
    check_model_source,
    check_weights_source,
    flag,
    json_option,
)

NAME = "cache"


class CacheFormat(str, Enum):
    sdtool = "sdtool"
    kohya = "kohya"


class Interpolation(str, Enum):
    lanczos = "lanczos"
    bicubic = "bicubic"
    bilinear = "bilinear"
    box = "box"
    nearest = "nearest"
    area = "area"


def command(
    metadata: MetadataArg,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model whose VAE encodes: hub id, folder or single file (no default; or --vae).",
            callback=check_model_source,
        ),
    ] = None,
    image_dir: Annotated[
        Path | None,
        typer.Option(
            "--image-dir", help="Folder that relative metadata keys resolve against (default: META's folder)."
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            "--vae",
            help="A separate VAE (folder, hub id or file; default: the model's).",
            callback=check_weights_source,
        ),
    ] = None,
    batch_size: BatchSizeOpt = 4,
    flip_aug: Annotated[bool, flag("--flip-aug", help="Also encode each image mirrored.")] = False,
    precision: Annotated[
        Precision | None,
        typer.Option(
            "--precision",
            help="VAE precision (default: fp32); when given, entries made at another precision are stale.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    workers: WorkersOpt = None,
    resize_interpolation: Annotated[
        Interpolation, typer.Option("--resize-interpolation", help="Resampling filter for the resize.")
    ] = Interpolation.lanczos,
    format: Annotated[
        CacheFormat, typer.Option("--format", help="sdtool (mean+std, fingerprinted) or kohya npz.")
    ] = CacheFormat.sdtool,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Where sdtool-format entries go (default: <META stem>.latents/ beside META)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    status: Annotated[
        bool,
        flag(
            "--status",
            help="Report ok/missing/stale per image without encoding (with --strict: exit 1 unless all ok).",
        ),
    ] = False,
    json_lines: Annotated[
        bool, json_option('one object per image ({"path", "status", …}; with --status: ok, missing or stale)')
    ] = False,
    strict: StrictOpt = False,
) -> None:
    """Encode bucketed images with the VAE and store their latents on disk."""
    from sdtool.console import Output, SkipReporter, mute_secondary_process
    from sdtool.launch import process_rank

    if process_rank() != 0:
        mute_secondary_process()  # under torchrun / accelerate launch rank 0 reports for all (errors still show)
    if status:
        if process_rank() != 0:
            return  # a report, not work to share: rank 0 gives it once
        if overwrite:
            from sdtool.errors import UsageError

            raise UsageError("--status only reports; it cannot be combined with --overwrite")
        _print_status(
            metadata,
            model,
            vae,
            image_dir,
            cache_dir,
            format.value,
            flip_aug,
            resize_interpolation.value,
            precision.value if precision else None,
            json_lines,
            strict,
        )
        return
    from sdtool.cache.job import CacheOptions, run_cache

    options = CacheOptions(
        fmt=format.value,
        cache_dir=cache_dir,
        flip_aug=flip_aug,
        batch_size=batch_size,
        interpolation=resize_interpolation.value,
        precision=precision.value if precision else None,
        device=device,
        workers=workers,
        overwrite=overwrite,
    )
    skips = SkipReporter(strict)
    run_cache(
        metadata,
        model=model,
        vae=vae,
        image_dir=image_dir,
        options=options,
        output=Output(json_lines),
        skips=skips,
    )
    skips.finish("cached")


def _print_status(
    metadata: Path,
    model: str | None,
    vae: str | None,
    image_dir: Path | None,
    cache_dir: Path | None,
    fmt: str,
    flip_aug: bool,
    interpolation: str,
    precision: str | None,
    json_lines: bool,
    strict: bool,
) -> None:
    """`--status`: a table of entries that are not ok (all with -v) on stderr, JSON lines on stdout; no encoding."""
    from rich.table import Table

    from sdtool.console import VERBOSE, Output, info, plural, print_table, verbosity, warn
    from sdtool.errors import SdtoolError, StrictModeError

    source = vae if vae is not None else model
    fingerprint = None
    if source is None:
        warn("the VAE is not compared: pass --model or --vae to detect entries made with another VAE")
    else:
        try:
            fingerprint = vae_fingerprint(source)
        except SdtoolError as exc:
            warn(f"the VAE is not compared: {exc.one_line()}")
    statuses = cache_status(
        metadata,
        image_dir=image_dir,
        cache_dir=cache_dir,
        fmt=fmt,  # type: ignore[arg-type]
        vae=fingerprint,
        flip_aug=flip_aug,
        interpolation=interpolation,
        precision=precision,
    )
    out = Output(json_lines)
    for st in statuses:
        out.record(st.to_json())
    counts = count_statuses(statuses)
    shown = [st for st in statuses if st.status != "ok" or verbosity() >= VERBOSE]
    if shown and not json_lines:
        table = Table("image", "status", "reason", title="latent cache")
        limit = 200 if verbosity() < VERBOSE else len(shown)
        for st in shown[:limit]:
            color = {"ok": "green", "missing": "yellow", "stale": "red"}[st.status]
            table.add_row(str(st.image_path), f"[{color}]{st.status}[/{color}]", st.reason)
        if len(shown) > limit:
            table.add_row(f"… and {len(shown) - limit} more (-v shows all)", "", "")
        print_table(table)
    info(f"{plural(len(statuses), 'image')}: {counts['ok']} ok, {counts['missing']} missing, {counts['stale']} stale")
    if strict and counts["ok"] != len(statuses):
        raise StrictModeError(
            f"{len(statuses) - counts['ok']} latent cache entries are missing or stale", hint="run sdtool cache"
        )
