"""What a run report reads from a training output folder: `metrics.jsonl` (a line per optimizer step, a line per
validation), `run.json` (config, bucket plan, validation split), the sample images in `sample/` and the models.

Everything is optional except `metrics.jsonl` or `run.json`: a run still going, stopped, or from before `run.json`
existed gives a report of what is there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool.errors import UsageError

METRICS = "metrics.jsonl"
RUN_RECORD = "run.json"  # written by sdtool.train.plan.write_run_record
SAMPLES = "sample"


@dataclass
class SamplePoint:
    """The sample images of one sampling point, in prompt order."""

    step: int
    epoch: int
    epoch_end: bool
    images: list[Path]
    prompts: list[str]
    grid: Path | None = None

    @property
    def label(self) -> str:
        return f"epoch {self.epoch} end (step {self.step})" if self.epoch_end else f"step {self.step}"


@dataclass
class RunData:
    """A training run as its output folder shows it."""

    folder: Path
    steps: list[dict[str, Any]] = field(default_factory=list)  # metrics lines with a training `loss`
    validations: list[dict[str, Any]] = field(default_factory=list)  # metrics lines with `val_loss*`
    run: dict[str, Any] = field(default_factory=dict)  # run.json, when present
    samples: list[SamplePoint] = field(default_factory=list)
    models: list[Path] = field(default_factory=list)
    states: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what could not be read, shown in the report

    @property
    def name(self) -> str:
        return str(self.run.get("output_name") or self.folder.name)

    @property
    def best(self) -> dict[str, Any] | None:
        """The validation line with the lowest `val_loss` (or `val_loss_raw` when that is all there is)."""
        scored = [(v, primary_loss(v)) for v in self.validations]
        ranked = [(v, s) for v, s in scored if s is not None]
        return min(ranked, key=lambda vs: vs[1])[0] if ranked else None


def primary_loss(record: dict[str, Any]) -> float | None:
    """The loss a validation line is ranked by: `val_loss` (the saved weights'), else `val_loss_raw`."""
    value = record.get("val_loss", record.get("val_loss_raw"))
    return float(value) if isinstance(value, int | float) else None


def read_run(folder: Path) -> RunData:
    """Everything the report shows, read from `folder`; UsageError when it is not a training output folder."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder", hint="pass the output_dir of a training run")
    metrics, record = folder / METRICS, folder / RUN_RECORD
    if not metrics.is_file() and not record.is_file():
        raise UsageError(
            f"{folder} has no {METRICS} or {RUN_RECORD}: not the output folder of a training run",
            hint="pass the output_dir of the training config",
        )
    data = RunData(folder=folder)
    if metrics.is_file():
        _read_metrics(metrics, data)
    if record.is_file():
        try:
            loaded = json.loads(record.read_text(encoding="utf-8"))
            data.run = loaded if isinstance(loaded, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            data.problems.append(f"{record.name}: cannot be read ({exc})")
    data.samples = read_samples(folder / SAMPLES)
    _find_outputs(folder, data)
    return data


def _read_metrics(path: Path, data: RunData) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            data.problems.append(f"{path.name} line {number}: not JSON (cut short?); left out")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        if any(key.startswith("val_loss") for key in record):
            data.validations.append(record)
        elif isinstance(record.get("loss"), int | float):
            data.steps.append(record)


_GRID = re.compile(r"(?:(?P<prefix>.+)_)?(?P<point>e?\d{6})_grid\.png")


def read_samples(folder: Path) -> list[SamplePoint]:
    """Sampling points from the grids' `sdtool` PNG text (step, epoch, the sample files), ordered by step."""
    from PIL import Image, UnidentifiedImageError

    points: list[SamplePoint] = []
    if not folder.is_dir():
        return points
    for grid in sorted(folder.glob("*_grid.png")):
        match = _GRID.fullmatch(grid.name)
        if match is None:
            continue
        try:
            with Image.open(grid) as image:
                record = json.loads(getattr(image, "text", {}).get("sdtool", "{}"))
        except (OSError, UnidentifiedImageError, json.JSONDecodeError):
            continue
        images = [folder / name for name in record.get("samples", []) if (folder / name).is_file()]
        prompts = [_prompt(path) for path in images]
        points.append(
            SamplePoint(
                step=int(record.get("step", 0)),
                epoch=int(record.get("epoch", 0)),
                epoch_end=match.group("point").startswith("e"),
                images=images,
                prompts=prompts,
                grid=grid,
            )
        )
    points.sort(key=lambda p: (p.step, p.epoch_end))
    return points


def _prompt(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            record = json.loads(getattr(image, "text", {}).get("sdtool", "{}"))
    except (OSError, UnidentifiedImageError, json.JSONDecodeError):
        return ""
    return str(record.get("prompt", ""))


def _find_outputs(folder: Path, data: RunData) -> None:
    """Models (single files and diffusers folders) and state folders directly in the output folder."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and path.name.endswith("-state"):
            data.states.append(path)
        elif (path.is_dir() and (path / "model_index.json").is_file()) or (
            path.is_file() and path.suffix in (".safetensors", ".ckpt", ".pt")
        ):
            data.models.append(path)
