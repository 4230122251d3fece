"""Read image sizes, assign aspect-ratio buckets and write the metadata JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import (
    DEFAULT_CAPTION_EXTENSION,
    DEFAULT_TAGS_EXTENSION,
    CaptionExtensionOpt,
    ImageDirsArg,
    OverwriteOpt,
    RecursiveOpt,
    StrictOpt,
    TagsExtensionOpt,
    WorkersOpt,
    flag,
    json_option,
)

NAME = "bucket"


def command(
    ctx: typer.Context,
    dirs: ImageDirsArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Metadata JSON (or .jsonl) to write.", show_default=False)
    ],
    resolution: Annotated[
        str, typer.Option("--resolution", help="Training resolution: 512 or W,H (sets the max area).")
    ] = "512",
    min_bucket_reso: Annotated[int, typer.Option("--min-bucket-reso", min=1, help="Smallest bucket side.")] = 256,
    max_bucket_reso: Annotated[int, typer.Option("--max-bucket-reso", min=1, help="Largest bucket side.")] = 1024,
    bucket_reso_steps: Annotated[
        int,
        typer.Option("--bucket-reso-steps", min=8, help="Bucket side step (a multiple of 8; training needs 64)."),
    ] = 64,
    no_upscale: Annotated[
        bool, flag("--no-upscale", help="Never enlarge small images (buckets are made per image size).")
    ] = False,
    recursive: RecursiveOpt = False,
    caption_extension: CaptionExtensionOpt = DEFAULT_CAPTION_EXTENSION,
    tags_extension: TagsExtensionOpt = DEFAULT_TAGS_EXTENSION,
    relative: Annotated[
        bool, flag("--relative", help="Keys relative to DIR instead of absolute (one DIR only).")
    ] = False,
    update: Annotated[
        bool, flag("--update", help="Merge into an existing metadata file, keeping what it does not touch.")
    ] = False,
    overwrite: OverwriteOpt = False,
    json_lines: Annotated[bool, json_option("one object per image (path, key, size, bucket, crop …)")] = False,
    workers: WorkersOpt = None,
    strict: StrictOpt = False,
    sdxl: Annotated[
        bool,
        typer.Option(
            "--sdxl",
            help="SDXL's defaults: --resolution 1024 --min-bucket-reso 512 --max-bucket-reso 2048 (options given win).",
        ),
    ] = False,
) -> None:
    """Read image sizes, assign aspect-ratio buckets and write the metadata JSON."""
    from sdtool.bucket.algorithm import BucketSettings, adjust_min_max_to_steps, parse_resolution
    from sdtool.console import Output, SkipReporter, info, plural, progress_bar, warn
    from sdtool.errors import UsageError

    if sdxl:  # the SDXL family's dataset defaults, for each of the three options left at its own default
        from sdtool.models.families.sdxl import SDXL

        # By name: Typer carries its own copy of click's ParameterSource enum.
        given = {
            name: getattr(ctx.get_parameter_source(name), "name", "") != "DEFAULT" for name in SDXL.dataset_defaults
        }
        defaults = SDXL.dataset_defaults
        resolution = resolution if given["resolution"] else str(defaults["resolution"])
        min_bucket_reso = min_bucket_reso if given["min_bucket_reso"] else defaults["min_bucket_reso"]
        max_bucket_reso = max_bucket_reso if given["max_bucket_reso"] else defaults["max_bucket_reso"]

    # --- validate everything before reading a single image -------------------------------------------------------
    try:
        reso = parse_resolution(resolution)
    except ValueError as exc:
        raise UsageError(f"--resolution: {exc}") from None
    if bucket_reso_steps % 8:
        raise UsageError(
            f"--bucket-reso-steps must be a multiple of 8 (latents are 1/8 of the image), not {bucket_reso_steps}"
        )
    if bucket_reso_steps % 64:
        warn(f"--bucket-reso-steps {bucket_reso_steps} is not a multiple of 64, which kohya's fine_tune.py requires")
    min_reso, max_reso = adjust_min_max_to_steps(min_bucket_reso, max_bucket_reso, bucket_reso_steps)
    if (min_reso, max_reso) != (min_bucket_reso, max_bucket_reso):
        # kohya's training rounds them the same way before making buckets; doing it here keeps the bucket sets equal.
        warn(
            f"bucket limits rounded to multiples of {bucket_reso_steps}: "
            f"--min-bucket-reso {min_bucket_reso} → {min_reso}, --max-bucket-reso {max_bucket_reso} → {max_reso}"
        )
    if min_reso < bucket_reso_steps:
        raise UsageError(f"--min-bucket-reso must be at least --bucket-reso-steps ({bucket_reso_steps})")
    if min_reso > min(reso) or max_reso < max(reso):
        raise UsageError(
            f"the bucket limits {min_reso}–{max_reso} must contain the resolution {reso[0]}x{reso[1]} "
            "(--min-bucket-reso ≤ its smaller side, --max-bucket-reso ≥ its larger side)"
        )
    caption_ext = _extension("--caption-extension", caption_extension)
    tags_ext = _extension("--tags-extension", tags_extension)
    if caption_ext == tags_ext:
        raise UsageError(
            f"--caption-extension and --tags-extension are both {caption_ext}; the text would be used twice"
        )
    if relative and (len(dirs) != 1 or not dirs[0].is_dir()):
        raise UsageError(
            "--relative takes exactly one DIR (a folder): keys are resolved against one image_dir at train time",
            hint="write one metadata file per folder, or leave out --relative for absolute keys",
        )
    if update and overwrite:
        raise UsageError("--update and --overwrite exclude each other")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name such as {output / 'meta.json'}")
    from sdtool.images import check_output_path

    check_output_path(output, "--output")
    if output.exists() and not (update or overwrite):
        raise UsageError(f"{output} exists", hint="pass --update to merge into it, or --overwrite to replace it")

    from sdtool.bucket.algorithm import capped_buckets, is_degenerate
    from sdtool.bucket.scan import bucket_images, image_record, merge_rekeyed, metadata_fields
    from sdtool.fsutil import clean_leftovers_of
    from sdtool.images import find_images
    from sdtool.metadata import metadata_key, read_metadata, write_metadata

    clean_leftovers_of(output)  # what a killed run left (a live one's write is kept)
    existing = read_metadata(output) if update and output.exists() else None  # a broken file stops us here
    settings = BucketSettings(reso, min_reso, max_reso, bucket_reso_steps, no_upscale)
    if is_degenerate(settings):
        capped = capped_buckets(settings)
        warn(
            f"with --max-bucket-reso {max_reso} every non-square bucket at {reso[0]}x{reso[1]} has a {max_reso}-px "
            f"side (e.g. {capped[0][0]}x{capped[0][1]}) and less than the full area; "
            f"use --max-bucket-reso {2 * max(reso)} for real aspect-ratio buckets"
        )

    # --- read sizes (headers only) and assign buckets ----------------------------------------------------------------
    paths = find_images(dirs, recursive=recursive)
    from sdtool.bucket.scan import sidecar_path

    sidecars = [sidecar_path(p, ext) for p in paths for ext in (caption_ext, tags_ext)]
    check_output_path(output, "--output", inputs=[*paths, *sidecars])  # the same file under another name too
    with progress_bar("bucket", len(paths)) as advance:
        scan = bucket_images(
            paths, settings, caption_extension=caption_ext, tags_extension=tags_ext, workers=workers, on_done=advance
        )

    reporter = SkipReporter(strict=strict)
    reporter.extend(scan.skipped)
    reporter.extend(scan.sidecar_problems)
    reporter.ok(len(scan.images))

    # --- build and write the metadata --------------------------------------------------------------------------------
    root = dirs[0] if relative else None
    updates: dict[str, dict] = {}
    key_paths: dict[str, Path] = {}
    records = []
    for image in scan.images:
        key = metadata_key(image.path, root, relative)
        updates[key] = metadata_fields(image, settings)
        key_paths[key] = image.path
        records.append(image_record(image, key))

    if existing is not None:
        image_dir = dirs[0] if len(dirs) == 1 and dirs[0].is_dir() else None
        merged, n_rekeyed = merge_rekeyed(existing, updates, key_paths, image_dir)
        kept = len(merged) - len(updates)
        others = plural(kept, "other entry", "other entries")
        info(f"updated {output}: {plural(len(updates), 'image')} bucketed, {others} kept")
        if n_rekeyed:
            form = "relative" if relative else "absolute"
            info(f"{n_rekeyed} existing entries named the same images under other keys and now use {form} keys")
    else:
        merged = updates
        if update:
            info(f"{output} did not exist; writing a new file")
    write_metadata(output, merged)

    # --- report --------------------------------------------------------------------------------------------------
    out = Output(json_lines)
    for record in records:
        out.record(record)
    out.path(output)
    _print_summary(scan.images, settings)
    if no_upscale:
        outside = [i for i in scan.images if not _within(i.assignment.bucket, min_reso, max_reso)]
        if outside:
            b = outside[0].assignment.bucket
            warn(
                f"{len(outside)} images got buckets outside {min_reso}–{max_reso} (e.g. {b[0]}x{b[1]} for "
                f"{outside[0].path.name}): --no-upscale keeps each image's size and ignores the bucket limits "
                "(as kohya does)"
            )
    reporter.finish("bucketed")


def _extension(flag: str, value: str) -> str:
    from sdtool.errors import UsageError
    from sdtool.images import check_sidecar_extension

    ext = value.strip()
    if not ext or ext == ".":
        raise UsageError(f"{flag} must not be empty")
    if not ext.startswith("."):
        ext = "." + ext
    if "/" in ext or "\\" in ext:
        raise UsageError(f"{flag} {value!r} is not a file extension")
    check_sidecar_extension(ext, flag)
    return ext


def _within(bucket: tuple[int, int], lo: int, hi: int) -> bool:
    return lo <= min(bucket) and max(bucket) <= hi


def _print_summary(images: list, settings) -> None:
    from rich.table import Table

    from sdtool.bucket.scan import bucket_stats
    from sdtool.console import print_table

    rows = bucket_stats(images)
    if not rows:
        return
    mode = "no upscale" if settings.no_upscale else f"{len(settings.resolutions)} buckets"
    r = settings.resolution
    table = Table(
        title=f"buckets for {r[0]}x{r[1]}, sides {settings.min_bucket_reso}–{settings.max_bucket_reso} "
        f"step {settings.bucket_reso_steps} ({mode})",
        title_justify="left",
    )
    for name in ("bucket", "aspect", "images", "mean aspect error", "upscaled", "max upscale"):
        table.add_column(name, justify="left" if name == "bucket" else "right")
    total = upscaled = 0
    for row in rows:
        bw, bh = row.bucket
        total += row.count
        upscaled += row.upscaled
        table.add_row(
            f"{bw}x{bh}",
            f"{bw / bh:.3f}",
            str(row.count),
            f"{row.mean_aspect_error:.4f}",
            str(row.upscaled),
            f"{row.max_upscale:.2f}×" if row.upscaled else "–",
        )
    table.add_section()
    table.add_row("total", "", str(total), "", str(upscaled), "")
    print_table(table)
