"""The training config (CONTRACT §H): a TOML file with kohya's `fine_tune.py` argument names, validated up front.

How a file is read (`load_config`):
- Tables other than `general` / `datasets` only group keys and are flattened (so kohya `--config_file` files with
  `[model_arguments]`, `[optimizer_arguments]` … work unchanged). A key given in two tables is an error (`files`).
- Datasets come inline (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`, kohya's dataset-config schema), from
  `dataset_config = "file.toml"`, or from the old `in_json` + `train_data_dir` keys. Values resolve subset →
  dataset → general → top-level key (kohya's argparse fall-back) → default (`datasets`).
- `--set key=value` overrides: the value is parsed as a TOML literal, else taken as a string.
- Every problem is collected and reported at once (ConfigError, exit 2) before any model loads: unknown keys get a
  "did you mean", kohya keys sdtool does not implement are rejected by name (`kohya_keys`), types are checked
  strictly (pydantic, `schema`), paths must exist and keys that only work together are checked together (`checks`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from sdtool.errors import ConfigError
from sdtool.train.config.checks import check_outputs_apart, check_train
from sdtool.train.config.datasets import read_dataset_tables, resolve_datasets
from sdtool.train.config.files import check_keys, flatten, format_validation, parse_override, read_toml
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

    check_keys(flat, TOP_KEYS, "", problems)
    known = {k: v for k, v in flat.items() if k in TOP_KEYS}
    try:
        train = TrainConfig(**known)
    except ValidationError as exc:
        format_validation(exc, "", problems)
        train = None

    dataset_tables = read_dataset_tables(flat, tables, base, problems)
    specs = resolve_datasets(dataset_tables, flat, base, problems)
    if train is not None:
        check_train(train, base, problems)
        check_outputs_apart(train, specs, problems)
    if problems:
        raise ConfigError(problems, hint=f"fix {path}")
    assert train is not None
    return ResolvedConfig(train=train, datasets=specs, path=path, dataset_tables=dataset_tables)
