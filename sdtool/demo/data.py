"""The demo's dataset: small captioned images of simple shapes in varied aspect ratios, generated offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (width, height) pairs that land in different buckets at the demo's 128² resolution.
DEMO_SIZES = [(192, 128), (128, 192), (160, 160), (256, 128), (128, 256), (224, 160), (160, 224), (144, 144)]
COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 180, 70), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "stripes")


def make_demo_images(folder: str | Path, count: int = 16, seed: int = 0) -> list[Path]:
    """Write `count` PNGs with `.caption` (a sentence) and `.txt` (tags) sidecars; return the image paths."""
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
        orientation = "wide" if w > h else "tall" if h > w else "square"
        path.with_suffix(".caption").write_text(f"a {colour} {shape} on a {background} background\n")
        path.with_suffix(".txt").write_text(f"{colour}, {shape}, {background} background, {orientation}\n")
        paths.append(path)
    return paths
