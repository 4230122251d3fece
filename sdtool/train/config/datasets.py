"""The datasets of a config: inline tables, `dataset_config = "file.toml"` or the old `in_json` + `train_data_dir`,
each key resolved subset → dataset → general → top-level key → default (kohya's dataset-config schema).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sdtool.errors import ConfigError
from sdtool.train.config.files import check_keys, format_validation, read_toml, resolve_path
from sdtool.train.config.schema import (
    ARG_TO_DATASET_KEY,
    DATASET_DEFAULTS,
    DATASET_KEYS,
    FALLBACK_KEYS,
    GENERAL_KEYS,
    SUBSET_KEYS,
    CaptionOptions,
    DatasetSpec,
    GeneralLevel,
    SubsetLevel,
    SubsetSpec,
    kohya_resolution,
)


def _resolution(value: int | list[int] | str, where: str, problems: list[str]) -> tuple[int, int]:
    try:
        value = kohya_resolution(value)
    except ValueError:
        return (512, 512)  # already reported by the level's validation
    if isinstance(value, int):
        value = [value, value]
    if not isinstance(value, list) or len(value) != 2 or any(not isinstance(v, int) or v < 64 for v in value):
        problems.append(f"{where}resolution: expected a size ≥ 64 or [width, height] (got {value!r})")
        return (512, 512)
    return (value[0], value[1])


def read_dataset_tables(
    flat: dict[str, Any], tables: dict[str, Any], base: Path, problems: list[str]
) -> dict[str, Any]:
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
            data = read_toml(resolve_path(dataset_config, base), "dataset_config")
        except ConfigError as exc:
            problems.extend(exc.problems)
            return {}
        check_keys(data, {"general", "datasets"}, "dataset_config: ", problems)
        return {k: v for k, v in data.items() if k in ("general", "datasets")}
    if old_form:
        subset: dict[str, Any] = {"metadata_file": flat["in_json"]}
        if flat.get("train_data_dir") is not None:
            subset["image_dir"] = flat["train_data_dir"]
        return {"datasets": [{"subsets": [subset]}]}
    problems.append("no dataset: add [[datasets]] with [[datasets.subsets]], dataset_config, or in_json")
    return {}


def resolve_datasets(
    tables: dict[str, Any],
    flat: dict[str, Any],
    base: Path,
    problems: list[str],
    defaults: Mapping[str, Any] | None = None,
) -> list[DatasetSpec]:
    """Every dataset with its keys resolved; `defaults` (the model family's, e.g. SDXL's 1024²) go before sdtool's."""
    fallbacks = {**DATASET_DEFAULTS, **(defaults or {})}
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
    check_keys(general, GENERAL_KEYS, "general.", problems, _SUBSET_ONLY)
    validate_level(GeneralLevel, general, "general.", problems)
    # Top-level keys with dataset names act as kohya's argparse fall-backs.
    fallback = {ARG_TO_DATASET_KEY.get(k, k): v for k, v in flat.items() if k in FALLBACK_KEYS}
    specs = []
    for i, ds in enumerate(datasets):
        where = f"datasets[{i}]."
        ds_keys = {k: v for k, v in ds.items() if k != "subsets"}
        check_keys(ds, DATASET_KEYS, where, problems, _SUBSET_ONLY)
        validate_level(GeneralLevel, ds_keys, where, problems)
        subsets = ds.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            problems.append(f"{where}subsets: each dataset needs at least one [[datasets.subsets]]")
            subsets = []

        def pick(key: str, *levels: dict[str, Any]) -> Any:
            for level in levels:
                if level.get(key) is not None:
                    return level[key]
            return fallbacks[key]

        levels = (ds_keys, general, fallback)
        spec = DatasetSpec(
            resolution=_resolution(pick("resolution", *levels), where, problems),
            batch_size=pick("batch_size", *levels),
            enable_bucket=pick("enable_bucket", *levels),
            min_bucket_reso=pick("min_bucket_reso", *levels),
            max_bucket_reso=pick("max_bucket_reso", *levels),
            bucket_reso_steps=pick("bucket_reso_steps", *levels),
            bucket_no_upscale=pick("bucket_no_upscale", *levels),
            validation=_validation_flag(ds.get("validation", False), where, problems),
            validation_split=pick("validation_split", *levels),
            validation_seed=pick("validation_seed", *levels),
        )
        if spec.validation and ds_keys.get("validation_split"):
            problems.append(
                f"{where}validation_split: a dataset with validation = true is all validation images; remove one"
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
            check_keys(sub, SUBSET_KEYS, swhere, problems, _NOT_IN_SUBSET)
            validate_level(SubsetLevel, {k: v for k, v in sub.items() if k in SUBSET_KEYS}, swhere, problems)
            options = {k: pick(k, sub, *levels) for k in CaptionOptions.model_fields}
            if spec.validation:
                _validation_options(options, (sub, ds_keys), swhere, problems)
            meta = sub.get("metadata_file")
            if not isinstance(meta, str):
                if meta is None:
                    problems.append(f"{swhere}metadata_file: required (sdtool trains from metadata; run sdtool bucket)")
                continue
            meta_path = resolve_path(meta, base)
            if not meta_path.is_file():
                problems.append(f"{swhere}metadata_file: {meta_path} does not exist")
            if meta in seen:
                problems.append(f"{swhere}metadata_file: {meta} appears twice in this dataset")
            seen.add(meta)
            image_dir = sub.get("image_dir")
            image_path = resolve_path(image_dir, base) if isinstance(image_dir, str) else None
            if image_path is not None and not image_path.is_dir():
                what = "is not a folder" if image_path.exists() else "does not exist"
                problems.append(f"{swhere}image_dir: {image_path} {what}")
            spec.subsets.append(SubsetSpec(image_dir=image_path, metadata_file=meta_path, options=options))
        specs.append(spec)
    return specs


def _validation_flag(value: Any, where: str, problems: list[str]) -> bool:
    if not isinstance(value, bool):
        problems.append(f"{where}validation: expected true or false (got {value!r})")
        return False
    return value


# Keys that make training data vary from step to step; validation is deterministic, so a validation dataset
# (`validation = true`) uses each image once, unflipped, with its fixed caption.
_VARYING_KEYS = (
    "num_repeats",
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "flip_aug",
)


def _validation_options(
    options: dict[str, Any], own_levels: tuple[dict[str, Any], ...], where: str, problems: list[str]
) -> None:
    """A validation dataset's subset options: a varying key set on the dataset or subset itself is refused (it
    would be ignored); one inherited from [general] or the top level applies to the training data only."""
    for key in _VARYING_KEYS:
        if any(level.get(key) not in (None, DATASET_DEFAULTS[key]) for level in own_levels):
            problems.append(
                f"{where}{key}: has no effect on a validation dataset (each image is used once, unflipped, with its "
                "fixed caption); remove it"
            )
        options[key] = DATASET_DEFAULTS[key]


# A key that exists at another dataset level deserves a better message than "unknown".
_SUBSET_ONLY = dict.fromkeys(SUBSET_KEYS - GENERAL_KEYS, "it belongs in a subset")


_NOT_IN_SUBSET = dict.fromkeys(GENERAL_KEYS - SUBSET_KEYS, "it belongs in [general] or [[datasets]]")


def validate_level(model: type[BaseModel], values: dict[str, Any], prefix: str, problems: list[str]) -> None:
    known = {k: v for k, v in values.items() if k in model.model_fields}
    try:
        model(**known)
    except ValidationError as exc:
        format_validation(exc, prefix, problems)
