"""Periodic saves, their pruning, and state folders for an exact resume (CONTRACT §I).

Their names come from outputs.py (kohya's `<name>-<epoch:06d>`, `<name>-step<step:08d>`, `<stem>-state`).

A state folder holds what `accelerate.save_state` writes (trained weights, optimizer, grad scaler, every RNG and
accelerate's gradient-accumulation counter; loaded back with `weights_only=True`) plus `sdtool_state.json` (step,
epoch, position in the bucket sampler, seed, learning-rate schedule, the resolved config) and, with EMA,
`ema.safetensors`. It is written to `.<name>.partial.tmp` and renamed, so a folder under its final name is complete.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from sdtool.console import warn
from sdtool.errors import ConfigError, SdtoolError
from sdtool.fsutil import (
    PARTIAL_TAG,
    TEMP_SUFFIX,
    clean_leftovers_of,
    held_by_live_process,
    owned,
    replace_folder,
    write_error,
)
from sdtool.train.config.schema import ResolvedConfig, TrainConfig
from sdtool.train.outputs import EMA_FILE, STATE_FILE

STATE_FORMAT = 1


def periodic_saves(cfg: TrainConfig, kind: str, states: bool) -> dict[int, Path]:
    """Existing periodic models (or state folders) of this output name: {epoch or step: path}."""
    name = re.escape(cfg.output_name)
    number = r"step(\d{8})" if kind == "step" else r"(\d{6})"
    if states:
        suffix = "-state"
    elif cfg.save_model_as.startswith("diffusers"):
        suffix = ""
    else:
        suffix = re.escape(f".{cfg.save_model_as}")
    pattern = re.compile(f"{name}-{number}{suffix}")
    found = {}
    out = Path(cfg.output_dir)
    if out.is_dir():
        for path in out.iterdir():
            match = pattern.fullmatch(path.name)
            if match and (path.is_dir() if states or not suffix else path.is_file()):
                found[int(match.group(1))] = path
    return found


def prune(cfg: TrainConfig, kind: str, states: bool, keep_after: int) -> list[Path]:
    """Delete periodic saves numbered `keep_after` or lower; returns what was deleted."""
    removed = []
    for number, path in sorted(periodic_saves(cfg, kind, states).items()):
        if number <= keep_after:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def prune_after_save(cfg: TrainConfig, kind: str, number: int, every: int) -> None:
    """Apply save_last_n_* after a periodic save at epoch/step `number`.

    Steps (kohya: "remove older checkpoints if N steps elapsed"): keep the saves of the last N steps, i.e. steps
    greater than `number − N`. Epochs (kohya: "save last N checkpoints"): keep the last N epoch saves, i.e. epochs
    greater than `number − every·N`. `*_state` variants set N for state folders (default: the models' N).
    """
    t = cfg
    if kind == "step":
        n_models, n_states, scale = t.save_last_n_steps, t.save_last_n_steps_state or t.save_last_n_steps, 1
    else:
        n_models, n_states, scale = t.save_last_n_epochs, t.save_last_n_epochs_state or t.save_last_n_epochs, every
    if n_models is not None:
        prune(t, kind, False, number - scale * n_models)
    if n_states is not None and t.save_state:
        prune(t, kind, True, number - scale * n_states)


# ------------------------------------------------------------------------------------------------- state save
def write_state(accelerator: Any, path: Path, record: dict[str, Any], ema: Any | None) -> Path:
    """Write a state folder atomically: every rank writes into `.<name>.partial.tmp`, rank 0 renames it into place.

    Rank 0 holds the partial folder's ownership lock while it is written (see sdtool.fsutil), so a later run
    removes it only once this process is gone; on a failure it is removed at once and a full disk or a read-only
    folder becomes one line naming the path.
    """
    partial = path.with_name(f".{path.name}.{PARTIAL_TAG}{TEMP_SUFFIX}")  # the same name on every rank
    main = accelerator.is_main_process
    with contextlib.ExitStack() as hold:
        if main:
            clean_leftovers_of(path)  # what a killed run left under this name
            if partial.exists():
                if held_by_live_process(partial):
                    raise SdtoolError(f"{partial} is being written by another sdtool process", hint="wait for it")
                shutil.rmtree(partial)  # left by a run whose ownership cannot be told (a file system without locks)
            try:
                partial.mkdir(parents=True)
            except OSError as exc:
                raise write_error(path, exc, "save the training state to") or exc from exc
            hold.enter_context(owned(partial))
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(partial))
            if main:
                if ema is not None:
                    ema.save(partial / EMA_FILE)
                text = json.dumps({"format": STATE_FORMAT, **record}, indent=2, allow_nan=False)
                (partial / STATE_FILE).write_text(text + "\n", encoding="utf-8")
                replace_folder(partial, path, markers=(STATE_FILE,))
        except BaseException as exc:
            mapped = write_error(path, exc, "save the training state to") if isinstance(exc, Exception) else None
            if main:
                shutil.rmtree(partial, ignore_errors=True)  # a partial state must not go on filling the disk
            if mapped is not None:
                raise mapped from exc
            raise
    accelerator.wait_for_everyone()
    return path


def read_state(path: Path) -> dict[str, Any]:
    """The `sdtool_state.json` of a state folder, checked for its format."""
    file = path / STATE_FILE
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdtoolError(f"resume: cannot read {file} ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise SdtoolError(f"resume: {file} is not a state this sdtool can read (format {record.get('format')!r})")
    return record


def config_record(cfg: ResolvedConfig) -> dict[str, Any]:
    """The resolved config as plain data, stored in the state to check a resume against."""
    return tomllib.loads(cfg.to_toml())


# Keys that only say where and how outputs go, or how fast data loads: they may change between runs freely.
_FREE_KEYS = {
    "output_dir",
    "output_name",
    "overwrite",
    "resume",
    "save_model_as",
    "save_precision",
    "use_safetensors",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_n_epoch_ratio",
    "save_last_n_epochs",
    "save_last_n_epochs_state",
    "save_last_n_steps",
    "save_last_n_steps_state",
    "save_state",
    "save_state_on_train_end",
    "offload_ema",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
    "cache_latents_to_disk",
    "vae_batch_size",  # how many images the VAE encodes at once before training; the latents are the same
    "gradient_checkpointing",
    "hypernetwork_multiplier",  # sampling strength only
    "hypernetwork_weights",  # the starting point; a state carries the hypernetwork's current weights
    "validation_timesteps",  # what validation measures and when; training is the same either way
    "validation_weights",
    "save_best",
}
_FREE_PREFIXES = ("sample_", "log", "wandb_", "metadata_", "validate_")
# Keys whose change makes the saved optimizer/EMA state unusable.
_BLOCKING_KEYS = {
    "train_text_encoder",
    "optimizer_type",
    "full_fp16",
    "full_bf16",
    "v2",
    "train_hypernetwork",
    "hypernetwork_layer_structure",
    "hypernetwork_activation",
    "hypernetwork_layer_norm",
}


def check_resume_config(
    saved: dict[str, Any],
    current: dict[str, Any],
    use_ema: bool,
    has_ema: bool,
    *,
    strict: bool = False,
    hint: str = "resume with the settings the state was saved with",
) -> None:
    """Refuse a config the state cannot continue; warn, naming each key, where the run will differ.

    `strict` (a state found by a rerun, not named by the user) refuses every change that alters the run.
    """
    problems: list[str] = []
    changes: list[str] = []
    for key in sorted(set(saved) | set(current)):
        if key in _FREE_KEYS or key.startswith(_FREE_PREFIXES):
            continue
        before, now = saved.get(key), current.get(key)
        if before == now:
            continue
        shown = f"{key}: {_short(before)} in the state, {_short(now)} now"
        (problems if key in _BLOCKING_KEYS else changes).append(shown)
    if use_ema and not has_ema:
        problems.append("use_ema: the state has no EMA weights (it was saved without use_ema)")
    if strict:
        problems += changes
        changes = []
    if problems:
        raise ConfigError([f"resume: {p}" for p in problems], hint=hint)
    if changes:
        warn("resuming with a changed config, so the run will not equal an uninterrupted one: " + "; ".join(changes))


def model_identity(source: str) -> dict[str, str] | None:
    """A cheap identity of a local model's weight files (size plus hashes of three 1 MiB samples of each), stored in
    a state so that a rerun notices a model replaced under the same path; None for a hub id (its name is recorded).

    Sampled, not a full hash: reading an SD model's gigabytes at every save would cost seconds, and fine-tuned
    weights differ throughout, so any sample of them differs.
    """
    import hashlib

    path = Path(source)
    if path.is_file():
        files = {path.name: path}
    elif path.is_dir():
        suffixes = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}
        files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.suffix in suffixes}
    else:
        return None
    identity = {}
    for name, file in files.items():
        size = file.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(file, "rb") as f:
            for offset in (0, max(0, size // 2 - (1 << 19)), max(0, size - (1 << 20))):
                f.seek(offset)
                digest.update(f.read(1 << 20))
        identity[name] = digest.hexdigest()[:32]
    return identity


def _short(value: Any) -> str:
    text = "unset" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."
