"""Write booru tags (.txt) for images with a WD14 / DeepDanbooru ONNX tagger."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from sdtool.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_TAGS_EXTENSION,
    BatchSizeOpt,
    DeviceOpt,
    ImageDirsArg,
    OverwriteOpt,
    RecursiveOpt,
    StrictOpt,
    TagsExtensionOpt,
    WorkersOpt,
    flag,
    json_option,
)

NAME = "tag"
DEFAULT_MODEL = "SmilingWolf/wd-v1-4-convnext-tagger-v2"


def command(
    dirs: ImageDirsArg,
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="SmilingWolf repo id, or a folder with model.onnx + selected_tags.csv."),
    ] = DEFAULT_MODEL,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, help="Base confidence threshold.")] = 0.35,
    general_threshold: Annotated[
        float | None,
        typer.Option("--general-threshold", min=0.0, help="Threshold for general tags (default: --threshold)."),
    ] = None,
    character_threshold: Annotated[
        float | None,
        typer.Option("--character-threshold", min=0.0, help="Threshold for character tags (default: --threshold)."),
    ] = None,
    use_rating_tags: Annotated[bool, flag("--use-rating-tags", help="Put the rating tag first.")] = False,
    character_tags_first: Annotated[
        bool, flag("--character-tags-first", help="Character tags before general tags.")
    ] = False,
    remove_underscore: Annotated[
        bool, flag("--remove-underscore", help="'_' to ' ' in tags longer than 3 characters.")
    ] = False,
    undesired_tags: Annotated[
        str,
        typer.Option(
            "--undesired-tags", help="Comma-separated tags never to write (default: none).", show_default=False
        ),
    ] = "",
    always_first_tags: Annotated[
        str,
        typer.Option(
            "--always-first-tags",
            help="Comma-separated tags moved to the front, in this order (default: none).",
            show_default=False,
        ),
    ] = "",
    tag_separator: Annotated[
        str,
        typer.Option("--tag-separator", help="Separator between tags (default: comma and space).", show_default=False),
    ] = ", ",
    append: Annotated[
        bool, flag("--append", help="Keep existing tags first and add new ones not already present.")
    ] = False,
    output_path: Annotated[
        Path | None,
        typer.Option("--output-path", help="Write one metadata .json/.jsonl instead of sidecars (default: sidecars)."),
    ] = None,
    frequency: Annotated[bool, flag("--frequency", help="Report how often each tag was written.")] = False,
    tags_extension: TagsExtensionOpt = DEFAULT_TAGS_EXTENSION,
    batch_size: BatchSizeOpt = 8,
    workers: WorkersOpt = None,
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    json_lines: Annotated[bool, json_option('one {"path", "tags"} object per tagged image')] = False,
    device: DeviceOpt = DEFAULT_DEVICE,
    strict: StrictOpt = False,
) -> None:
    """Write booru tags (.txt) for images with a WD14 / DeepDanbooru ONNX tagger."""
    from sdtool.console import Output, SkipReporter
    from sdtool.label.taggers import tag_images
    from sdtool.label.tags import TagOptions, split_tag_list

    options = TagOptions(
        general_threshold=threshold if general_threshold is None else general_threshold,
        character_threshold=threshold if character_threshold is None else character_threshold,
        use_rating_tags=use_rating_tags,
        character_tags_first=character_tags_first,
        remove_underscore=remove_underscore,
        undesired_tags=tuple(split_tag_list(undesired_tags)),
        always_first_tags=tuple(split_tag_list(always_first_tags)),
        separator=tag_separator,
    )
    skips = SkipReporter(strict=strict)
    run = tag_images(
        dirs,
        model=model,
        options=options,
        extension=tags_extension,
        overwrite=overwrite,
        append=append,
        output_path=output_path,
        recursive=recursive,
        batch_size=batch_size,
        workers=workers,
        device=device,
        out=Output(json_lines),
        skips=skips,
    )
    if frequency and run.frequency:
        _print_frequency(run.frequency)
    skips.finish("tagged")


def _print_frequency(counts: Counter[str]) -> None:
    from rich.table import Table

    from sdtool.console import print_table

    table = Table("tag", "images", title="tag frequency")
    for name, count in counts.most_common():
        table.add_row(name, str(count))
    print_table(table)
