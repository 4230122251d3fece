"""Fixtures for training tests: a small captioned, bucketed image set and config writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.imagegen import save_rgb

CAPTIONS = [
    "a photo of a red cat",
    "a painting of a blue dog",
    "a drawing of a girl with long hair",
    "a portrait of a man",
    "a landscape with a tree and a house",
    "a white flower on a green background",
]
TAGS = ["1girl, solo, smile", "outdoors, day, sky", "", "simple background, white background"]


def make_dataset(root: Path, n: int = 6, relative: bool = True) -> tuple[Path, Path]:
    """`n` images in two buckets (64x64 and 64x128 portrait) with captions, tags and bucket fields."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    meta = {}
    for i in range(n):
        tall = i % 3 == 2
        w, h = (80, 150) if tall else (96, 96)
        bucket = [64, 128] if tall else [64, 64]
        path = save_rgb(images / f"img{i}.png", w, h, seed=i)
        key = path.name if relative else str(path)
        meta[key] = {
            "caption": CAPTIONS[i % len(CAPTIONS)],
            "tags": TAGS[i % len(TAGS)],
            "image_size": [w, h],
            "train_resolution": bucket,
        }
    meta_path = root / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    return images, meta_path


# Written by every run for its report (tests/report checks them); left out where a test lists a run's outputs.
REPORT_FILES = {"run.json", "report.html", "report-loss.png"}


def run_outputs(folder: Path) -> list[str]:
    """The names in a run's output folder, without the run report's files."""
    return sorted(p.name for p in folder.iterdir() if p.name not in REPORT_FILES)


def write_config(path: Path, text: str) -> Path:
    """Write a config's text (UTF-8) and return its path."""
    path.write_text(text, encoding="utf-8")
    return path


def dataset_toml(meta: Path, images: Path | None = None, batch_size: int = 1, **subset: object) -> str:
    """The `[[datasets]]` table the training tests share: resolution 64, one subset reading `meta` (and `images`).

    Keyword arguments become keys of the subset, written as TOML literals.
    """
    lines = ["", "[[datasets]]", "resolution = 64", f"batch_size = {batch_size}", "  [[datasets.subsets]]"]
    if images is not None:
        lines.append(f'  image_dir = "{images}"')
    lines.append(f'  metadata_file = "{meta}"')
    lines += [f"  {key} = {json.dumps(value)}" for key, value in subset.items()]
    return "\n".join(lines) + "\n"


def write_train_config(tmp_path: Path, name: str, template: str, n_images: int, **fields: object) -> Path:
    """`template` filled in (`out` is tmp_path/<name>) over a dataset made once under tmp_path/data, at batch size 1.

    Written to tmp_path/<name>.toml; later calls under the same tmp_path reuse the first call's images.
    """
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, n_images)
    text = template.format(out=tmp_path / name, **fields) + dataset_toml(data / "meta.json", data / "images")
    return write_config(tmp_path / f"{name}.toml", text)


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path]:
    return make_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process training run gets its own accelerate state (it is a process-wide singleton).

    Also one intra-op thread: the tiny models gain nothing from more, and on a busy 2-core CI runner (pytest -n 2)
    extra threads oversubscribe the cores and make each step 10-20x slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
