"""Reading a config file: TOML/JSON, grouping tables flattened as kohya's `--config_file` does, `--set` overrides,
unknown keys with a "did you mean", and pydantic's errors as one line per key.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.markup import escape

from sdtool.errors import ConfigError
from sdtool.train.config.kohya_keys import UNSUPPORTED_KEYS, is_noop


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


def read_toml(path: Path, what: str) -> dict[str, Any]:
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


DATASET_TABLES = {"general": "[general]", "datasets": "[[datasets]]"}


def misspelled_table(name: str) -> str | None:
    """`[[datasets]]` for `[[dataset]]`, `[general]` for `[genral]`: the dataset table a name was meant to be."""
    close = difflib.get_close_matches(name.lower(), list(DATASET_TABLES), n=1, cutoff=0.75)
    return DATASET_TABLES[close[0]] if close else None


def flatten(raw: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split into (flat training keys, dataset tables); grouping tables are flattened like kohya's --config_file.

    A table whose name is close to `general` or `datasets` is taken for a typo of it, not for a grouping table:
    its keys would otherwise apply to every dataset, or be rejected one by one without saying why.
    """
    flat: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    where: dict[str, str] = {}
    for key, value in raw.items():
        array = isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
        meant = misspelled_table(key) if (array or isinstance(value, dict)) and key not in DATASET_TABLES else None
        if meant is not None:
            shown = f"[[{key}]]" if isinstance(value, list) else f"[{key}]"
            problems.append(f"{shown}: unknown table; did you mean {meant}?")
        elif key in ("general", "datasets"):
            tables[key] = value
        elif array:
            problems.append(f"[[{key}]]: unknown table (an array of tables); only [[datasets]] is one")
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


def check_keys(
    values: dict[str, Any],
    allowed: set[str],
    where: str,
    problems: list[str],
    misplaced: dict[str, str] | None = None,
) -> None:
    """Every key of `values` that is not `allowed` is a problem, except a kohya key at a value that does nothing
    (`kohya_keys.is_noop`), which is accepted and named at -v."""
    from sdtool.console import debug

    for key, value in values.items():
        if key in allowed:
            continue
        label = f"{where}{key}"
        if misplaced and key in misplaced:
            problems.append(f"{label}: unknown key here ({misplaced[key]})")
            continue
        if key in UNSUPPORTED_KEYS:
            if is_noop(key, value, values):
                shown = json.dumps(value, ensure_ascii=False, default=str)
                debug(escape(f"{label} = {shown}: accepted, it does nothing in kohya either ({UNSUPPORTED_KEYS[key]})"))
                continue
            # The value is not repeated: it may be a secret (huggingface_token, wandb_api_key).
            problems.append(f"{label}: kohya option not supported by sdtool ({UNSUPPORTED_KEYS[key]})")
            continue
        close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"{label}: unknown key{hint}")


def format_validation(exc: ValidationError, prefix: str, problems: list[str]) -> None:
    by_key: dict[str, tuple[list[str], Any]] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = loc[0] if loc else "?"
        msg = error["msg"].removeprefix("Value error, ")
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


def hub_id_like(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def resolve_path(value: str, base: Path) -> Path:
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base / p
