"""Fixtures for the latent cache: VAEs with a known posterior (sharp, NaN) and hand-written bucketed metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests import imagegen


def _copy_with_vae(src: Path, dst: Path, edit) -> Path:
    """Copy a tiny model folder and rewrite its VAE after `edit(vae)` (weights saved as safetensors)."""
    import torch
    from diffusers import AutoencoderKL

    shutil.copytree(src, dst)
    vae = AutoencoderKL.from_pretrained(dst / "vae")
    with torch.no_grad():
        edit(vae)
    shutil.rmtree(dst / "vae")
    vae.save_pretrained(dst / "vae", safe_serialization=True)
    return dst


@pytest.fixture(scope="session")
def sharp_v1(tiny_v1, tmp_path_factory) -> Path:
    """tiny_v1 whose VAE posterior std is ~3e-7 (logvar bias −30), so any sample equals the mean within 1e-4."""

    def shrink(vae):
        vae.quant_conv.bias[4:] = -30.0  # channels 4..7 of quant_conv are the logvar half
        vae.quant_conv.weight[4:] = 0.0

    return _copy_with_vae(tiny_v1, tmp_path_factory.mktemp("vae") / "sharp-v1", shrink)


@pytest.fixture(scope="session")
def nan_v1(tiny_v1, tmp_path_factory) -> Path:
    """tiny_v1 whose VAE encoder produces NaN (one conv weight is NaN)."""

    def poison(vae):
        vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")

    return _copy_with_vae(tiny_v1, tmp_path_factory.mktemp("vae") / "nan-v1", poison)


@pytest.fixture(scope="session")
def other_vae_v1(tiny_v1, tmp_path_factory) -> Path:
    """tiny_v1 with a slightly different VAE encoder (a fine-tuned VAE, as far as the cache can tell)."""

    def nudge(vae):
        vae.encoder.conv_out.bias += 0.01

    return _copy_with_vae(tiny_v1, tmp_path_factory.mktemp("vae") / "other-v1", nudge)


def cover(w: int, h: int, bw: int, bh: int) -> tuple[int, int]:
    scale = bh / h if w / h > bw / bh else bw / w
    return int(w * scale + 0.5), int(h * scale + 0.5)


def entry(w: int, h: int, bw: int, bh: int, sdtool_fields: bool = True, **extra) -> dict:
    """A metadata entry shaped like `sdtool bucket` writes it (or kohya's, without resized_size/crop_ltrb)."""
    fields = {"caption": "a photo", "image_size": [w, h], "train_resolution": [bw, bh], **extra}
    if sdtool_fields:
        rw, rh = cover(w, h, bw, bh)
        left, top = (rw - bw) // 2, (rh - bh) // 2
        fields["resized_size"] = [rw, rh]
        fields["crop_ltrb"] = [left, top, left + bw, top + bh]
    return fields


# name, size, bucket
DEFAULT_IMAGES = [
    ("wide.png", (96, 64), (64, 48)),
    ("tall.jpg", (50, 90), (40, 64)),
    ("square.png", (70, 70), (64, 64)),
    ("wide2.webp", (120, 80), (64, 48)),
]


def make_dataset(root: Path, images=DEFAULT_IMAGES, relative: bool = True, sdtool_fields: bool = True) -> Path:
    """Images under root/img and root/meta.json keyed by relative (or absolute) paths."""
    meta = {}
    for i, (name, (w, h), (bw, bh)) in enumerate(images):
        path = imagegen.save_rgb(root / "img" / name, w, h, seed=i)
        key = name if relative else str(path)
        meta[key] = entry(w, h, bw, bh, sdtool_fields)
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root / "meta.json"


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Four images in three buckets, absolute keys; returns the metadata path."""
    return make_dataset(tmp_path, relative=False)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread per test process: tiny VAEs gain nothing from more, and on a 2-core machine running
    pytest -n 2 more threads only oversubscribe the cores (OpenMP barriers then cost more than the convolutions)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
