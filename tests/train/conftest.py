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


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


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
