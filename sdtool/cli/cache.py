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
    kohya = "kohya"


class KohyaName(str, Enum):
    """Which kohya scripts find the files: the suffix their latent caching strategy looks for (KOHYA_READERS)."""

    sd = "sd"
    sdxl = "sdxl"


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
        Interpolation | None,
        typer.Option(
            "--resize-interpolation",
            help="Resampling filter for the resize: PIL's lanczos/bicubic/bilinear/box/nearest, OpenCV's area, or "
            "kohya (area when shrinking, lanczos when enlarging, as sd-scripts); default: lanczos, kohya with "
            "--format kohya.",
            show_default=False,
        ),
    ] = None,
    format: Annotated[
        CacheFormat, typer.Option("--format", help="sdtool (mean+std, fingerprinted) or kohya npz.")
    ] = CacheFormat.sdtool,
    kohya_name: Annotated[
        KohyaName,
        typer.Option(
            "--kohya-name",
            help="With --format kohya, the name the kohya script you run looks for: sd = <stem>_WxH_sd.npz "
            "(train_network.py, train_textual_inversion.py, train_control_net.py, tools/cache_latents.py); "
            "sdxl = <stem>_WxH_sdxl.npz (fine_tune.py, train_db.py and the sdxl_* scripts, for SD1/2 too).",
        ),
    ] = KohyaName.sd,
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
    text_encoder_outputs: Annotated[
        bool,
        typer.Option(
            "--text-encoder-outputs",
            help="Also encode each caption with the text encoders into <META stem>.text/ (for training with "
            "cache_text_encoder_outputs_to_disk), or report them with --status.",
        ),
    ] = False,
    max_token_length: Annotated[
        int | None,
        typer.Option(
            "--max-token-length",
            help="With --text-encoder-outputs: 75, 150 or 225, as in the training config (default: 75, as a config "
            "without max_token_length).",
        ),
    ] = None,
    clip_skip: Annotated[
        int | None,
        typer.Option(
            "--clip-skip",
            help="With --text-encoder-outputs: as in the training config (default: none, as a config without "
            "clip_skip).",
        ),
    ] = None,
) -> None:
    """Encode bucketed images with the VAE and store their latents on disk."""
    from sdtool.console import Output, SkipReporter, mute_secondary_process
    from sdtool.launch import process_rank

    interpolation = resize_interpolation.value if resize_interpolation else _default_interpolation(format)
    suffix = f"_{kohya_name.value}.npz"
    if kohya_name != KohyaName.sd and format != CacheFormat.kohya:
        from sdtool.errors import UsageError

        raise UsageError("--kohya-name only names kohya-format files", hint="add --format kohya or drop --kohya-name")

    if process_rank() != 0:
        mute_secondary_process()  # under torchrun / accelerate launch rank 0 reports for all (errors still show)
    if status:
        if process_rank() != 0:
            return  # a report, not work to share: rank 0 gives it once
        if overwrite:
            from sdtool.errors import UsageError

            raise UsageError("--status only reports; it cannot be combined with --overwrite")
        from sdtool.errors import StrictModeError

        latent_problem: StrictModeError | None = None
        try:
            _print_status(
                metadata,
                model,
                vae,
                image_dir,
                cache_dir,
                format.value,
                suffix,
                flip_aug,
                interpolation,
                precision.value if precision else None,
                json_lines,
                strict,
            )
        except StrictModeError as exc:
            if not text_encoder_outputs:
                raise
            latent_problem = exc  # reported after the text-encoder outputs, so both reports show
        if text_encoder_outputs:
            _text_outputs(metadata, model, image_dir, max_token_length, clip_skip, device, True, json_lines, strict)
        if latent_problem is not None:
            raise latent_problem
        return
    from sdtool.cache.job import CacheOptions, run_cache

    options = CacheOptions(
        fmt=format.value,
        kohya_suffix=suffix,  # type: ignore[arg-type]
        cache_dir=cache_dir,
        flip_aug=flip_aug,
        batch_size=batch_size,
        interpolation=interpolation,
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
    if text_encoder_outputs and process_rank() == 0:
        _text_outputs(metadata, model, image_dir, max_token_length, clip_skip, device, False, json_lines, strict)


def _text_outputs(
    metadata: Path,
    model: str | None,
    image_dir: Path | None,
    max_token_length: int | None,
    clip_skip: int | None,
    device: str,
    status_only: bool,
    json_lines: bool,
    strict: bool,
) -> None:
    """`--text-encoder-outputs`: encode (or report) every caption's text-encoder outputs."""
    from sdtool.cache.text_outputs import run_text_cache
    from sdtool.console import Output, info
    from sdtool.errors import StrictModeError, UsageError
    from sdtool.text import num_chunks

    if model is None:
        raise UsageError("--text-encoder-outputs needs --model (the text encoders)", hint="pass --model MODEL")
    num_chunks(max_token_length)  # 75/150/225 or a usage error
    summary, rows = run_text_cache(
        metadata,
        model=model,
        image_dir=image_dir,
        max_token_length=max_token_length,
        clip_skip=clip_skip,
        device=device,
        status_only=status_only,
    )
    out = Output(json_lines)
    if status_only:
        for image, text, ok in rows:
            out.record(
                {
                    "path": str(image),
                    "kind": "text_encoder_outputs",
                    "status": "ok" if ok else "missing",
                    "caption": text,
                }
            )
    done = "" if status_only else f", {summary.encoded} encoded"
    info(f"text-encoder outputs: {summary.captions} captions{done}, {summary.missing} missing")
    if strict and status_only and summary.missing:
        raise StrictModeError(f"{summary.missing} captions have no text-encoder outputs", hint="run sdtool cache")


def _default_interpolation(fmt: CacheFormat) -> str:
    """kohya-format files follow kohya's resize rule, so both programs cache the same latents; native ones Lanczos."""
    return Interpolation.kohya.value if fmt == CacheFormat.kohya else Interpolation.lanczos.value


def _print_status(
    metadata: Path,
    model: str | None,
    vae: str | None,
    image_dir: Path | None,
    cache_dir: Path | None,
    fmt: str,
    kohya_suffix: str,
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
        kohya_suffix=kohya_suffix,  # type: ignore[arg-type]
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
