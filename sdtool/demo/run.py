"""`sdtool demo`: the README's whole workflow, offline, on generated images and tiny models (CONTRACT §M).

Every step is printed as the command a user would type, then run through the same CLI in this process (a
`run_step` callable the CLI passes in, so this package never imports the CLI): doctor → caption → tag → bucket →
cache → cache --status → train --dry-run → train (samples, a validation loss on held-out images, the run report) →
convert, then one image from the converted model. `--sdxl` runs it with a tiny SDXL model, whose text encoders'
outputs are cached (`cache --text-encoder-outputs`) before training.

The models are tiny and untrained: the captioner writes random words, the tagger looks only at the mean colour,
and the SD model's samples are noise. That is by design: the demo shows that every step runs and where its
outputs go, in about a minute on a CPU, not what a real model learns.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.markup import escape

from sdtool.console import err, info, warn
from sdtool.errors import SdtoolError, UsageError

DEMO_STEPS = 30
DEMO_RESOLUTION = 128
SAMPLE_PROMPT = "a red circle on a white background"

# Relative paths in a config resolve against the config's folder: the demo's config works wherever the folder goes.
CONFIG_TEMPLATE = """\
# The demo's training config: kohya's key names, grouped in tables as kohya's --config_file allows.
# Relative paths resolve against this file's folder.
[model_arguments]
pretrained_model_name_or_path = "models/{model}"

[saving_arguments]
output_dir = "output"
output_name = "demo"
save_model_as = "safetensors"
save_precision = "fp16"

[training_arguments]
max_train_steps = {steps}
seed = 42
max_token_length = 225          # long prompts: three 75-token chunks
{text_options}
cache_latents = true            # train on the latents `sdtool cache` wrote (anything missing is encoded first)
cache_latents_to_disk = true    # … into the same cache folder, where `sdtool cache --status` sees it
gradient_checkpointing = true
max_data_loader_n_workers = 0

[validation_arguments]
validation_split = 0.25         # 4 of the 16 images are held out: never trained on, measured at fixed noise
validate_every_n_steps = {sample_every}

[sample_arguments]
sample_prompts = "prompts.txt"
sample_every_n_steps = {sample_every}
sample_sampler = "euler_a"

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 1e-3
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 3

[general]
{caption_options}

[[datasets]]
resolution = {resolution}
batch_size = 2

  [[datasets.subsets]]
  image_dir = "images"
  metadata_file = "meta.json"
"""


@dataclass(frozen=True)
class DemoModel:
    """What differs between the SD-1.x demo and the SDXL one (`--sdxl`): the model, and how captions reach the text
    encoders. SDXL's two frozen text encoders read the outputs `sdtool cache --text-encoder-outputs` stored, which
    rules out caption shuffling (a shuffled caption is a new text every step)."""

    family: Literal["v1", "sdxl"]
    folder: str  # under models/
    title: str
    text_options: str  # config lines
    caption_options: str  # config lines under [general]
    cache_args: tuple[str, ...]  # what `cache` stores besides the latents
    cache_what: str
    train_how: str
    clip_skip: int | None
    extra_outputs: dict[str, str]


DEMO_MODELS = {
    "v1": DemoModel(
        family="v1",
        folder="tiny-sd",
        title="SD-1.x",
        text_options="clip_skip = 2                   # the penultimate CLIP layer",
        caption_options='shuffle_caption = true\nkeep_tokens = 1\ncaption_separator = ","',
        cache_args=(),
        cache_what="",
        train_how="clip_skip 2",
        clip_skip=2,
        extra_outputs={},
    ),
    "sdxl": DemoModel(
        family="sdxl",
        folder="tiny-sdxl",
        title="SDXL",
        text_options=(
            "cache_text_encoder_outputs = true          # both text encoders' outputs, from the cache below\n"
            "cache_text_encoder_outputs_to_disk = true  # … in meta.text/, written by `sdtool cache "
            "--text-encoder-outputs`"
        ),
        caption_options="# no shuffle_caption: cached text-encoder outputs are those of each caption as written",
        # the text encoders' outputs for every caption (meta.text/), as the config's 225 tokens encode them
        cache_args=("--text-encoder-outputs", "--max-token-length", "225"),
        cache_what=", and the captions' text",
        train_how="both text encoders from the cache, size conditioning",
        clip_skip=None,
        extra_outputs={"text-encoder outputs": "meta.text"},
    ),
}

SAMPLE_PROMPTS = """\
# kohya's prompt-file format: a prompt, then --w/--h size, --d seed, --s steps, --l CFG scale, --n negative prompt
a red circle on a white background --w 128 --h 128 --d 1 --s 8 --l 5
a blue square on a black background --w 128 --h 128 --d 2 --s 8 --l 5 --n stripes
"""

# Where everything goes, relative to the demo's folder (the summary prints these; README's list is checked against
# them by tests/demo).
OUTPUTS = {
    "images, captions (.caption), tags (.txt)": "images",
    "tiny models (SD, captioner, tagger)": "models",
    "metadata (sizes, buckets, captions, tags)": "meta.json",
    "latent cache": "meta.latents",
    "sample prompts": "prompts.txt",
    "training config": "config.toml",
    "trained model": "output/demo.safetensors",
    "training metrics": "output/metrics.jsonl",
    "training samples": "output/sample",
    "run report (loss curves, validation, samples)": "output/report.html",
    "diffusers folder": "demo-diffusers",
    "sample from it": "sample.png",
}

# Marks a folder as the demo's own, so `--overwrite` never deletes anything else.
MARKER = ".sdtool-demo"


def prepare_folder(root: Path, overwrite: bool) -> None:
    """Make `root` an empty folder: new, empty, or (with `overwrite`) a previous demo's folder, replaced."""
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is not a folder", hint="pass --dir with a new or empty folder")
    from sdtool.fsutil import writable_problem

    problem = writable_problem(root)  # a file where a parent folder should be, a read-only disk …
    if problem is not None:
        raise UsageError(f"--dir {root}: {problem}", hint="pass --dir with a new or empty folder you can write to")
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
    device: str = "auto",
    overwrite: bool = False,
    family: Literal["v1", "sdxl"] = "v1",
) -> Path:
    """Run every step; return the folder holding everything the demo wrote.

    `run_step(argv)` runs one `sdtool` command line in this process and returns its exit code (the CLI passes its
    own root command, so the demo shows exactly what a user would type and never imports the CLI back).
    `family` is "v1" (a tiny SD-1.x model) or "sdxl" (a tiny SDXL model, trained on cached text-encoder outputs).
    """
    from sdtool.runtime import resolve_device

    started = time.perf_counter()
    root = (folder or Path("sdtool-demo")).absolute()
    prepare_folder(root, overwrite)
    if resolve_device(device).type == "cpu":
        import torch

        # The tiny models are too small to gain from several threads, and on a busy machine a full thread pool per
        # process slows every step down many times over.
        torch.set_num_threads(1)
    images, models = root / "images", root / "models"
    demo = DEMO_MODELS[family]
    sd_model, captioner, tagger = models / demo.folder, models / "tiny-captioner", models / "tiny-tagger"
    model_arg = f"models/{demo.folder}"
    config = root / "config.toml"
    run = _StepRunner(run_step, root)
    info(f"every step runs in {root}, as you would type it there")

    run.section("generate 16 images in five aspect ratios, and tiny models")
    from sdtool.demo.data import copy_demo_tagger, make_demo_images
    from sdtool.label.tiny import save_tiny_blip
    from sdtool.models.tiny import save_tiny_model

    made = make_demo_images(images)
    save_tiny_model(sd_model, demo.family)
    save_tiny_blip(captioner)
    copy_demo_tagger(tagger)
    info(f"{len(made)} images in {images}; tiny {demo.title}, BLIP captioner and WD14-style tagger in {models}")
    info(
        "the models are tiny and untrained, by design: captions are random words, tags come from the mean colour, "
        "and the trained model's samples are noise. The demo shows every step running, not what a model learns."
    )

    run.section("doctor: what this machine offers")
    run(["doctor"], may_fail=True)
    run.section("caption: <image>.caption, by the tiny BLIP captioner")
    run(["caption", "images", "--model", "models/tiny-captioner", "--max-length", "12", "--device", device])
    run.section("tag: <image>.txt, by the tiny WD14-style tagger")
    run(["tag", "images", "--model", "models/tiny-tagger", "--device", device])
    run.section("bucket: sizes, aspect-ratio buckets, captions, tags → meta.json")
    bucket_args = ["--resolution", DEMO_RESOLUTION, "--min-bucket-reso", "64", "--max-bucket-reso", "256"]
    run(["bucket", "images", "-o", "meta.json", *bucket_args])
    run.section(f"cache: every image through the VAE, flipped too{demo.cache_what}")
    run(["cache", "meta.json", "--model", model_arg, "--flip-aug", *demo.cache_args, "--device", device])
    run.section("cache --status: each entry checked, nothing encoded")
    run(["cache", "meta.json", "--model", model_arg, "--flip-aug", *demo.cache_args, "--status"])

    (root / "prompts.txt").write_text(SAMPLE_PROMPTS)
    text = CONFIG_TEMPLATE.format(
        model=demo.folder,
        text_options=demo.text_options,
        caption_options=demo.caption_options,
        steps=DEMO_STEPS,
        sample_every=10,
        resolution=DEMO_RESOLUTION,
    )
    config.write_text(text)
    info(f"config written to {config}, sample prompts to {root / 'prompts.txt'}")
    run.section("train --dry-run: the plan and a memory estimate")
    run(["train", "config.toml", "--dry-run"])
    run.section(f"train: {DEMO_STEPS} steps of {demo.title}, 225 tokens, {demo.train_how}, validation every 10 steps")
    run(["train", "config.toml"])
    info("the samples in output/sample are noise: a tiny untrained model learns nothing in 30 steps (by design)")

    run.section("convert: the trained file to a diffusers folder")
    run(["convert", "output/demo.safetensors", "demo-diffusers", "--config", model_arg])

    run.section("sample: one image from the converted model")
    sample = _sample(root / "demo-diffusers", root / "sample.png", device, clip_skip=demo.clip_skip)
    info(f"sample written to {sample}")

    run.section("done")
    for label, rel in {**OUTPUTS, **demo.extra_outputs}.items():
        info(f"  {label:<46} {root / rel}")
    info(f"the demo took {time.perf_counter() - started:.0f} s")
    return root


class _StepRunner:
    """Numbers the sections and runs each step as the command a user would type, from the demo's folder."""

    def __init__(self, run_step: Callable[[list[str]], int | None], root: Path):
        self.run_step = run_step
        self.root = root
        self.number = 0

    def section(self, title: str) -> None:
        if title != "done":
            self.number += 1
            title = f"{self.number}. {title}"
        err.rule(f"[bold]{title}", align="left")

    def __call__(self, args: list[object], may_fail: bool = False) -> None:
        """Print the command, then run it through the CLI in this process, in the demo's folder."""
        argv = [str(a) for a in args]
        info(f"[cyan]$ {shlex.join(['sdtool', *argv])}[/cyan]")
        # The demo's own stdout lists its results; a step's data lines (the paths it wrote) are shown in short.
        data = io.StringIO()
        with contextlib.redirect_stdout(data), contextlib.chdir(self.root):
            code = self.run_step(argv)
        lines = data.getvalue().splitlines()
        for line in lines[:2]:
            info(f"[dim]stdout: {escape(line)}[/dim]")
        if len(lines) > 2:
            info(f"[dim]stdout: … and {len(lines) - 2} more written paths[/dim]")
        if code and may_fail:
            warn(f"'sdtool {argv[0]}' reported a problem (exit {code}); the demo goes on, on this machine's CPU")
        elif code:
            raise SdtoolError(f"the demo step 'sdtool {argv[0]}' failed (exit {code})", hint="see the messages above")


def _sample(model_dir: Path, target: Path, device: str, clip_skip: int | None) -> Path:
    """One image from the converted model, using sdtool's sampling (the same code training samples with)."""
    from sdtool.console import loading
    from sdtool.models.loading import load_model
    from sdtool.runtime import resolve_device
    from sdtool.train.sample_prompts import SamplePrompt
    from sdtool.train.sampling import generate_samples

    with loading(f"the converted model {model_dir}"):
        model = load_model(model_dir)
    prompt = SamplePrompt(prompt=SAMPLE_PROMPT, width=DEMO_RESOLUTION, height=DEMO_RESOLUTION, seed=7, steps=12)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".sample-") as scratch:
        paths = generate_samples(
            model.unet,
            model.vae,
            model.text_encoders,
            model.tokenizers,
            model.scheduler_config,
            [prompt],
            encode_prompts=model.family.encode_prompts,
            family=model.family,
            out_dir=Path(scratch),
            step=0,
            epoch=0,
            device=resolve_device(device),
            dtype=None,
            max_token_length=225,
            clip_skip=clip_skip,
            name_prefix="demo",
        )
        shutil.move(paths[0], target)
    return target
