"""CONTRACT §F pixel pipeline: resize with LANCZOS, centre crop, [-1, 1] CHW."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtool.cache.pixels import crop_ltrb, load_bucketed_pixels, to_tensor
from sdtool.errors import ImageError
from tests import imagegen


def test_crop_is_centred_with_floor():
    assert crop_ltrb((683, 384), (640, 384)) == (21, 0, 661, 384)
    assert crop_ltrb((427, 640), (384, 640)) == (21, 0, 405, 640)
    with pytest.raises(ValueError):
        crop_ltrb((10, 10), (64, 64))


def test_pipeline_matches_hand_computation(tmp_path):
    path = imagegen.save_rgb(tmp_path / "x.png", 300, 200)
    pixels = load_bucketed_pixels(path, (96, 64), (64, 64), expected_size=(300, 200))
    expected = np.asarray(
        Image.open(path).convert("RGB").resize((96, 64), Image.Resampling.LANCZOS).crop((16, 0, 80, 64))
    )
    assert pixels.shape == (64, 64, 3)
    assert np.array_equal(pixels, expected)
    t = to_tensor(pixels)
    assert t.shape == (3, 64, 64)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    assert abs(float(t[0, 3, 5]) - (expected[3, 5, 0] / 127.5 - 1)) < 1e-6
    flipped = to_tensor(pixels, flip=True)
    assert np.array_equal(flipped.numpy(), t.numpy()[:, :, ::-1])


def test_changed_image_size_is_refused(tmp_path):
    path = imagegen.save_rgb(tmp_path / "x.png", 300, 200)
    with pytest.raises(ImageError, match="metadata says"):
        load_bucketed_pixels(path, (96, 64), (64, 64), expected_size=(200, 300))
