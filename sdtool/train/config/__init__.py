"""The training config (CONTRACT §H): a TOML file with kohya's `fine_tune.py` argument names, validated up front.

How a file is read (`load_config`):
- Tables other than `general` / `datasets` only group keys and are flattened (so kohya `--config_file` files with
  `[model_arguments]`, `[optimizer_arguments]` … work unchanged). A key given in two tables is an error (`files`).
- Datasets come inline (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`, kohya's dataset-config schema), from
  `dataset_config = "file.toml"`, or from the old `in_json` + `train_data_dir` keys. Values resolve subset →
  dataset → general → top-level key (kohya's argparse fall-back) → default (`datasets`).
- `--set key=value` overrides: the value is parsed as a TOML literal, else taken as a string.
- Every problem is collected and reported at once (ConfigError, exit 2) before any model loads: unknown keys get a
  "did you mean", kohya keys sdtool does not implement are rejected by name unless written at a value that does
  nothing (`kohya_keys`), kohya's string resolutions ("512,512") are read as sizes, types are checked
  strictly (pydantic, `schema`), paths must exist and keys that only work together are checked together (`checks`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from sdtool.errors import ConfigError
from sdtool.models.families.base import ModelFamily
from sdtool.train.config.checks import check_outputs_apart, check_train, check_validation
from sdtool.train.config.datasets import read_dataset_tables, resolve_datasets
from sdtool.train.config.family_checks import check_family
from sdtool.train.config.files import check_keys, flatten, format_validation, parse_override, read_toml
from sdtool.train.config.kohya_keys import drop_zero_offs
from sdtool.train.config.schema import TOP_KEYS, ResolvedConfig, TrainConfig


def load_config(path: str | Path, overrides: list[str] | None = None) -> ResolvedConfig:
    """Read, flatten, override, validate and resolve a training config; raises ConfigError listing every problem."""
    path = Path(path)
    raw = read_toml(path, "config")
    problems: list[str] = []
    flat, tables = flatten(raw, problems)
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith("general."):
            tables.setdefault("general", {})[key.split(".", 1)[1]] = value
        else:
            flat[key] = value
    base = path.parent.absolute()

    drop_zero_offs(flat)
    check_keys(flat, TOP_KEYS, "", problems)
    known = {k: v for k, v in flat.items() if k in TOP_KEYS}
    try:
        train = TrainConfig(**known)
    except ValidationError as exc:
        format_validation(exc, "", problems)
        train = None

    family = _model_family(flat.get("pretrained_model_name_or_path"), base)
    dataset_tables = read_dataset_tables(flat, tables, base, problems)
    defaults = family.dataset_defaults if family is not None else {}
    specs = resolve_datasets(dataset_tables, flat, base, problems, defaults)
    if train is not None:
        check_train(train, base, problems)
        check_family(train, family, specs, problems)
        check_outputs_apart(train, specs, problems)
        check_validation(train, specs, problems)
    if problems:
        raise ConfigError(problems, hint=f"fix {path}")
    assert train is not None
    return ResolvedConfig(train=train, datasets=specs, path=path, dataset_tables=dataset_tables, family=family)


def _model_family(source: object, base: Path) -> ModelFamily | None:
    """The model's family from its small files, when it is local (hub ids and .ckpt files: known after loading)."""
    from sdtool.models.families import detect_source
    from sdtool.train.config.files import resolve_path

    if not isinstance(source, str):
        return None
    return detect_source(resolve_path(source, base))
