"""TensorBoard / Weights & Biases through accelerate's trackers: where they write, what they are told about the
run, the epoch loss on an axis of its own and the sample grids.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sdtool.train.checkpoints import config_record
from sdtool.train.config.schema import ResolvedConfig


def tracker_options(t: Any) -> dict[str, Any]:
    """Accelerator arguments for `log_with`: kohya's folder `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`."""
    if t.log_with is None:
        return {}
    trackers = ["tensorboard", "wandb"] if t.log_with == "all" else [t.log_with]
    options: dict[str, Any] = {"log_with": trackers}
    if t.logging_dir is not None:
        options["project_dir"] = str(Path(t.logging_dir) / f"{t.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}")
    return options


def tracker_config(cfg: ResolvedConfig) -> dict[str, Any]:
    """The training keys as tracker hyperparameters (scalars only; lists and tables as text)."""
    out: dict[str, Any] = {}
    for key, value in config_record(cfg).items():
        out[key] = value if isinstance(value, bool | int | float | str) else json.dumps(value, ensure_ascii=False)
    return out


def log_epoch_loss(accelerator: Any, epoch: int, loss: float) -> None:
    """The mean loss of an epoch, with the epoch as its x axis (kohya puts it on the step axis)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({"loss/epoch": loss, "epoch": epoch})  # plotted against "epoch" (define_metric)
        else:
            tracker.log({"loss/epoch": loss}, step=epoch)  # its own tag, so its own chart with epochs on x


def log_sample_grid(accelerator: Any, grid: Path, step: int) -> None:
    """A sampling point's grid image to the trackers."""
    if not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    with Image.open(grid) as image:
        pixels = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": pixels[None]}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({"samples": [pixels]}, step=step)


def init_trackers(accelerator: Any, cfg: ResolvedConfig) -> None:
    """Start the trackers `log_with` names, with `log_tracker_config`'s init arguments and `wandb_run_name`."""
    t = cfg.train
    init_kwargs: dict[str, Any] = {}
    if t.log_tracker_config is not None:
        from sdtool.train.config.files import read_toml

        init_kwargs = read_toml(Path(t.log_tracker_config), "log_tracker_config")
    if t.wandb_run_name is not None:
        init_kwargs.setdefault("wandb", {})["name"] = t.wandb_run_name
    config = tracker_config(cfg) if t.log_config else None
    accelerator.init_trackers(t.log_tracker_name or "finetuning", config=config, init_kwargs=init_kwargs)
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            # The epoch loss gets its own x axis (kohya logs it on the step axis, where wandb drops it).
            tracker.run.define_metric("epoch")
            tracker.run.define_metric("loss/epoch", step_metric="epoch")
