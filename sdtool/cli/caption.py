"""Write captions (.caption) for images with a BLIP-family model."""

from __future__ import annotations

from typing import Annotated

import typer

from sdtool.cli.options import (
    DEFAULT_CAPTION_EXTENSION,
    DEFAULT_DEVICE,
    BatchSizeOpt,
    CaptionExtensionOpt,
    DeviceOpt,
    ImageDirsArg,
    OverwriteOpt,
    Precision,
    PrecisionOpt,
    RecursiveOpt,
    StrictOpt,
    WorkersOpt,
    flag,
    json_option,
)

NAME = "caption"
DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"


def command(
    dirs: ImageDirsArg,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub id or local folder of a transformers image-to-text model.")
    ] = DEFAULT_MODEL,
    batch_size: BatchSizeOpt = 8,
    workers: WorkersOpt = None,
    num_beams: Annotated[int, typer.Option("--num-beams", min=1, help="Beam search width (1 = greedy).")] = 1,
    top_p: Annotated[
        float | None,
        typer.Option(
            "--top-p",
            min=0.0,
            max=1.0,
            help="Sample with nucleus (top-p) decoding, seeded by --seed (default: no sampling; greedy or beams).",
        ),
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", min=1, help="Most new tokens in a caption.")] = 75,
    min_length: Annotated[int, typer.Option("--min-length", min=0, help="Fewest new tokens in a caption.")] = 5,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", help="Text given to the model first; stripped from the output (default: none)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling.")] = 42,
    caption_extension: CaptionExtensionOpt = DEFAULT_CAPTION_EXTENSION,
    overwrite: OverwriteOpt = False,
    recursive: RecursiveOpt = False,
    json_lines: Annotated[bool, json_option('one {"path", "caption"} object per captioned image')] = False,
    precision: PrecisionOpt = Precision.fp32,
    device: DeviceOpt = DEFAULT_DEVICE,
    trust_remote_code: Annotated[bool, flag("--trust-remote-code", help="Allow model code from the hub.")] = False,
    strict: StrictOpt = False,
) -> None:
    """Write captions (.caption) for images with a BLIP-family model."""
    from sdtool.console import Output, SkipReporter
    from sdtool.label.captioners import GenerationSettings, caption_images

    settings = GenerationSettings(
        num_beams=num_beams, top_p=top_p, max_length=max_length, min_length=min_length, seed=seed
    )
    skips = SkipReporter(strict=strict)
    caption_images(
        dirs,
        model=model,
        settings=settings,
        prompt=prompt,
        extension=caption_extension,
        overwrite=overwrite,
        recursive=recursive,
        batch_size=batch_size,
        workers=workers,
        precision=precision.value,
        device=device,
        trust_remote_code=trust_remote_code,
        out=Output(json_lines),
        skips=skips,
    )
    skips.finish("captioned")
