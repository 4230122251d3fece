"""Labelling fixtures: tiny BLIP/GIT captioners and hand-predictable ONNX taggers, all built offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.imagegen import save_rgb

# The "mean tagger": logits are affine in the per-channel means m0, m1, m2 of the input *as the model receives it*
# (BGR for WD14, so m0 is blue). Rows are deliberately interleaved: ratings are not the first four rows, and
# characters sit between general tags, so a position-based category mapping would be wrong.
WD14_ROWS = [
    ("character_a", 4),  # 12·m1 − 6   (green)
    ("sensitive", 9),  # 6·m2 − 3     (red)
    ("blue_sky", 0),  # 12·m0 − 6     (blue)
    ("general", 9),  # 0
    ("long_hair", 0),  # 12·m2 − 5    (red)
    ("^_^", 0),  # 12·m2 − 7          (red)
    ("character_b", 4),  # 12·m2 − 6.5 (red)
    ("white_background", 0),  # 4·(m0+m1+m2) − 9
    ("explicit", 9),  # −3
]


def wd14_weights() -> tuple[np.ndarray, np.ndarray]:
    w = np.zeros((3, len(WD14_ROWS)), dtype=np.float32)
    b = np.zeros(len(WD14_ROWS), dtype=np.float32)
    w[1, 0], b[0] = 12, -6
    w[2, 1], b[1] = 6, -3
    w[0, 2], b[2] = 12, -6
    w[2, 4], b[4] = 12, -5
    w[2, 5], b[5] = 12, -7
    w[2, 6], b[6] = 12, -6.5
    w[:, 7], b[7] = 4, -9
    b[8] = -3
    # The graph sees 0–255 values; the weights above are per unit of mean/255.
    return w / 255.0, b


def save_wd14_tagger(folder: Path) -> Path:
    """A WD14-layout mean tagger in `folder`: 16×16 NHWC input, selected_tags.csv in the interleaved order above."""
    from sdtool.label.tiny import save_mean_tagger, write_selected_tags

    w, b = wd14_weights()
    save_mean_tagger(folder / "model.onnx", weights=w, bias=b, size=16)
    write_selected_tags(folder / "selected_tags.csv", WD14_ROWS)
    return folder


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    from sdtool.label.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("label") / "blip")


@pytest.fixture(scope="session")
def tiny_git(tmp_path_factory) -> Path:
    from sdtool.label.tiny import save_tiny_git

    return save_tiny_git(tmp_path_factory.mktemp("label") / "git")


@pytest.fixture(scope="session")
def wd14_tagger(tmp_path_factory) -> Path:
    """A WD14-layout folder: 16×16 NHWC input, selected_tags.csv in the interleaved order above."""
    return save_wd14_tagger(tmp_path_factory.mktemp("label") / "wd14")


@pytest.fixture(scope="session")
def wd14_tagger_nchw_fixed(tmp_path_factory) -> Path:
    """The same tagger with a 32×32 NCHW input and a fixed batch size of 2 in the graph."""
    from sdtool.label.tiny import save_mean_tagger, write_selected_tags

    folder = tmp_path_factory.mktemp("label") / "wd14-nchw"
    w, b = wd14_weights()
    save_mean_tagger(folder / "model.onnx", weights=w, bias=b, size=32, layout="NCHW", batch=2)
    write_selected_tags(folder / "selected_tags.csv", WD14_ROWS)
    return folder


@pytest.fixture(scope="session")
def deepdanbooru_tagger(tmp_path_factory) -> Path:
    """A DeepDanbooru-layout folder: RGB 0–1 input; `seen_white` fires only if padding were white."""
    from sdtool.label.tiny import save_mean_tagger

    folder = tmp_path_factory.mktemp("label") / "dd"
    names = ["rating:safe", "red_hair", "seen_white", "character_x", "rating:explicit"]
    w = np.zeros((3, len(names)), dtype=np.float32)
    b = np.array([1, -6, -6, -3, -1], dtype=np.float32)
    w[0, 1] = 12  # red, as RGB channel 0 in 0–1 units
    w[1, 2] = 12  # green: only white padding would bring green in
    w[0, 3] = 12
    save_mean_tagger(folder / "deepdanbooru.onnx", weights=w, bias=b, size=16)
    (folder / "tags.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (folder / "tags-character.txt").write_text("character_x\n", encoding="utf-8")
    return folder


@pytest.fixture
def colour_images(tmp_path) -> Path:
    """red.png 64×32 (padded square: half red, half white), blue.png 48×48, clear.png 16×16 fully transparent."""
    from PIL import Image

    folder = tmp_path / "colours"
    folder.mkdir()
    Image.new("RGB", (64, 32), (255, 0, 0)).save(folder / "red.png")
    Image.new("RGB", (48, 48), (0, 0, 255)).save(folder / "blue.png")
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(folder / "clear.png")
    return folder


@pytest.fixture
def photo_images(tmp_path) -> Path:
    """Five structured RGB images of different sizes (captions differ per image)."""
    folder = tmp_path / "photos"
    for i in range(5):
        save_rgb(folder / f"img{i}.png", 40 + 9 * i, 30 + 7 * i, seed=i)
    return folder


@pytest.fixture
def copy_dir(tmp_path):
    def copy(src: Path, name: str) -> Path:
        return Path(shutil.copytree(src, tmp_path / name))

    return copy
