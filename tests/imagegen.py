"""Generators for every kind of odd image sdtool must read (CONTRACT §C), built at test time."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with structure (so resizes and crops are visible in the result)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    b = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    return np.stack([r, g, b], axis=-1)


def save_rgb(path: Path, w: int, h: int, seed: int = 0, **save_kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(w, h, seed)).save(path, **save_kwargs)
    return path


def save_exif_rotated(path: Path, w: int, h: int, orientation: int = 6) -> Path:
    """A JPEG stored w×h whose EXIF says to rotate it (6 = 90° clockwise: displayed h×w)."""
    img = Image.fromarray(gradient(w, h))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def save_rgba(path: Path, w: int, h: int) -> Path:
    """Left half opaque red, right half fully transparent (with green RGB underneath)."""
    arr = np.zeros((h, w, 4), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0, 255)
    arr[:, w // 2 :] = (0, 255, 0, 0)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def save_palette_transparent(path: Path, w: int, h: int) -> Path:
    """A palette PNG whose index 0 is transparent (blue underneath) and index 1 is opaque black."""
    img = Image.new("P", (w, h), 0)
    img.putpalette([0, 0, 255, 0, 0, 0] + [0] * (256 * 3 - 6))
    for x in range(w // 2):
        for y in range(h):
            img.putpixel((x, y), 1)
    img.save(path, transparency=0)
    return path


def save_cmyk(path: Path, w: int, h: int) -> Path:
    Image.new("CMYK", (w, h), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    return path


def save_grey16(path: Path, w: int, h: int) -> Path:
    arr = np.full((h, w), 65535 // 2, dtype=np.uint16)
    Image.fromarray(arr).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def save_rgb48_png(path: Path, w: int, h: int, value: int = 40000) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    row = b"\x00" + struct.pack(">" + "H" * 3 * w, *([value, 0, 65535] * w))
    raw = row * h
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw))
    data += _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def save_png_header_claiming(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w×h but carries almost no data (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    data += _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def save_truncated_jpeg(path: Path, w: int = 64, h: int = 48) -> Path:
    buf = io.BytesIO()
    Image.fromarray(gradient(w, h)).save(buf, format="JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def save_corrupt_png(path: Path, w: int = 32, h: int = 32) -> Path:
    """Valid signature and IHDR, garbage compressed data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"not zlib data at all")
    data += _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path
