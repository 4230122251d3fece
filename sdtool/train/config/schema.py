"""The training config's keys and types (CONTRACT §H), with kohya's names, and the resolved config they become.

Every top-level key is a typed field of `TrainConfig` (pydantic, strict); dataset keys exist at three levels
(`[general]`, `[[datasets]]`, `[[datasets.subsets]]`) and resolve subset → dataset → general → top-level key →
`DATASET_DEFAULTS`. `ResolvedConfig` is what every later stage reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

OPTIMIZERS = {
    "adamw": "AdamW",
    "adamw8bit": "AdamW8bit",
    "pagedadamw8bit": "PagedAdamW8bit",
    "lion": "Lion",
    "sgdnesterov": "SGDNesterov",
    "adafactor": "Adafactor",
    "prodigy": "Prodigy",
}


LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)


# kohya's names, plus "kohya": kohya's own rule (area when shrinking, Lanczos when enlarging); see cache/pixels.py.
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box", "kohya")


SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors", "pt")  # pt: hypernetwork runs only


def kohya_resolution(value: Any) -> Any:
    """kohya's `resolution` string ("512" or "width,height", spaces allowed) as an int or [W, H]; others unchanged.

    kohya's `--config_file` keeps TOML values as they are and then splits the string (train_util
    `prepare_dataset_args`: `tuple(int(r) for r in args.resolution.split(","))`), so its configs must write
    `resolution = "512,512"`; its dataset configs take an int or [W, H]. sdtool takes all three forms everywhere.
    """
    if not isinstance(value, str):
        return value
    try:
        sizes = [int(part) for part in value.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise ValueError(f'expected a size or "width,height", e.g. "512" or "768,512" (got {value!r})')
    return sizes[0] if len(sizes) == 1 else sizes


Resolution = Annotated[int | list[int], BeforeValidator(kohya_resolution)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


# Keys allowed at every dataset level (general, dataset, subset). None means "not set here".
class CaptionOptions(_Strict):
    num_repeats: int | None = Field(None, ge=1)
    shuffle_caption: bool | None = None
    caption_separator: str | None = None
    keep_tokens: int | None = Field(None, ge=0)
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float | None = Field(None, ge=0, le=1)
    caption_dropout_every_n_epochs: int | None = Field(None, ge=0)
    caption_tag_dropout_rate: float | None = Field(None, ge=0, le=1)
    caption_extension: str | None = None
    flip_aug: bool | None = None
    resize_interpolation: Literal[INTERPOLATIONS] | None = None  # type: ignore[valid-type]


class BucketOptions(_Strict):
    resolution: Resolution | None = None
    batch_size: int | None = Field(None, ge=1)
    enable_bucket: bool | None = None
    min_bucket_reso: int | None = Field(None, ge=64)
    max_bucket_reso: int | None = Field(None, ge=64)
    bucket_reso_steps: int | None = Field(None, ge=8)
    bucket_no_upscale: bool | None = None


# kohya's dataset-level validation keys: which images of each subset are held out of training (§O, validation.py).
class ValidationOptions(_Strict):
    validation_split: float | None = Field(None, ge=0, lt=1)
    validation_seed: int | None = Field(None, ge=0)


class SubsetLevel(CaptionOptions):
    image_dir: str | None = None
    metadata_file: str | None = None


class GeneralLevel(CaptionOptions, BucketOptions, ValidationOptions):
    pass


SUBSET_KEYS = set(SubsetLevel.model_fields)


DATASET_KEYS = set(GeneralLevel.model_fields) | {"subsets", "validation"}  # validation: sdtool's own key


GENERAL_KEYS = set(GeneralLevel.model_fields)


# Defaults when no level sets a key. Bucketing is on by default (kohya's fine_tune.py has it off).
DATASET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1,
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "secondary_separator": None,
    "caption_prefix": None,
    "caption_suffix": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "caption_extension": None,
    "flip_aug": False,
    "resize_interpolation": None,
    "resolution": 512,
    "batch_size": 1,
    "enable_bucket": True,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "validation_split": 0.0,
    "validation_seed": None,  # the run's seed (kohya's fall-back)
}


# kohya's argparse names for dataset keys (the old form and the fall-backs).
ARG_TO_DATASET_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


class TrainConfig(CaptionOptions, BucketOptions, ValidationOptions):
    """Every top-level key, with kohya's names. Dataset keys here are fall-backs for the dataset tables."""

    # model
    pretrained_model_name_or_path: str
    v2: bool | None = None
    v_parameterization: bool | None = None
    vae: str | None = None
    # dataset sources (old form)
    dataset_config: str | None = None
    train_data_dir: str | None = None
    in_json: str | None = None
    dataset_repeats: int | None = Field(None, ge=1)
    train_batch_size: int | None = Field(None, ge=1)
    # kohya's meaning: off, the VAE encodes every step; on, latents missing from the cache (or stale) are encoded
    # before the first step, into the cache folder with cache_latents_to_disk, else kept in memory for the run.
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = Field(1, ge=1)
    # outputs
    output_dir: str
    output_name: str = "last"
    save_model_as: Literal[SAVE_FORMATS] = "safetensors"  # type: ignore[valid-type]
    save_precision: Literal["float", "fp32", "fp16", "bf16"] | None = None
    use_safetensors: bool = False
    overwrite: bool = False
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_usage_hint: str | None = None
    metadata_trigger_phrase: str | None = None
    # schedule and data loading
    max_train_steps: int = Field(1600, ge=1)
    max_train_epochs: int | None = Field(None, ge=1)
    max_data_loader_n_workers: int = Field(8, ge=0)
    persistent_data_loader_workers: bool = False
    seed: int | None = Field(None, ge=0)
    # text
    max_token_length: Literal[75, 150, 225] | None = None
    clip_skip: int | None = Field(None, ge=1)
    train_text_encoder: bool = False
    learning_rate_te: float | None = Field(None, ge=0)
    # SDXL (kohya's sdxl_train.py): a rate per text encoder (0 keeps it frozen), per-block U-Net rates, and the
    # text encoders' outputs computed once instead of every step
    learning_rate_te1: float | None = Field(None, ge=0)
    learning_rate_te2: float | None = Field(None, ge=0)
    block_lr: str | list[float] | None = None
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    # precision, memory, attention
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    gradient_checkpointing: bool = False
    fused_backward_pass: bool = False  # Adafactor steps each weight as its gradient arrives (kohya's SDXL option)
    gradient_accumulation_steps: int = Field(1, ge=1)
    sdpa: bool = False
    xformers: bool = False
    mem_eff_attn: bool = False
    # noise, timesteps, loss
    noise_offset: float | None = Field(None, ge=0)
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = Field(None, ge=1)
    multires_noise_discount: float = Field(0.3, gt=0, le=1)
    ip_noise_gamma: float | None = Field(None, ge=0)
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = Field(None, ge=0, le=1000)
    max_timestep: int | None = Field(None, ge=1, le=1000)
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_schedule: Literal["snr", "constant", "exponential"] = "snr"
    huber_c: float = Field(0.1, gt=0)
    huber_scale: float = Field(1.0, gt=0)
    min_snr_gamma: float | None = Field(None, gt=0)
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False
    # optimizer and learning rate
    optimizer_type: str = "AdamW"
    optimizer_args: list[str] = Field(default_factory=list)
    use_8bit_adam: bool = False
    use_lion_optimizer: bool = False
    learning_rate: float = Field(2e-6, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1)
    lr_scheduler_power: float = 1.0
    # periodic saves, state folders and resume (CONTRACT §I)
    save_every_n_epochs: int | None = Field(None, ge=1)
    save_every_n_steps: int | None = Field(None, ge=1)
    save_n_epoch_ratio: int | None = Field(None, ge=1)
    save_last_n_epochs: int | None = Field(None, ge=1)
    save_last_n_epochs_state: int | None = Field(None, ge=1)
    save_last_n_steps: int | None = Field(None, ge=1)
    save_last_n_steps_state: int | None = Field(None, ge=1)
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: str | None = None
    # EMA of the trained weights (not a kohya fine_tune.py option; offload_ema is diffusers' example-script name)
    use_ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    offload_ema: bool = False
    # hypernetwork training (issue 12; see sdtool/train/hypernetwork/ and HypernetworkOptions for what each key means)
    train_hypernetwork: bool = False
    hypernetwork_layer_structure: list[float] = Field(default_factory=lambda: [1.0, 2.0, 1.0])
    hypernetwork_activation: str = "linear"
    hypernetwork_layer_norm: bool = False
    hypernetwork_dropout: float | list[float] = 0.0
    hypernetwork_multiplier: float = 1.0
    hypernetwork_weights: str | None = None
    # sample images
    sample_prompts: str | None = None
    sample_every_n_steps: int | None = Field(None, ge=1)
    sample_every_n_epochs: int | None = Field(None, ge=1)
    sample_at_first: bool = False
    sample_sampler: str = "ddim"
    # validation loss (CONTRACT §O; kohya's train_network.py names): when, at which timesteps, which weights, and
    # whether to keep the best model (see sdtool/train/validation.py)
    validate_every_n_steps: int | None = Field(None, ge=1)
    validate_every_n_epochs: int | None = Field(None, ge=1)
    validation_timesteps: int | list[int] = 4
    validation_weights: Literal["ema", "raw", "both"] | None = None
    save_best: bool = False
    # logging
    logging_dir: str | None = None
    log_with: Literal["tensorboard", "wandb", "all"] | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: str | None = None
    log_config: bool = False
    wandb_run_name: str | None = None

    @property
    def model_type(self) -> Literal["auto", "v2"]:
        """kohya's `v2` key for the loader: "v2" when set, else detect the family (`v2 = false` rules out SD2 only,
        which `check_family` checks against the detected family)."""
        return "v2" if self.v2 else "auto"


TOP_KEYS = set(TrainConfig.model_fields)


FALLBACK_KEYS = (GENERAL_KEYS | set(ARG_TO_DATASET_KEY)) - {"image_dir", "metadata_file"}


@dataclass
class SubsetSpec:
    """One subset with every dataset key resolved."""

    image_dir: Path | None
    metadata_file: Path
    options: dict[str, Any]


@dataclass
class DatasetSpec:
    """One dataset: its bucket settings and subsets (each with resolved caption options)."""

    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: list[SubsetSpec] = field(default_factory=list)
    validation: bool = False  # every image is a validation image (`validation = true`)
    validation_split: float = 0.0  # else this fraction of each subset (round(n × split) images) is held out
    validation_seed: int | None = None  # which ones: a hash of (seed, image path); None: the run's seed


@dataclass
class ResolvedConfig:
    """A validated config: the flat training keys, the resolved datasets, and the raw tables for printing."""

    train: TrainConfig
    datasets: list[DatasetSpec]
    path: Path
    dataset_tables: dict[str, Any]
    family: Any = None  # the model's ModelFamily when its small files told it (local models), else None

    @property
    def output_path(self) -> Path:
        """The final model: a file for safetensors/ckpt, a folder for the diffusers formats."""
        from sdtool.train.outputs import model_path

        return model_path(self.train, self.train.output_name)

    def to_toml(self) -> str:
        """The resolved config as TOML: every training key (defaults included) and the datasets as resolved."""
        flat = {k: v for k, v in self.train.model_dump().items() if v is not None and k in _PRINTED_KEYS}
        datasets = []
        for ds in self.datasets:
            subsets = []
            for sub in ds.subsets:
                entry = {k: v for k, v in sub.options.items() if v is not None}
                if sub.image_dir is not None:
                    entry["image_dir"] = str(sub.image_dir)
                entry["metadata_file"] = str(sub.metadata_file)
                subsets.append(entry)
            datasets.append(
                {
                    "resolution": list(ds.resolution),
                    "batch_size": ds.batch_size,
                    "enable_bucket": ds.enable_bucket,
                    "min_bucket_reso": ds.min_bucket_reso,
                    "max_bucket_reso": ds.max_bucket_reso,
                    "bucket_reso_steps": ds.bucket_reso_steps,
                    "bucket_no_upscale": ds.bucket_no_upscale,
                    **_validation_keys(ds),
                    "subsets": subsets,
                }
            )
        return dump_toml({**flat, "datasets": datasets})


def _validation_keys(ds: DatasetSpec) -> dict[str, Any]:
    """A dataset's validation keys when they are set (a config without validation prints as it always did)."""
    keys: dict[str, Any] = {}
    if ds.validation:
        keys["validation"] = True
    if ds.validation_split:
        keys["validation_split"] = ds.validation_split
    if ds.validation_seed is not None and (ds.validation or ds.validation_split):
        keys["validation_seed"] = ds.validation_seed
    return keys


# Dataset fall-backs and old-form keys are folded into the printed [[datasets]]; printing them again would be noise.
_PRINTED_KEYS = TOP_KEYS - FALLBACK_KEYS - {"dataset_config", "train_data_dir", "in_json"}


HYPERNETWORK_KEYS = tuple(k for k in TrainConfig.model_fields if k.startswith("hypernetwork_"))


# ---------------------------------------------------------------------------------------------------------------
def dump_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for what configs hold: scalars, arrays of scalars, tables and arrays of tables.

    Written by hand on purpose: tomli-w puts every array element on its own line and nested arrays of tables
    inline (`subsets = [{ … }]`), while a printed config should read like the README's example
    (`resolution = [512, 512]`, `[[datasets.subsets]]`). `tomllib` reads the output back in the tests.
    """
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_table(data: dict[str, Any], path: list[str], lines: list[str]) -> None:
    nested = []
    for key, value in data.items():
        if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in nested:
        sub = [*path, _key(key)]
        if isinstance(value, dict):
            lines += ["", f"[{'.'.join(sub)}]"]
            _emit_table(value, sub, lines)
        else:
            for item in value:
                lines += ["", f"[[{'.'.join(sub)}]]"]
                _emit_table(item, sub, lines)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
