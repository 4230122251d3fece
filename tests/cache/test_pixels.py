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


# --- kohya's resize rule (issue 18) ------------------------------------------------------------------------------
# (size, resized, bucket): shrinking on both sides (area), enlarging (Lanczos), one side each way (Lanczos, as in
# kohya's `width >= resized_width and height >= resized_height` test), an integer factor (OpenCV's fast area path),
# and no resize at all.
KOHYA_CASES = [
    ((300, 200), (96, 64), (64, 64)),
    ((40, 30), (86, 64), (64, 64)),
    ((120, 50), (154, 64), (128, 64)),
    ((256, 128), (128, 64), (128, 64)),
    ((64, 64), (64, 64), (64, 64)),
    ((1000, 667), (577, 385), (576, 384)),
]


@pytest.mark.parametrize(("size", "resized", "bucket"), KOHYA_CASES)
def test_kohya_rule_gives_kohyas_pixels_bit_for_bit(tmp_path, size, resized, bucket):
    pytest.importorskip("cv2")  # kohya's area filter is OpenCV's (opencv-python-headless is a dependency)
    from tests.cache import kohya_oracle

    path = imagegen.save_rgb(tmp_path / "x.png", *size, seed=3)
    ours = load_bucketed_pixels(path, resized, bucket, "kohya", expected_size=size)
    theirs, _, _ = kohya_oracle.trim_and_resize_if_required(False, kohya_oracle.load_image(path), bucket, resized)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    # and to the tensor kohya's IMAGE_TRANSFORMS makes of them, bit for bit
    assert np.array_equal(to_tensor(ours).numpy(), kohya_oracle.image_transforms(theirs).numpy())


def test_area_is_opencvs_area_filter(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = imagegen.save_rgb(tmp_path / "x.png", 301, 207, seed=5)
    ours = load_bucketed_pixels(path, (101, 70), (96, 64), "area")
    resized = cv2.resize(np.asarray(Image.open(path).convert("RGB")), (101, 70), interpolation=cv2.INTER_AREA)
    assert np.array_equal(ours, resized[3:67, 2:98])
    lanczos = load_bucketed_pixels(path, (101, 70), (96, 64), "lanczos")
    assert not np.array_equal(ours, lanczos)  # the reason for following kohya's rule: the filters differ


def test_kohya_aliases_and_unknown_names(tmp_path):
    path = imagegen.save_rgb(tmp_path / "x.png", 300, 200)
    assert np.array_equal(
        load_bucketed_pixels(path, (96, 64), (64, 64), "linear"),
        load_bucketed_pixels(path, (96, 64), (64, 64), "bilinear"),
    )
    with pytest.raises(ImageError, match="unknown interpolation"):
        load_bucketed_pixels(path, (96, 64), (64, 64), "sinc")
