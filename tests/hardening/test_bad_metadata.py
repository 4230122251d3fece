"""Bad metadata entries (CONTRACT §D, §E; docs/promises.md): each is named as skipped with its reason,
before anything is encoded or trained, by `cache` and by training with or without a cache, and the rest goes on.

The bad entries are what a hand edit, another tool or a changed image leaves: an image replaced by one of another
size since `bucket`, a resize smaller than its bucket, 0×0 and non-multiple-of-8 buckets, a fractional bucket, a
60000² resize, a crop that is not the centre crop, `Infinity` and a number where text or sizes go, and a relative
key with `../` that would leave the image folder.

Before: uncached training found the placements mid-run (a 24-line DataLoader worker traceback, or a fractional
bucket silently replaced), `Infinity` and a numeric caption crashed the whole command, the 60000² resize allocated
gigabytes, and `../` keys were read from outside `image_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hardening.conftest import skip_lines
from tests.imagegen import save_rgb
from tests.train.conftest import write_config

GOOD = {"caption": "a good image", "image_size": [64, 64], "train_resolution": [64, 64]}
# name → (entry fields, words its skip reason must contain); every image on disk is 64×64 unless said otherwise.
BAD = {
    "resized.png": ({"resized_size": [64, 32]}, ("does not cover the bucket",)),
    "zero.png": ({"train_resolution": [0, 0]}, ("positive multiple of 8",)),
    "odd.png": ({"train_resolution": [60, 64]}, ("positive multiple of 8",)),
    "fraction.png": ({"train_resolution": [64.5, 64]}, ("whole numbers",)),
    "huge.png": ({"resized_size": [60000, 60000]}, ("over the limit",)),
    "crop.png": ({"crop_ltrb": [1, 0, 65, 64]}, ("centre crop",)),
    "infinity.png": ({"image_size": "INF"}, ("whole numbers",)),
    "numeric.png": ({"caption": 5}, ("must be text",)),
}


def write_metadata_with_infinity(path: Path, meta: dict) -> None:
    """JSON with a literal `Infinity` (Python's json writes and reads it; so do hand edits and other tools)."""
    text = json.dumps(meta, indent=2).replace('"INF"', "[Infinity, 64]")
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path, dict[Path, tuple[str, ...]]]:
    images = tmp_path / "images"
    images.mkdir()
    meta: dict[str, dict] = {}
    expected_bad: dict[Path, tuple[str, ...]] = {}
    for i in range(3):
        save_rgb(images / f"good{i}.png", 64, 64, seed=i)
        meta[f"good{i}.png"] = dict(GOOD)
    for name, (fields, words) in BAD.items():
        save_rgb(images / name, 64, 64, seed=len(meta))
        meta[name] = {**GOOD, **fields}
        expected_bad[images / name] = words
    save_rgb(images / "changed.png", 80, 64, seed=9)  # bucketed when it was 64×64, replaced since
    meta["changed.png"] = dict(GOOD)
    expected_bad[images / "changed.png"] = ("80x64", "64x64")
    save_rgb(tmp_path / "outside.png", 64, 64, seed=10)  # beside image_dir: a relative key must not reach it
    meta["../outside.png"] = dict(GOOD)
    path = tmp_path / "meta.json"
    write_metadata_with_infinity(path, meta)
    return images, path, expected_bad


def check_named(stderr: str, expected: dict[Path, tuple[str, ...]]) -> None:
    named = skip_lines(stderr)
    assert "../outside.png" in named and "image folder" in named["../outside.png"], stderr
    for path, words in expected.items():
        assert str(path) in named, (path.name, stderr)
        check = all if path.name == "changed.png" else any  # both sizes, the new one and the recorded one
        assert check(w in named[str(path)] for w in words), (path.name, named[str(path)])
    assert "unexpected" not in stderr and "Traceback" not in stderr, stderr


def test_cache_names_each_bad_entry_and_encodes_the_rest(cli, tmp_path, tiny_v1, dataset):
    images, meta, bad = dataset
    result = cli("cache", meta, "-m", tiny_v1, "--workers", "0", "--image-dir", images, "--json")
    assert result.exit_code == 0, result.stderr
    check_named(result.stderr, bad)
    written = {r["path"] for r in map(json.loads, result.stdout.splitlines()) if r["status"] == "written"}
    assert written == {str(images / f"good{i}.png") for i in range(3)}


TRAIN = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
max_train_steps = 2
cache_latents = false
max_data_loader_n_workers = 2
persistent_data_loader_workers = true

[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{meta}"
"""


@pytest.mark.slow
def test_training_without_a_cache_names_each_bad_entry_before_the_first_step(cli, tmp_path, tiny_v1, dataset):
    images, meta, bad = dataset
    text = TRAIN.format(model=tiny_v1, out=tmp_path / "out", images=images, meta=meta)
    cfg = write_config(tmp_path / "train.toml", text)
    dry = cli("train", cfg, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    check_named(dry.stderr, bad)
    assert "3 images, 3 batches per epoch" in dry.stderr  # the plan counts only the good ones

    result = cli("train", cfg)
    assert result.exit_code == 0, result.stderr
    check_named(result.stderr, bad)
    lines = result.stderr.splitlines()
    first_step = next(i for i, line in enumerate(lines) if "bucket plan" in line)
    assert all(i < first_step for i, line in enumerate(lines) if line.startswith("skipped "))  # before step 1
