"""The training config (CONTRACT §H): a TOML file with kohya's `fine_tune.py` argument names, validated up front.

How a file is read:
- Tables other than `general` / `datasets` only group keys and are flattened (so kohya `--config_file` files with
  `[model_arguments]`, `[optimizer_arguments]` … work unchanged). A key given in two tables is an error.
- Datasets come inline (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`, kohya's dataset-config schema), from
  `dataset_config = "file.toml"`, or from the old `in_json` + `train_data_dir` keys. Values resolve subset →
  dataset → general → top-level key (kohya's argparse fall-back) → default.
- `--set key=value` overrides: the value is parsed as a TOML literal, else taken as a string.
- Every problem is collected and reported at once (ConfigError, exit 2) before any model loads: unknown keys get a
  "did you mean", kohya keys sdtool does not implement are rejected by name, types are checked strictly (pydantic),
  paths must exist.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdtool.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# kohya keys sdtool knows but does not implement: rejected by name with the reason, never accepted and ignored.
_LATER = "not implemented yet in sdtool"
_NO_EFFECT = "has no effect on SD1/2 fine-tuning in kohya either"
UNSUPPORTED_KEYS: dict[str, str] = {
    **dict.fromkeys(
        (
            "weighted_captions",
            "token_warmup_min",
            "token_warmup_step",
            "enable_wildcard",
            "torch_compile",
            "dynamo_backend",
            "ddp_timeout",
            "ddp_gradient_as_bucket_view",
            "ddp_static_graph",
            "lr_scheduler_type",
            "lr_scheduler_args",
            "lr_decay_steps",
            "lr_scheduler_timescale",
            "lr_scheduler_min_lr_ratio",
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
            "async_upload",
            "metadata_thumbnail",
            "metadata_merged_from",
            "metadata_preprocessor",
            "metadata_is_negative_embedding",
        ),
        _LATER,
    ),
    **dict.fromkeys(
        (
            "deepspeed",
            "zero_stage",
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients",
        ),
        "DeepSpeed is set up in an accelerate config (distributed_type: DEEPSPEED, deepspeed_config), started with "
        "sdtool train --accelerate-config FILE or accelerate launch; see README: Multi-GPU and multi-node",
    ),
    "color_aug": "not cacheable and unusable in kohya's fine_tune.py; not implemented",
    "random_crop": "not cacheable and unusable in kohya's fine_tune.py; not implemented",
    "face_crop_aug_range": "dead in kohya's fine_tune.py; not implemented",
    "alpha_mask": "kohya's fine_tune.py never applies a masked loss; not implemented",
    "fp8_base": "not implemented (kohya's fine_tune.py ignores it too)",
    "v_pred_like_loss": "ignored by kohya's fine_tune.py; not implemented",
    "fused_backward_pass": "not implemented (kohya's fine_tune.py only asserts it)",
    "diffusers_xformers": "a no-op in kohya that disables attention replacement; use xformers = true",
    "lowram": "not implemented",
    "highvram": "not implemented",
    "dataset_class": "arbitrary dataset classes are not supported",
    "debug_dataset": "use sdtool train --dry-run to inspect the dataset plan",
    "tokenizer_cache_dir": "sdtool always uses the model's own tokenizer",
    "skip_cache_check": "sdtool checks every cache entry; stale entries are refused",
    "vae_batch_size": "latents are encoded by sdtool cache, before training; use sdtool cache --batch-size",
    "cache_info": "DreamBooth-only in kohya",
    "console_log_level": "use sdtool -v / -q",
    "console_log_file": "use shell redirection of stderr",
    "console_log_simple": "use sdtool -v / -q",
    "network_multiplier": _NO_EFFECT,
    "validation_seed": "FineTuningDataset ignores validation splits; not implemented",
    "validation_split": "FineTuningDataset ignores validation splits; not implemented",
    "custom_attributes": _NO_EFFECT,
    "class_tokens": "DreamBooth-only in kohya",
    "is_reg": "DreamBooth-only in kohya",
    "conditioning_data_dir": "ControlNet-only in kohya",
    "prior_loss_weight": "DreamBooth-only in kohya",
    "caption_extention": "kohya's misspelt alias; write caption_extension",
    "wandb_api_key": "a key in a config file ends up in logs and shell history; set WANDB_API_KEY or run wandb login",
}

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
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors", "pt")  # pt: hypernetwork runs only


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
    resolution: int | list[int] | None = None
    batch_size: int | None = Field(None, ge=1)
    enable_bucket: bool | None = None
    min_bucket_reso: int | None = Field(None, ge=64)
    max_bucket_reso: int | None = Field(None, ge=64)
    bucket_reso_steps: int | None = Field(None, ge=8)
    bucket_no_upscale: bool | None = None


class SubsetLevel(CaptionOptions):
    image_dir: str | None = None
    metadata_file: str | None = None


class GeneralLevel(CaptionOptions, BucketOptions):
    pass


SUBSET_KEYS = set(SubsetLevel.model_fields)
DATASET_KEYS = set(GeneralLevel.model_fields) | {"subsets"}
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
}
# kohya's argparse names for dataset keys (the old form and the fall-backs).
ARG_TO_DATASET_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}


class TrainConfig(CaptionOptions, BucketOptions):
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
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
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
    # precision, memory, attention
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    no_half_vae: bool = False
    gradient_checkpointing: bool = False
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
    # hypernetwork training (issue 12; see sdtool/hypernetwork.py and HypernetworkOptions for what each key means)
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
    # logging
    logging_dir: str | None = None
    log_with: Literal["tensorboard", "wandb", "all"] | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    log_tracker_config: str | None = None
    log_config: bool = False
    wandb_run_name: str | None = None


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


@dataclass
class ResolvedConfig:
    """A validated config: the flat training keys, the resolved datasets, and the raw tables for printing."""

    train: TrainConfig
    datasets: list[DatasetSpec]
    path: Path
    dataset_tables: dict[str, Any]

    @property
    def output_path(self) -> Path:
        """The final model: a file for safetensors/ckpt, a folder for the diffusers formats."""
        from sdtool.train.checkpoints import model_path  # checkpoints imports this module

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
                    "subsets": subsets,
                }
            )
        return dump_toml({**flat, "datasets": datasets})


# Dataset fall-backs and old-form keys are folded into the printed [[datasets]]; printing them again would be noise.
_PRINTED_KEYS = TOP_KEYS - FALLBACK_KEYS - {"dataset_config", "train_data_dir", "in_json"}


# ---------------------------------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` → (key, value); the value is a TOML literal when it parses as one, else a plain string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path}: file not found")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ConfigError(f"{what} {path}: expected a JSON object")
            return data
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path}: not valid TOML/JSON ({exc})") from exc


def _flatten(raw: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split into (flat training keys, dataset tables); grouping tables are flattened like kohya's --config_file."""
    flat: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in raw.items():
        if key in ("general", "datasets"):
            tables[key] = value
        elif isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key in flat:
                    problems.append(f"{sub_key}: set twice (in {where[sub_key]} and in [{key}])")
                flat[sub_key], where[sub_key] = sub_value, f"[{key}]"
        else:
            if key in flat:
                problems.append(f"{key}: set twice (in {where[key]} and at the top level)")
            flat[key], where[key] = value, "the top level"
    return flat, tables


def _check_keys(
    keys: Any, allowed: set[str], where: str, problems: list[str], misplaced: dict[str, str] | None = None
) -> None:
    for key in keys:
        if key in allowed:
            continue
        label = f"{where}{key}"
        if misplaced and key in misplaced:
            problems.append(f"{label}: unknown key here ({misplaced[key]})")
            continue
        if key in UNSUPPORTED_KEYS:
            problems.append(f"{label}: kohya option not supported by sdtool ({UNSUPPORTED_KEYS[key]})")
            continue
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"{label}: unknown key{hint}")


def _format_validation(exc: ValidationError, prefix: str, problems: list[str]) -> None:
    by_key: dict[str, tuple[list[str], Any]] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = loc[0] if loc else "?"
        msg = error["msg"]
        if error["type"] == "missing":
            msg = "required key is missing"
        elif error["type"] == "literal_error":
            msg = msg.replace("Input should be", "expected")
        msgs, _ = by_key.setdefault(key, ([], error.get("input")))
        low = msg[0].lower() + msg[1:]
        if low not in msgs:
            msgs.append(low)
    for key, (msgs, value) in by_key.items():
        got = "" if msgs == ["required key is missing"] else f" (got {value!r})"
        problems.append(f"{prefix}{key}: {' or '.join(msgs)}{got}")


def _resolution(value: int | list[int], where: str, problems: list[str]) -> tuple[int, int]:
    if isinstance(value, int):
        value = [value, value]
    if len(value) != 2 or any(v < 64 for v in value):
        problems.append(f"{where}resolution: expected a size ≥ 64 or [width, height] (got {value!r})")
        return (512, 512)
    return (value[0], value[1])


def _hub_id_like(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] | None = None) -> ResolvedConfig:
    """Read, flatten, override, validate and resolve a training config; raises ConfigError listing every problem."""
    path = Path(path)
    raw = _read_toml(path, "config")
    problems: list[str] = []
    flat, tables = _flatten(raw, problems)
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith("general."):
            tables.setdefault("general", {})[key.split(".", 1)[1]] = value
        else:
            flat[key] = value
    base = path.parent.absolute()

    _check_keys(flat, TOP_KEYS, "", problems)
    known = {k: v for k, v in flat.items() if k in TOP_KEYS}
    try:
        train = TrainConfig(**known)
    except ValidationError as exc:
        _format_validation(exc, "", problems)
        train = None

    dataset_tables = _dataset_tables(flat, tables, base, problems)
    specs = _resolve_datasets(dataset_tables, flat, base, problems)
    if train is not None:
        _check_train(train, base, problems)
    if problems:
        raise ConfigError(problems, hint=f"fix {path}")
    assert train is not None
    return ResolvedConfig(train=train, datasets=specs, path=path, dataset_tables=dataset_tables)


def _dataset_tables(flat: dict[str, Any], tables: dict[str, Any], base: Path, problems: list[str]) -> dict[str, Any]:
    """The `general`/`datasets` tables from whichever source the config uses (exactly one)."""
    inline = bool(tables)
    dataset_config = flat.get("dataset_config")
    old_form = flat.get("in_json") is not None
    if inline and dataset_config:
        problems.append("dataset_config: datasets are also given inline; keep one of the two")
    if (inline or dataset_config) and (old_form or flat.get("train_data_dir") is not None):
        problems.append("in_json/train_data_dir: not used when datasets are configured; remove them")
    if inline:
        return tables
    if isinstance(dataset_config, str):
        try:
            data = _read_toml(_abs(dataset_config, base), "dataset_config")
        except ConfigError as exc:
            problems.extend(exc.problems)
            return {}
        _check_keys(data, {"general", "datasets"}, "dataset_config: ", problems)
        return {k: v for k, v in data.items() if k in ("general", "datasets")}
    if old_form:
        subset: dict[str, Any] = {"metadata_file": flat["in_json"]}
        if flat.get("train_data_dir") is not None:
            subset["image_dir"] = flat["train_data_dir"]
        return {"datasets": [{"subsets": [subset]}]}
    problems.append("no dataset: add [[datasets]] with [[datasets.subsets]], dataset_config, or in_json")
    return {}


def _abs(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p


def _resolve_datasets(
    tables: dict[str, Any], flat: dict[str, Any], base: Path, problems: list[str]
) -> list[DatasetSpec]:
    general = tables.get("general", {})
    datasets = tables.get("datasets", [])
    if not isinstance(general, dict):
        problems.append("general: expected a table")
        general = {}
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        problems.append("datasets: expected an array of tables ([[datasets]])")
        return []
    if tables and not datasets:
        problems.append("datasets: no [[datasets]] table")
    _check_keys(general, GENERAL_KEYS, "general.", problems, _SUBSET_ONLY)
    _validate_level(GeneralLevel, general, "general.", problems)
    # Top-level keys with dataset names act as kohya's argparse fall-backs.
    fallback = {ARG_TO_DATASET_KEY.get(k, k): v for k, v in flat.items() if k in FALLBACK_KEYS}
    specs = []
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]."
        ds_keys = {k: v for k, v in ds.items() if k != "subsets"}
        _check_keys(ds, DATASET_KEYS, where, problems, _SUBSET_ONLY)
        _validate_level(GeneralLevel, ds_keys, where, problems)
        subsets = ds.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            problems.append(f"{where}subsets: each dataset needs at least one [[datasets.subsets]]")
            subsets = []

        def pick(key: str, *levels: dict[str, Any]) -> Any:
            for level in levels:
                if level.get(key) is not None:
                    return level[key]
            return DATASET_DEFAULTS[key]

        levels = (ds_keys, general, fallback)
        spec = DatasetSpec(
            resolution=_resolution(pick("resolution", *levels), where, problems),
            batch_size=pick("batch_size", *levels),
            enable_bucket=pick("enable_bucket", *levels),
            min_bucket_reso=pick("min_bucket_reso", *levels),
            max_bucket_reso=pick("max_bucket_reso", *levels),
            bucket_reso_steps=pick("bucket_reso_steps", *levels),
            bucket_no_upscale=pick("bucket_no_upscale", *levels),
        )
        if (
            isinstance(spec.min_bucket_reso, int)
            and isinstance(spec.max_bucket_reso, int)
            and spec.min_bucket_reso > spec.max_bucket_reso
        ):
            problems.append(f"{where}min_bucket_reso: larger than max_bucket_reso")
        seen: set[str] = set()
        for j, sub in enumerate(subsets):
            swhere = f"{where}subsets[{j}]."
            if not isinstance(sub, dict):
                problems.append(f"{swhere[:-1]}: expected a table")
                continue
            _check_keys(sub, SUBSET_KEYS, swhere, problems, _NOT_IN_SUBSET)
            _validate_level(SubsetLevel, {k: v for k, v in sub.items() if k in SUBSET_KEYS}, swhere, problems)
            options = {k: pick(k, sub, *levels) for k in CaptionOptions.model_fields}
            meta = sub.get("metadata_file")
            if not isinstance(meta, str):
                if meta is None:
                    problems.append(f"{swhere}metadata_file: required (sdtool trains from metadata; run sdtool bucket)")
                continue
            meta_path = _abs(meta, base)
            if not meta_path.is_file():
                problems.append(f"{swhere}metadata_file: {meta_path} does not exist")
            if meta in seen:
                problems.append(f"{swhere}metadata_file: {meta} appears twice in this dataset")
            seen.add(meta)
            image_dir = sub.get("image_dir")
            image_path = _abs(image_dir, base) if isinstance(image_dir, str) else None
            if image_path is not None and not image_path.is_dir():
                what = "is not a folder" if image_path.exists() else "does not exist"
                problems.append(f"{swhere}image_dir: {image_path} {what}")
            spec.subsets.append(SubsetSpec(image_dir=image_path, metadata_file=meta_path, options=options))
        specs.append(spec)
    return specs


# A key that exists at another dataset level deserves a better message than "unknown".
_SUBSET_ONLY = dict.fromkeys(SUBSET_KEYS - GENERAL_KEYS, "it belongs in a subset")
_NOT_IN_SUBSET = dict.fromkeys(GENERAL_KEYS - SUBSET_KEYS, "it belongs in [general] or [[datasets]]")


def _validate_level(model: type[BaseModel], values: dict[str, Any], prefix: str, problems: list[str]) -> None:
    known = {k: v for k, v in values.items() if k in model.model_fields}
    try:
        model(**known)
    except ValidationError as exc:
        _format_validation(exc, prefix, problems)


def _check_train(cfg: TrainConfig, base: Path, problems: list[str]) -> None:
    """Cross-key checks and path checks that the types alone cannot express."""
    src = cfg.pretrained_model_name_or_path
    local = _abs(src, base)
    if local.exists():
        cfg.pretrained_model_name_or_path = str(local)
    elif not _hub_id_like(src):
        problems.append(f"pretrained_model_name_or_path: {local} does not exist (and is not a hub id owner/name)")
    if cfg.vae is not None:
        vae = _abs(cfg.vae, base)
        if vae.exists():
            cfg.vae = str(vae)
        elif not _hub_id_like(cfg.vae):
            problems.append(f"vae: {vae} does not exist")
    _check_hypernetwork(cfg, base, problems)  # first: it settles save_model_as, which names the output below
    cfg.output_dir = str(_abs(cfg.output_dir, base))
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"output_dir: {cfg.output_dir} exists and is not a folder; name a folder")
    if "/" in cfg.output_name or cfg.output_name in ("", ".", ".."):
        problems.append(f"output_name: {cfg.output_name!r} must be a plain file name")
    elif not cfg.overwrite:
        # A finished model is never replaced by accident; metrics.jsonl belongs to its run, so it is kept too
        # (a resumed run continues its own metrics.jsonl).
        from sdtool.train.checkpoints import model_path

        checks = [("output_name", model_path(cfg, cfg.output_name))]
        if cfg.resume is None:
            checks.append(("output_dir", Path(cfg.output_dir) / "metrics.jsonl"))
        for key, existing in checks:
            if existing.exists():
                problems.append(f"{key}: {existing} already exists; set overwrite = true to replace it")
    _check_long_run(cfg, base, problems)
    _check_model_flags(cfg, problems)

    if cfg.use_8bit_adam or cfg.use_lion_optimizer:
        legacy = "AdamW8bit" if cfg.use_8bit_adam else "Lion"
        if cfg.use_8bit_adam and cfg.use_lion_optimizer:
            problems.append("use_8bit_adam/use_lion_optimizer: set at most one")
        elif cfg.optimizer_type.lower() not in ("adamw", legacy.lower()):
            problems.append(
                f"use_8bit_adam/use_lion_optimizer: contradicts optimizer_type = {cfg.optimizer_type!r}; "
                f"remove the old flag and write optimizer_type = '{legacy}'"
            )
        else:
            cfg.optimizer_type = legacy
    _check_optimizer(cfg, problems)
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        close = difflib.get_close_matches(cfg.lr_scheduler, LR_SCHEDULERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(LR_SCHEDULERS)}"
        problems.append(f"lr_scheduler: unknown scheduler {cfg.lr_scheduler!r}{hint}")
    if isinstance(cfg.lr_warmup_steps, float) and not cfg.lr_warmup_steps < 1:
        problems.append("lr_warmup_steps: a float is a ratio of the total steps and must be < 1")
    if cfg.use_safetensors and cfg.save_model_as in ("ckpt", "diffusers"):
        problems.append(f"use_safetensors: contradicts save_model_as = {cfg.save_model_as!r}; remove one of the two")

    if cfg.full_fp16 and cfg.full_bf16:
        problems.append("full_fp16/full_bf16: choose one")
    if cfg.full_fp16 and cfg.mixed_precision != "fp16":
        problems.append("full_fp16: needs mixed_precision = 'fp16'")
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        problems.append("full_bf16: needs mixed_precision = 'bf16'")
    if cfg.mixed_precision == "fp16" and not _cuda_available():
        problems.append("mixed_precision: fp16 needs a CUDA GPU; use 'bf16' or 'no' on this machine")
    attention = [key for key in ("sdpa", "xformers", "mem_eff_attn") if getattr(cfg, key)]
    if len(attention) > 1:  # kohya silently lets one win
        problems.append(f"{'/'.join(attention)}: choose one attention implementation")
    if cfg.xformers:
        import importlib.util

        if not _cuda_available():
            problems.append("xformers: needs a CUDA GPU; remove it to use PyTorch SDPA attention (the default)")
        elif importlib.util.find_spec("xformers") is None:
            problems.append(
                "xformers: the xformers package is not installed; pip install 'sdtool[xformers]', or remove it "
                "to use PyTorch SDPA attention (the default)"
            )

    if cfg.learning_rate_te is not None and not cfg.train_text_encoder:
        problems.append(
            "learning_rate_te: set, but train_text_encoder is off; set train_text_encoder = true or remove it"
        )
    lo = cfg.min_timestep if cfg.min_timestep is not None else 0
    hi = cfg.max_timestep if cfg.max_timestep is not None else 1000
    if lo >= hi:
        problems.append(f"min_timestep/max_timestep: need min < max (got {lo} and {hi})")
    if cfg.noise_offset and cfg.multires_noise_iterations:
        problems.append("noise_offset/multires_noise_iterations: choose one kind of extra noise")
    if cfg.adaptive_noise_scale is not None and cfg.noise_offset is None:
        problems.append("adaptive_noise_scale: needs noise_offset; set noise_offset or remove adaptive_noise_scale")
    if cfg.scale_v_pred_loss_like_noise_pred and cfg.v_parameterization is False:
        problems.append(
            "scale_v_pred_loss_like_noise_pred: needs a v-prediction model; remove it or v_parameterization = false"
        )
    if cfg.huber_schedule != "snr" and cfg.loss_type not in ("huber", "smooth_l1"):
        problems.append("huber_schedule: only used with loss_type huber or smooth_l1; remove it or set loss_type")
    if not cfg.cache_latents and cfg.cache_latents_to_disk:
        problems.append("cache_latents_to_disk: contradicts cache_latents = false; remove cache_latents_to_disk")


def _check_model_flags(cfg: TrainConfig, problems: list[str]) -> None:
    """`v2` / `v_parameterization` against a local diffusers folder's own JSON configs, before any weights load.

    Only the small config files are read: a contradiction is a config problem (exit 2) and must not wait for the
    weights (a single file or a hub id is checked when it loads, which is as early as its type can be known).
    """
    from sdtool.models.loading import detect_v2

    folder = Path(cfg.pretrained_model_name_or_path)
    if (cfg.v2 is None and cfg.v_parameterization is None) or not (folder / "unet" / "config.json").is_file():
        return

    def read(rel: str) -> dict[str, Any] | None:
        try:
            data = json.loads((folder / rel).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    detected = detect_v2(read("unet/config.json"), read("text_encoder/config.json"))
    if cfg.v2 is not None and detected is not None and cfg.v2 != detected:
        kind = "SD v2" if detected else "SD v1"
        problems.append(
            f"v2: v2 = {str(cfg.v2).lower()} contradicts the model in {folder}, which is {kind}; "
            "remove v2 (it is detected from the model)"
        )
    scheduler = read("scheduler/scheduler_config.json")
    if cfg.v_parameterization is not None and scheduler is not None:
        predicts = scheduler.get("prediction_type", "epsilon")
        if cfg.v_parameterization != (predicts == "v_prediction"):
            problems.append(
                f"v_parameterization: v_parameterization = {str(cfg.v_parameterization).lower()} contradicts the "
                f"model in {folder}, whose scheduler predicts {predicts}; remove v_parameterization "
                "(it is read from the model)"
            )


def _check_long_run(cfg: TrainConfig, base: Path, problems: list[str]) -> None:
    """Saves, resume, EMA, samples and logging: keys that only work together are checked together."""
    import importlib.util

    every_epochs = cfg.save_every_n_epochs is not None or cfg.save_n_epoch_ratio is not None
    if cfg.save_every_n_epochs is not None and cfg.save_n_epoch_ratio is not None:
        problems.append("save_n_epoch_ratio: sets save_every_n_epochs from the epoch count; set only one of the two")
    needs = {
        "save_last_n_epochs": (every_epochs, "needs save_every_n_epochs (or save_n_epoch_ratio)"),
        "save_last_n_steps": (cfg.save_every_n_steps is not None, "needs save_every_n_steps"),
        "save_last_n_epochs_state": (every_epochs and cfg.save_state, "needs save_every_n_epochs and save_state"),
        "save_last_n_steps_state": (
            cfg.save_every_n_steps is not None and cfg.save_state,
            "needs save_every_n_steps and save_state",
        ),
        "ema_decay": (cfg.use_ema, "needs use_ema = true"),
        "offload_ema": (cfg.use_ema, "needs use_ema = true"),
    }
    for key, (ok, why) in needs.items():
        # A default value (as --print-config writes it) is not a request.
        if getattr(cfg, key) not in (None, False, TrainConfig.model_fields[key].default) and not ok:
            problems.append(f"{key}: {why}")

    if cfg.resume is not None:
        from sdtool.train.checkpoints import STATE_FILE

        state = _abs(cfg.resume, base)
        cfg.resume = str(state)
        if not (state / STATE_FILE).is_file():
            what = "is not an sdtool state folder" if state.is_dir() else "does not exist"
            problems.append(f"resume: {state} {what} (expected {STATE_FILE} in a <name>-state folder)")

    scheduled = cfg.sample_every_n_steps is not None or cfg.sample_every_n_epochs is not None or cfg.sample_at_first
    if cfg.sample_prompts is None:
        if scheduled:
            problems.append("sample_every_n_steps/sample_every_n_epochs/sample_at_first: need sample_prompts")
        if cfg.sample_sampler != TrainConfig.model_fields["sample_sampler"].default:
            problems.append("sample_sampler: needs sample_prompts")
    else:
        prompts = _abs(cfg.sample_prompts, base)
        cfg.sample_prompts = str(prompts)
        if not scheduled:
            problems.append(
                "sample_prompts: set, but no sample_every_n_steps, sample_every_n_epochs or sample_at_first says when"
            )
        _check_samples(cfg, prompts, problems)

    if cfg.logging_dir is not None:
        cfg.logging_dir = str(_abs(cfg.logging_dir, base))
        if Path(cfg.logging_dir).exists() and not Path(cfg.logging_dir).is_dir():
            # Found only when the tracker starts, after the model loaded.
            problems.append(f"logging_dir: {cfg.logging_dir} exists and is not a folder; name a folder")
        if cfg.log_with is None:
            cfg.log_with = "tensorboard"  # kohya's default when a logging folder is given
    elif cfg.log_with in ("tensorboard", "all"):
        problems.append(f"log_with: {cfg.log_with} needs logging_dir; set logging_dir = '<folder>'")
    if cfg.log_with is None:
        for key in ("log_prefix", "log_tracker_name", "log_tracker_config", "log_config", "wandb_run_name"):
            if getattr(cfg, key) not in (None, False):
                problems.append(f"{key}: needs logging_dir or log_with")
    for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if cfg.log_with in (tracker, "all") and importlib.util.find_spec(package) is None:
            problems.append(f"log_with: {tracker} needs the package {package!r}, which is not installed")
    if cfg.wandb_run_name is not None and cfg.log_with not in ("wandb", "all", None):
        problems.append("wandb_run_name: needs log_with = 'wandb' or 'all'")
    if cfg.log_tracker_config is not None:
        tracker_config = _abs(cfg.log_tracker_config, base)
        cfg.log_tracker_config = str(tracker_config)
        try:
            _read_toml(tracker_config, "log_tracker_config")
        except ConfigError as exc:
            problems.extend(exc.problems)


HYPERNETWORK_KEYS = tuple(k for k in TrainConfig.model_fields if k.startswith("hypernetwork_"))


def _check_hypernetwork(cfg: TrainConfig, base: Path, problems: list[str]) -> None:
    """Hypernetwork keys: valid values, a readable weights file that agrees with them, and no contradicting keys.

    A hypernetwork run writes only an A1111 `.pt` file, so `save_model_as` is "pt" there (set when left unset) and
    nowhere else.
    """
    if not cfg.train_hypernetwork:
        for key in HYPERNETWORK_KEYS:
            if key in cfg.model_fields_set and getattr(cfg, key) != TrainConfig.model_fields[key].get_default(
                call_default_factory=True
            ):
                problems.append(f"{key}: needs train_hypernetwork = true")
        if cfg.save_model_as == "pt":
            problems.append("save_model_as: 'pt' is the hypernetwork file format; it needs train_hypernetwork = true")
        return
    from sdtool.errors import SdtoolError
    from sdtool.hypernetwork import Hypernetwork, options_problems
    from sdtool.train.hypertrain import options_from

    if cfg.train_text_encoder:
        problems.append(
            "train_text_encoder: contradicts train_hypernetwork (a hypernetwork trains on a frozen text encoder)"
        )
    if "save_model_as" in cfg.model_fields_set and cfg.save_model_as != "pt":
        problems.append(
            f"save_model_as: a hypernetwork run writes an A1111 .pt file, not {cfg.save_model_as!r}; "
            "remove save_model_as or set it to 'pt'"
        )
    cfg.save_model_as = "pt"
    if cfg.use_safetensors:
        problems.append("use_safetensors: a hypernetwork run writes an A1111 .pt file")
    if cfg.save_precision not in (None, "float", "fp32"):
        problems.append("save_precision: hypernetwork files are written in float32, as A1111 writes them")
    if cfg.mem_eff_attn:
        problems.append("mem_eff_attn: hypernetwork attention runs on PyTorch SDPA or xformers; remove mem_eff_attn")
    if cfg.hypernetwork_weights is not None:
        weights = _abs(cfg.hypernetwork_weights, base)
        cfg.hypernetwork_weights = str(weights)
        if not weights.is_file():
            problems.append(f"hypernetwork_weights: {weights} does not exist")
            return
    try:
        options = options_from(cfg)
    except ValidationError as exc:
        _format_validation(exc, "", problems)
        return
    if options.hypernetwork_weights is None:
        return
    try:
        loaded = Hypernetwork.load(options.hypernetwork_weights)
    except SdtoolError as exc:
        problems.append(f"hypernetwork_weights: {exc.one_line()}")
        return
    contradictions = options_problems(loaded, options)
    problems.extend(contradictions)
    if not contradictions:
        # The file's structure wins; the resolved config (--print-config, the state's record) says what it is.
        cfg.hypernetwork_layer_structure = [float(x) for x in loaded.layer_structure]
        cfg.hypernetwork_activation = loaded.activation or "linear"
        cfg.hypernetwork_layer_norm = loaded.layer_norm
        cfg.hypernetwork_dropout = list(loaded.dropout_structure)


def _check_samples(cfg: TrainConfig, prompts: Path, problems: list[str]) -> None:
    """The prompt file parses and the sampler exists, before any model loads."""
    from sdtool.errors import SdtoolError
    from sdtool.sampling import check_sampler, read_sample_prompts

    try:
        cfg.sample_sampler = check_sampler(cfg.sample_sampler)
    except SdtoolError as exc:
        problems.append(f"sample_sampler: {exc.one_line()}")
    if not prompts.is_file():
        problems.append(f"sample_prompts: {prompts} does not exist")
        return
    try:
        if not read_sample_prompts(prompts):
            problems.append(f"sample_prompts: {prompts} has no prompts")
    except SdtoolError as exc:
        problems.append(f"sample_prompts: {exc.one_line()}")


def _check_optimizer(cfg: TrainConfig, problems: list[str]) -> None:
    import importlib.util

    name = cfg.optimizer_type
    canonical = OPTIMIZERS.get(name.lower())
    if canonical is None and "." not in name:
        close = difflib.get_close_matches(name.lower(), list(OPTIMIZERS), n=1)
        hint = f"; did you mean '{OPTIMIZERS[close[0]]}'?" if close else ""
        problems.append(f"optimizer_type: unknown optimizer {name!r}{hint} (or give a dotted class path)")
        return
    if canonical is not None:
        cfg.optimizer_type = canonical
        needs = {"Lion": "lion_pytorch", "Prodigy": "prodigyopt"}.get(canonical)
        if "8bit" in canonical.lower():
            needs = "bitsandbytes"
        if needs and importlib.util.find_spec(needs) is None:
            problems.append(f"optimizer_type: {canonical} needs the package {needs!r}, which is not installed")
    else:
        module = name.rsplit(".", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            problems.append(f"optimizer_type: cannot find the module {module!r}")
    from sdtool.train.optim import parse_optimizer_args

    try:
        parse_optimizer_args(cfg.optimizer_args)
    except ConfigError as exc:
        problems.extend(exc.problems)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------------------
def dump_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for what configs hold: scalars, arrays of scalars, tables and arrays of tables."""
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
