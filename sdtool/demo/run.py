"""`sdtool demo`: the whole chain, offline, on a generated dataset and a tiny SD-shaped model (CONTRACT §M).

Each step is printed as the command a user would type, then run through the same CLI in this process, so the demo
doubles as a tutorial: bucket → cache → train (225 tokens, clip_skip 2, samples, a validation loss on held-out
images, the run report) → convert → a sample image from the converted model.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdtool.console import err, info
from sdtool.errors import SdtoolError, UsageError

DEMO_STEPS = 30
DEMO_RESOLUTION = 128
SAMPLE_PROMPT = "a red circle on a white background"

CONFIG_TEMPLATE = """\
# The demo's training config: kohya's key names, grouped in tables as kohya's --config_file allows.
[model_arguments]
pretrained_model_name_or_path = "{model}"

[saving_arguments]
output_dir = "{output}"
output_name = "demo"
save_model_as = "safetensors"
save_precision = "fp16"

[training_arguments]
max_train_steps = {steps}
seed = 42
max_token_length = 225          # long prompts: three 75-token chunks
clip_skip = 2                   # the penultimate CLIP layer
cache_latents = true            # read what `sdtool cache` wrote
gradient_checkpointing = true
max_data_loader_n_workers = 0

[validation_arguments]
validation_split = 0.25         # 4 of the 16 images are held out: never trained on, measured at fixed noise
validate_every_n_steps = {sample_every}

[sample_arguments]
sample_prompts = "{prompts}"
sample_every_n_steps = {sample_every}
sample_sampler = "euler_a"

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-3
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 3

[general]
shuffle_caption = true
keep_tokens = 1
caption_separator = ","

[[datasets]]
resolution = {resolution}
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{metadata}"
"""

SAMPLE_PROMPTS = """\
# kohya's prompt-file format: a prompt, then --w/--h size, --d seed, --s steps, --l CFG scale, --n negative prompt
a red circle on a white background --w 128 --h 128 --d 1 --s 8 --l 5
a blue square on a black background --w 128 --h 128 --d 2 --s 8 --l 5 --n stripes
"""


# Marks a folder as the demo's own, so `--overwrite` never deletes anything else.
MARKER = ".sdtool-demo"


def prepare_folder(root: Path, overwrite: bool) -> None:
    """Make `root` an empty folder: new, empty, or (with `overwrite`) a previous demo's folder, replaced."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is not a folder", hint="pass --dir with a new or empty folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise UsageError(f"{root} is not empty", hint="pass --overwrite to replace an earlier demo, or a new --dir")
        if not (root / MARKER).is_file():
            raise UsageError(
                f"{root} is not empty and was not written by sdtool demo; --overwrite replaces only a demo's folder",
                hint="pass --dir with a new or empty folder",
            )
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by sdtool demo; `sdtool demo --overwrite` may replace this folder\n")


def run_demo(
    run_step: Callable[[list[str]], int | None],
    folder: Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Run every step; return the folder holding everything the demo wrote.

    `run_step(argv)` runs one `sdtool` command line in this process and returns its exit code (the CLI passes its
    own root command, so the demo shows exactly what a user would type and never imports the CLI back).
    """
    started = time.perf_counter()
    root = (folder or Path("sdtool-demo")).absolute()
    prepare_folder(root, overwrite)
    if device == "cpu":
        import torch

        # The tiny model is too small to gain from several threads, and on a busy machine a full thread pool per
        # process slows every step down many times over.
        torch.set_num_threads(1)
    images, model = root / "images", root / "tiny-model"
    metadata, output = root / "meta.json", root / "output"

    _section("1/6 generate a captioned image set and a tiny SD-shaped model (offline)")
    from sdtool.demo.data import make_demo_images
    from sdtool.models.tiny import save_tiny_model

    made = make_demo_images(images)
    save_tiny_model(model, "v1")
    info(f"{len(made)} images with .caption and .txt sidecars in {images}")
    info(f"tiny SD-1.x-shaped diffusers model in {model}")

    _section("2/6 bucket: read sizes, assign aspect-ratio buckets, write the metadata")
    _run(
        run_step,
        [
            "bucket",
            images,
            "-o",
            metadata,
            "--resolution",
            DEMO_RESOLUTION,
            "--min-bucket-reso",
            "64",
            "--max-bucket-reso",
            "256",
        ],
    )

    _section("3/6 cache: encode every bucketed image with the VAE (mean and std, flipped too)")
    _run(run_step, ["cache", metadata, "--model", model, "--flip-aug", "--device", device])

    _section(f"4/6 train: {DEMO_STEPS} steps, 225-token prompts, clip_skip 2, samples and validation every 10 steps")
    prompts = root / "prompts.txt"
    prompts.write_text(SAMPLE_PROMPTS)
    config = root / "config.toml"
    config.write_text(
        CONFIG_TEMPLATE.format(
            model=model.as_posix(),
            output=output.as_posix(),
            steps=DEMO_STEPS,
            device=device,
            prompts=prompts.as_posix(),
            sample_every=10,
            resolution=DEMO_RESOLUTION,
            images=images.as_posix(),
            metadata=metadata.as_posix(),
        )
    )
    info(f"config written to {config}")
    _run(run_step, ["train", config])

    _section("5/6 convert: the trained single file to a diffusers folder")
    trained = output / "demo.safetensors"
    converted = root / "demo-diffusers"
    _run(run_step, ["convert", trained, converted, "--config", model])

    _section("6/6 sample: an image from the converted model, with the same long-prompt encoding")
    sample = _sample(converted, root / "sample.png", device)
    info(f"sample written to {sample}")

    _section("done")
    for label, path in (
        ("images + captions", images),
        ("metadata", metadata),
        ("latent cache", metadata.with_suffix(".latents")),
        ("training config", config),
        ("trained model", trained),
        ("training metrics", output / "metrics.jsonl"),
        ("training samples", output / "sample"),
        ("run report", output / "report.html"),
        ("diffusers folder", converted),
        ("final sample", sample),
    ):
        info(f"  {label:<18} {path}")
    info(f"the demo took {time.perf_counter() - started:.0f} s")
    return root


def _section(title: str) -> None:
    err.rule(f"[bold]{title}", align="left")


def _run(run_step: Callable[[list[str]], int | None], args: list[object]) -> None:
    """Print the command as a user would type it, then run it through the CLI in this process."""
    argv = [str(a) for a in args]
    info(f"[cyan]$ {shlex.join(['sdtool', *argv])}[/cyan]")
    # The demo's own stdout lists its results; the steps' data lines (written paths) are shown to the reader.
    with contextlib.redirect_stdout(sys.stderr):
        code = run_step(argv)
    if code:
        raise SdtoolError(f"the demo step 'sdtool {argv[0]}' failed (exit {code})", hint="see the messages above")


def _sample(model_dir: Path, target: Path, device: str) -> Path:
    """One image from the converted model, using sdtool's sampling (the same code training samples with)."""
    from sdtool.models.loading import load_model
    from sdtool.runtime import resolve_device
    from sdtool.text import encode_prompts
    from sdtool.train.sample_prompts import SamplePrompt
    from sdtool.train.sampling import generate_samples

    model = load_model(model_dir)
    prompt = SamplePrompt(prompt=SAMPLE_PROMPT, width=DEMO_RESOLUTION, height=DEMO_RESOLUTION, seed=7, steps=12)
    paths = generate_samples(
        model.unet,
        model.vae,
        model.text_encoder,
        model.tokenizer,
        model.scheduler_config,
        [prompt],
        encode_prompts=encode_prompts,
        out_dir=target.parent / "final-sample",
        step=0,
        epoch=0,
        device=resolve_device(device),
        dtype=None,
        max_token_length=225,
        clip_skip=2,
        name_prefix="demo",
    )
    target.write_bytes(paths[0].read_bytes())
    return target
