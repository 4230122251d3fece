"""`read_size` reads PNG orientation without decoding and still agrees with `open_image` (CONTRACT §C)."""

from __future__ import annotations

import struct
import zlib

import pytest
from PIL import Image, PngImagePlugin

from sdtool import images
from tests import imagegen


def _exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        length = struct.unpack(">I", data[pos : pos + 4])[0]
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _assemble(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d) & 0xFFFFFFFF) for k, d in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def _png_with_exif_after_idat(path, w, h, orientation):
    imagegen.save_rgb(path, w, h)
    chunks = _chunks(path.read_bytes())
    exif = (b"eXIf", _exif_bytes(orientation).removeprefix(b"Exif\x00\x00"))
    iend = chunks.pop()
    path.write_bytes(_assemble([*chunks, exif, iend]))
    return path


@pytest.fixture
def count_png_loads(monkeypatch):
    calls = []
    original = PngImagePlugin.PngImageFile.load

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", counting)
    return calls


def test_plain_png_is_not_decoded(tmp_path, count_png_loads):
    path = imagegen.save_rgb(tmp_path / "a.png", 300, 200)
    assert images.read_size(path) == (300, 200)
    assert count_png_loads == []


def test_png_exif_before_idat(tmp_path, count_png_loads):
    path = tmp_path / "r.png"
    Image.fromarray(imagegen.gradient(40, 20)).save(path, exif=_exif_bytes(6))
    assert images.read_size(path) == (20, 40)
    assert count_png_loads == []
    assert images.open_image(path).size == (20, 40)


def test_png_exif_after_idat_still_found(tmp_path):
    path = _png_with_exif_after_idat(tmp_path / "late.png", 40, 20, 8)
    assert [k for k, _ in _chunks(path.read_bytes())][-2:] == [b"eXIf", b"IEND"]
    assert images.open_image(path).size == (20, 40)
    assert images.read_size(path) == (20, 40)


def test_png_xmp_orientation(tmp_path):
    path = tmp_path / "x.png"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    Image.fromarray(imagegen.gradient(40, 20)).save(path, pnginfo=info)
    assert images.open_image(path).size == images.read_size(path) == (20, 40)


def test_png_with_text_and_no_orientation(tmp_path, count_png_loads):
    path = tmp_path / "t.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt")
    Image.fromarray(imagegen.gradient(30, 10)).save(path, pnginfo=info)
    assert images.read_size(path) == (30, 10)
    assert count_png_loads == []
