"""Sample images during training (CONTRACT §I, kohya's `sample_images_common`), without touching the training run.

Prompts come from `sample_prompts`. Behaviour (documented differences from kohya in brackets):

* Noise comes from a CPU `torch.Generator` seeded per image, so a seed gives the same start latents on CPU and GPU.
* Prompts are encoded by the `encode_prompts` the caller passes (sdtool.text.encode_prompts): the same chunking and
  clip_skip as training [kohya's LPW pipeline keeps each chunk's BOS/EOS, a different layout]. The prompt and its
  negative are encoded as one batch, so both have the same length and need no padding.
* The scheduler is built `from_config` of the model's scheduler config, so `prediction_type` (v-prediction),
  betas and timestep spacing carry over [kohya rebuilds fixed betas and forces `clip_sample=True` for DDIM].
* File names have no timestamp [kohya appends one], so a sampling point's names are reproducible:
  `<prefix>_<step:06d>_<idx:02d>_<seed>.png` (or `<prefix>_e<epoch:06d>_…` for epoch-end sampling, as kohya), plus
  `<prefix>_<step:06d>_grid.png`; `<prefix>_` is left out when no prefix is given. Each PNG carries its settings in
  text chunks: `parameters` (A1111 style, read by most image viewers) and `sdtool` (JSON).
* Sampling never changes the training trajectory: the torch CPU, every CUDA, Python `random` and NumPy RNG states
  are saved and restored, models are put in eval mode and every submodule's train/eval flag is restored, models
  moved to `device` are moved back, and nothing runs with gradients.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sdtool.errors import MissingDependencyError, UsageError
from sdtool.fsutil import atomic_write_bytes
from sdtool.train.sample_prompts import (
    DEFAULT_SCALE,
    MAX_STEPS,
    SAMPLERS,
    SamplePrompt,
    check_sampler,
    parse_prompt_line,
)


def build_scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """The diffusers scheduler for a kohya sampler name, `from_config` of the model's config (keeps prediction_type)."""
    import diffusers

    class_name, extra = SAMPLERS[check_sampler(name)]
    if class_name == "LMSDiscreteScheduler":
        try:
            import scipy  # noqa: F401  (LMS integrates its coefficients with scipy)
        except ImportError as exc:
            raise MissingDependencyError("scipy", f"the {name} sampler") from exc
    config = dict(scheduler_config)
    # SD's PNDM configs may omit clip_sample, and DDIM would then default to clipping x0 to [-1, 1], which is wrong for
    # latents (diffusers' own pipelines turn it off); kohya forces it on, a bug we do not copy.
    config.setdefault("clip_sample", False)
    # SD's PNDM configs skip the Runge-Kutta warm-up (PLMS); with it, PNDM fails at small step counts.
    config.setdefault("skip_prk_steps", True)
    with warnings.catch_warnings():
        # kohya's "dpmsolver" is the first-order-data algorithm diffusers marks deprecated; it still works.
        warnings.simplefilter("ignore", FutureWarning)
        return getattr(diffusers, class_name).from_config(config, **extra)


def should_sample(
    step: int,
    epoch: int,
    *,
    every_n_steps: int | None,
    every_n_epochs: int | None,
    at_first: bool,
    epoch_end: bool,
) -> bool:
    """Whether to sample now, with kohya's rules (`sample_every_n_epochs` replaces the step schedule).

    Call it with `step=0, epoch_end=False` before training (true iff `at_first`), after each optimizer step with the
    global step and `epoch_end=False`, and after each epoch with `epoch` = epochs completed (1-based) and
    `epoch_end=True`. Step sampling never fires at an epoch end; epoch sampling only there.
    """
    for name, value in (("sample_every_n_steps", every_n_steps), ("sample_every_n_epochs", every_n_epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{name} must be a positive whole number, not {value!r}")
    if epoch_end:
        return every_n_epochs is not None and epoch > 0 and epoch % every_n_epochs == 0
    if step == 0:
        return at_first
    return every_n_epochs is None and every_n_steps is not None and step % every_n_steps == 0


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Save the torch CPU, every CUDA, Python `random` and NumPy RNG states and restore them on exit."""
    import numpy as np
    import torch

    cpu = torch.get_rng_state()
    # Only touch CUDA when it is already in use: querying it would otherwise initialise a context for nothing.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _inference_mode_for(models: Sequence[Any], device: Any) -> Iterator[None]:
    """Eval mode and `device` for the models, then every submodule's own train flag and device back."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    places = [(model, next(model.parameters()).device) for model in models]
    try:
        for model in models:
            model.eval()
            model.to(device)
        yield
    finally:
        for model, place in places:
            model.to(place)
        for module, training in modes:
            module.training = training


def _resolved(p: SamplePrompt, index: int, default_sampler: str, default_steps: int, size: tuple[int, int]):
    width = p.width if p.width is not None else size[0]
    height = p.height if p.height is not None else size[1]
    return {
        "prompt": p.prompt,
        "negative_prompt": p.negative_prompt,
        # kohya: round down to a multiple of 8 (the VAE's factor), at least 64
        "width": max(64, width - width % 8),
        "height": max(64, height - height % 8),
        "seed": p.seed if p.seed is not None else index,
        "scale": p.scale if p.scale is not None else DEFAULT_SCALE,
        "steps": p.steps if p.steps is not None else default_steps,
        "sampler": p.sampler or default_sampler,
    }


def sample_file_name(name_prefix: str | None, step: int, epoch: int, index: int, seed: int, epoch_end: bool) -> str:
    """kohya's sample name without its timestamp: `[prefix_]{e<epoch:06d>|<step:06d>}_<idx:02d>_<seed>.png`."""
    return f"{_point_name(name_prefix, step, epoch, epoch_end)}_{index:02d}_{seed}.png"


def _point_name(name_prefix: str | None, step: int, epoch: int, epoch_end: bool) -> str:
    point = f"e{epoch:06d}" if epoch_end else f"{step:06d}"
    return f"{name_prefix}_{point}" if name_prefix else point


def generate_samples(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    scheduler_config: dict[str, Any],
    prompts: Sequence[SamplePrompt | str],
    *,
    encode_prompts: Callable[..., Any],
    out_dir: str | Path,
    step: int,
    epoch: int,
    device: Any,
    dtype: Any,
    default_sampler: str = "ddim",
    default_steps: int = 30,
    default_size: tuple[int, int] = (512, 512),
    max_token_length: int | None = None,
    clip_skip: int | None = None,
    name_prefix: str | None = None,
    epoch_end: bool = False,
    family: Any = None,
) -> list[Path]:
    """Render one PNG per prompt and a grid into `out_dir`; returns the image paths in prompt order, then the grid.

    `prompts` may mix SamplePrompts and `.txt`-style lines; an empty list renders nothing and returns [].

    Training state is untouched: RNG states, train/eval flags and devices are restored, weights are only read.
    `dtype` is the autocast precision (float32 = none); `epoch_end=True` names files `e<epoch:06d>` like kohya.
    `text_encoder` / `tokenizer` may be lists (a family with several, e.g. SDXL), handed to `encode_prompts` as
    they are; it returns hidden states, or a `TextConditioning` whose pooled embedding goes to an SDXL pipeline
    (the `family`'s pipeline class, SD1's when None), whose size conditioning is then the sample's own size with no
    crop (as kohya samples).
    """
    import diffusers
    import torch

    from sdtool.models.families.base import TextConditioning

    default_sampler = check_sampler(default_sampler)
    if not 1 <= default_steps <= MAX_STEPS:
        raise UsageError(f"sample steps must be between 1 and {MAX_STEPS}, not {default_steps}")
    if not prompts:
        return []
    items = [p if isinstance(p, SamplePrompt) else parse_prompt_line(p, f"prompt {i}") for i, p in enumerate(prompts)]
    settings = [_resolved(p, i, default_sampler, default_steps, default_size) for i, p in enumerate(items)]
    out_dir = Path(out_dir)
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype not in (None, torch.float32))

    images = []
    encoders = text_encoder if isinstance(text_encoder, list) else [text_encoder]
    with preserved_rng_state(), torch.no_grad(), _inference_mode_for([unet, vae, *encoders], device):
        # No text encoder or tokenizer in the pipeline: prompts arrive as embeddings, which it then casts to the
        # U-Net's dtype, so a U-Net kept in a different precision from the text encoder still works.
        if family is None:
            from sdtool.models.families.sd1 import SD1 as family
        parts: dict[str, Any] = {"scheduler": build_scheduler(default_sampler, scheduler_config)}
        for part in family.text_parts:
            parts.update({part.encoder: None, part.tokenizer: None})
        # Any: diffusers' dynamic attributes are invisible to mypy
        pipe: Any = getattr(diffusers, family.pipeline_class)(vae=vae, unet=unet, **parts, **family.pipeline_options)
        pipe.set_progress_bar_config(disable=True)
        for s in settings:
            pipe.scheduler = build_scheduler(s["sampler"], scheduler_config)
            with autocast:
                encoded = encode_prompts(
                    tokenizer, text_encoder, [s["prompt"], s["negative_prompt"]], max_token_length, clip_skip
                )
                embeds = (encoded if isinstance(encoded, TextConditioning) else TextConditioning(encoded)).to(device)
                pooled = {}
                if embeds.pooled is not None:
                    pooled = {
                        "pooled_prompt_embeds": embeds.pooled[:1],
                        "negative_pooled_prompt_embeds": embeds.pooled[1:],
                    }
                # A CPU generator gives the same start noise for a seed on any device.
                generator = torch.Generator("cpu").manual_seed(s["seed"])
                latents = pipe(
                    prompt_embeds=embeds.hidden[:1],
                    negative_prompt_embeds=embeds.hidden[1:],
                    **pooled,
                    width=s["width"],
                    height=s["height"],
                    num_inference_steps=s["steps"],
                    guidance_scale=s["scale"],
                    generator=generator,
                    output_type="latent",
                ).images
                # Decode ourselves: the pipeline would feed U-Net-dtype latents to a VAE that may be in another.
                vae_dtype = next(vae.parameters()).dtype
                decoded = vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor, return_dict=False)[0]
            images.append(pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0])

    paths = []
    for index, (s, image) in enumerate(zip(settings, images, strict=True)):
        record = {**s, "step": step, "epoch": epoch, "max_token_length": max_token_length, "clip_skip": clip_skip}
        name = sample_file_name(name_prefix, step, epoch, index, s["seed"], epoch_end)
        paths.append(atomic_write_bytes(out_dir / name, _png_bytes(image, record)))
    grid_record = {"step": step, "epoch": epoch, "samples": [p.name for p in paths]}
    grid_name = f"{_point_name(name_prefix, step, epoch, epoch_end)}_grid.png"
    paths.append(atomic_write_bytes(out_dir / grid_name, _png_bytes(make_grid(images), grid_record)))
    return paths


def make_grid(images: Sequence[Any]) -> Any:
    """Tile images (sizes may differ) into a near-square grid, each in a cell as large as the largest image."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


def _png_bytes(image: Any, record: dict[str, Any]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "prompt" in record:
        info.add_text("parameters", _a1111_parameters(record))
    info.add_text("sdtool", json.dumps(record, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _a1111_parameters(r: dict[str, Any]) -> str:
    lines = [r["prompt"]]
    if r["negative_prompt"]:
        lines.append(f"Negative prompt: {r['negative_prompt']}")
    lines.append(
        f"Steps: {r['steps']}, Sampler: {r['sampler']}, CFG scale: {r['scale']}, Seed: {r['seed']}, "
        f"Size: {r['width']}x{r['height']}"
    )
    return "\n".join(lines)
