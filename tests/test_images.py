"""CONTRACT §C: every odd kind of image reads as displayed 8-bit RGB, bad ones fail with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtool import images
from sdtool.errors import ImageError
from tests import imagegen


def test_extensions_case_insensitive_and_hidden_skipped(tmp_path):
    for name in ("a.png", "b.JPG", "c.Jpeg", "d.webp", "e.BMP", "f.gif", "g.txt"):
        imagegen.save_rgb(tmp_path / "src.png", 8, 8)
        (tmp_path / "src.png").rename(tmp_path / name)
    (tmp_path / ".hidden").mkdir()
    imagegen.save_rgb(tmp_path / ".hidden" / "x.png", 8, 8)
    (tmp_path / "sub").mkdir()
    imagegen.save_rgb(tmp_path / "sub" / "y.png", 8, 8)
    found = [p.name for p in images.list_images([tmp_path])]
    assert found == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "e.BMP"]
    found_r = [p.name for p in images.list_images([tmp_path], recursive=True)]
    assert found_r == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "e.BMP", "y.png"]


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ImageError, match="no such folder"):
        images.list_images([tmp_path / "nope"])


def test_exif_orientation_swaps_displayed_size(tmp_path):
    path = imagegen.save_exif_rotated(tmp_path / "r.jpg", 40, 20, orientation=6)
    assert Image.open(path).size == (40, 20)
    assert images.read_size(path) == (20, 40)
    img = images.open_image(path)
    assert img.size == (20, 40) and img.mode == "RGB"


def test_rgba_composited_on_white(tmp_path):
    img = images.open_image(imagegen.save_rgba(tmp_path / "a.png", 10, 4))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((9, 0)) == (255, 255, 255)  # transparent green becomes white, not green


def test_palette_with_transparency(tmp_path):
    img = images.open_image(imagegen.save_palette_transparent(tmp_path / "p.png", 8, 2))
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((7, 0)) == (255, 255, 255)


def test_cmyk_to_rgb(tmp_path):
    img = images.open_image(imagegen.save_cmyk(tmp_path / "c.jpg", 8, 8))
    r, g, b = img.getpixel((4, 4))
    assert img.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_grey16_scaled_not_clipped(tmp_path):
    img = images.open_image(imagegen.save_grey16(tmp_path / "g.png", 6, 6))
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (127, 127, 127)


def test_rgb48_png(tmp_path):
    img = images.open_image(imagegen.save_rgb48_png(tmp_path / "d.png", 5, 3, value=40000))
    r, g, b = img.getpixel((0, 0))
    assert img.mode == "RGB" and abs(r - round(40000 / 257)) <= 1 and g == 0 and b == 255


@pytest.mark.parametrize("mode", ["L", "1", "LA"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / f"m_{mode}.png"
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8), "L").convert(mode).save(path)
    out = images.open_image(path)
    assert out.mode == "RGB" and out.size == (4, 4)


@pytest.mark.parametrize(("mode", "value", "expected"), [("I", 65535, 255), ("I", 200, 200), ("F", 0.5, 128)])
def test_wide_modes_are_scaled(mode, value, expected):
    arr = np.full((3, 3), value, dtype=np.int32 if mode == "I" else np.float32)
    out = images.to_rgb(Image.fromarray(arr, mode))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (expected,) * 3


def test_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = imagegen.save_png_header_claiming(tmp_path / "bomb.png", 60000, 60000)
    with pytest.raises(ImageError, match="decompression bomb"):
        images.read_size(path)
    with pytest.raises(ImageError, match="decompression bomb"):
        images.open_image(path)
    monkeypatch.setenv("SDTOOL_MAX_PIXELS", "100")
    small = imagegen.save_rgb(tmp_path / "s.png", 20, 20)
    with pytest.raises(ImageError, match="over the limit of 100"):
        images.read_size(small)


@pytest.mark.parametrize(
    ("maker", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello, I am text"), "not an image"),
        (imagegen.save_corrupt_png, "corrupt or truncated"),
        (imagegen.save_truncated_jpeg, "corrupt or truncated"),
    ],
)
def test_bad_files_have_reasons(tmp_path, maker, reason):
    path = tmp_path / ("bad.jpg" if maker is imagegen.save_truncated_jpeg else "bad.png")
    maker(path)
    with pytest.raises(ImageError, match=reason) as info:
        images.open_image(path)
    assert info.value.path == path


def test_read_size_is_header_only(tmp_path):
    # A truncated JPEG still has a readable header: sizes come without decoding the pixels.
    path = imagegen.save_truncated_jpeg(tmp_path / "t.jpg", 64, 48)
    assert images.read_size(path) == (64, 48)


def test_tiny_and_extreme_sizes(tmp_path):
    one = imagegen.save_rgb(tmp_path / "one.png", 1, 1)
    tall = imagegen.save_rgb(tmp_path / "tall.png", 8, 4000)
    assert images.open_image(one).size == (1, 1)
    assert images.read_size(tall) == (8, 4000)


def test_raising_the_limit_admits_larger_images(tmp_path, monkeypatch):
    # 20000 x 20000 = 400 M pixels: over twice Pillow's own default, so Pillow alone would refuse it.
    path = imagegen.save_png_header_claiming(tmp_path / "big.png", 20000, 20000)
    with pytest.raises(ImageError, match="over the limit") as info:
        images.read_size(path)
    assert "SDTOOL_MAX_PIXELS" in info.value.one_line()
    monkeypatch.setenv("SDTOOL_MAX_PIXELS", str(500_000_000))
    assert images.read_size(path) == (20000, 20000)
