"""The names of a training run's outputs (CONTRACT §I), kohya's: the final model `<name>`, periodic models
`<name>-<epoch:06d>` and `<name>-step<step:08d>` (plus `.safetensors`/`.ckpt`/`.pt`, or a folder for the diffusers
formats), state folders `<stem>-state` holding `sdtool_state.json`.

Every stage that names an output asks here, so one rule serves the config checks, the recipe and the pruning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

STATE_FILE = "sdtool_state.json"
EMA_FILE = "ema.safetensors"


class OutputSettings(Protocol):
    """The config keys that place outputs (a `TrainConfig` has them)."""

    output_dir: str
    output_name: str
    save_model_as: str


def save_stem(name: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """`name`, `name-<epoch:06d>` or `name-step<step:08d>`."""
    if step is not None:
        return f"{name}-step{step:08d}"
    if epoch is not None:
        return f"{name}-{epoch:06d}"
    return name


def model_path(cfg: OutputSettings, stem: str) -> Path:
    """The model file (or diffusers folder) for a save stem."""
    out = Path(cfg.output_dir) / stem
    return out if cfg.save_model_as.startswith("diffusers") else out.with_name(f"{stem}.{cfg.save_model_as}")


def state_path(cfg: OutputSettings, stem: str) -> Path:
    """The state folder beside a save: `<stem>-state`."""
    return Path(cfg.output_dir) / f"{stem}-state"


def clean_leftovers(cfg: OutputSettings) -> list[Path]:
    """Remove what killed runs of this output name left (temp files, partial states), keeping any a live run owns;
    a model or state folder cut between the two renames of its replacement is put back (see sdtool.fsutil)."""
    import glob

    from sdtool.fsutil import clean_stale_temps

    out, name = Path(cfg.output_dir), glob.escape(cfg.output_name)
    touched = []
    # The final model and its state (`<name>`, `<name>.*`), periodic saves and states (`<name>-*`), metrics.
    for pattern in (name, f"{name}.*", f"{name}-*", "metrics.jsonl"):
        touched += clean_stale_temps(out, pattern)
    return touched + clean_stale_temps(out / "sample", f"{name}_*")  # sample images (sampling.py's names)
