"""The demo's data: images of simple shapes in five aspect ratios (one per bucket at the demo's resolution), and the
tiny tagger the demo labels them with.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) pairs for the five buckets of 128² with sides 64–256 in steps of 64 (kohya's bucket list):
# 256x64, 192x64, 128x128, 64x192, 64x256. Each size is nearer to its bucket's aspect ratio than to any other.
DEMO_SIZES = [(160, 160), (288, 72), (72, 288), (240, 80), (80, 240), (144, 144), (256, 64), (64, 256)]
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 70), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "stripes")

# The demo's tagger (sdtool/demo/tagger/): a real ONNX graph in the WD14 layout whose tags are linear functions of
# the image's mean colour (built by sdtool.label.tiny.save_mean_tagger; tests/demo checks the shipped file against
# it, and SDTOOL_UPDATE_DEMO_TAGGER=1 rewrites it). Input: 16×16 BGR, 0–255, padded to a white square.
TAGGER_DIR = Path(__file__).parent / "tagger"
TAGGER_SIZE = 16
# name, Danbooru category (9 rating, 0 general), weights on the mean (B, G, R), bias
TAGGER_TAGS: list[tuple[str, int, tuple[float, float, float], float]] = [
    ("general", 9, (0.0, 0.0, 0.0), 3.0),
    ("red", 0, (-0.5 / 6, -0.5 / 6, 1 / 6), -2.0),
    ("green", 0, (-0.5 / 6, 1 / 6, -0.5 / 6), -2.0),
    ("blue", 0, (1 / 6, -0.5 / 6, -0.5 / 6), -2.0),
    ("yellow", 0, (-1 / 6, 0.5 / 6, 0.5 / 6), -2.0),
    ("dark", 0, (-1 / 48, -1 / 48, -1 / 48), 128 / 16),
    ("bright", 0, (1 / 48, 1 / 48, 1 / 48), -200 / 16),
]


def tagger_weights() -> tuple[np.ndarray, np.ndarray]:
    """The (3, n_tags) weights and (n_tags,) bias of the demo tagger."""
    weights = np.array([w for _, _, w, _ in TAGGER_TAGS], dtype=np.float32).T
    bias = np.array([b for *_, b in TAGGER_TAGS], dtype=np.float32)
    return weights, bias


def copy_demo_tagger(folder: Path) -> Path:
    """The demo tagger's `model.onnx` + `selected_tags.csv`, copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "selected_tags.csv"):
        shutil.copyfile(TAGGER_DIR / name, folder / name)
    return folder


def make_demo_images(folder: str | Path, count: int = 16, seed: int = 0, sidecars: bool = False) -> list[Path]:
    """Write `count` PNGs (with `.caption` and `.txt` sidecars when asked); return the image paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    backgrounds = list(BACKGROUNDS)
    paths = []
    for i in range(count):
        w, h = DEMO_SIZES[i % len(DEMO_SIZES)]
        colour = colours[int(rng.integers(len(colours)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        shape = SHAPES[i % len(SHAPES)]
        img = Image.new("RGB", (w, h), BACKGROUNDS[background])
        draw = ImageDraw.Draw(img)
        cx, cy, r = w // 2, h // 2, min(w, h) // 3
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            for x in range(0, w, 16):
                draw.rectangle((x, 0, x + 7, h), fill=fill)
        path = folder / f"{i:03d}_{shape}.png"
        img.save(path)
        if sidecars:
            orientation = "wide" if w > h else "tall" if h > w else "square"
            path.with_suffix(".caption").write_text(f"a {colour} {shape} on a {background} background\n")
            path.with_suffix(".txt").write_text(f"{colour}, {shape}, {background} background, {orientation}\n")
        paths.append(path)
    return paths
