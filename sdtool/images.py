"""The one way sdtool lists and opens images (CONTRACT §C).

- extensions are matched case-insensitively (png, jpg, jpeg, webp, bmp; avif/jxl when a Pillow plugin is present);
- EXIF orientation is applied, so every size is the *displayed* size;
- alpha is composited onto white; palette, CMYK, 16-bit and grey images become 8-bit RGB;
- decompression bombs (more than SDTOOL_MAX_PIXELS pixels) are refused before decoding;
- `read_size` reads headers only.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdtool.errors import ImageError, UsageError
from sdtool.fsutil import file_problem

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default limit
BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees


def image_extensions() -> tuple[str, ...]:
    """The extensions sdtool reads; avif and jxl only when Pillow can open them."""
    registered = Image.registered_extensions()
    extra = tuple(ext for ext in (".avif", ".jxl") if ext in registered)
    return BASE_EXTENSIONS + extra


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in image_extensions()


def max_pixels() -> int:
    value = os.environ.get("SDTOOL_MAX_PIXELS", "")
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError as exc:
        raise ImageError("SDTOOL_MAX_PIXELS", f"not a whole number: {value!r}") from exc
    return limit


def list_images(dirs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """Images in `dirs` (files given directly are kept as they are), sorted, without duplicates.

    Hidden files and folders (names starting with '.') are passed over.
    """
    exts = set(image_extensions())
    found: set[Path] = set()
    for d in dirs:
        d = Path(d)
        if os.path.lexists(d) and not d.is_dir():  # a file given directly (the reader names it if it is no image)
            found.add(d)
            continue
        if not d.is_dir():
            raise ImageError(d, "no such folder")
        # os.scandir gives the file type from the directory listing: no stat per file (big folders list fast).
        for name in _walk_files(str(d), exts, recursive):
            found.add(Path(name))
    return sorted(found, key=lambda p: str(p))


def find_images(dirs: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """`list_images`, refusing to find none: a usage error (exit 2) naming the folders, and `--recursive` when
    sub-folders hold images."""
    dirs = list(dirs)
    found = list_images(dirs, recursive)
    if found:
        return found
    where = ", ".join(str(d) for d in dirs)
    deeper = [] if recursive else list_images([d for d in dirs if Path(d).is_dir()], recursive=True)
    hint = (
        f"{len(deeper)} image{' is' if len(deeper) == 1 else 's are'} in sub-folders: add --recursive"
        if deeper
        else f"expected folders of {', '.join(e[1:] for e in image_extensions())} images"
    )
    raise UsageError(f"no images in {where}", hint=hint)


# Pillow tries its plugins one after another; naming the one the extension implies skips the failed attempts
# (a third of the time of a header read). A misnamed file still opens through the full search.
_FORMAT_BY_EXTENSION = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}


def _pil_open(path: Path) -> Image.Image:
    fmt = _FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if fmt is not None:
        try:
            return Image.open(path, formats=[fmt])
        except UnidentifiedImageError:
            pass
    return Image.open(path)


def _walk_files(folder: str, exts: set[str], recursive: bool) -> Iterator[str]:
    """Everything below `folder` named like an image that is not a folder, skipping hidden names; symlinked folders
    are not followed (like Path.rglob).

    Not only regular files: a dangling or looping symlink, a FIFO or a device with an image extension is listed too,
    so that the command names it as skipped (the readers refuse it without opening it) instead of silently training
    on fewer images than the folder shows.
    """
    with os.scandir(folder) as entries:
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks: a link to a folder is a folder
            except OSError:  # a symlink loop: not a folder
                is_dir = False
            if is_dir:
                if recursive and not entry.is_symlink():
                    subdirs.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in exts:
                yield entry.path
    for sub in subdirs:
        yield from _walk_files(sub, exts, recursive)


def _open_checked(path: Path) -> Image.Image:
    """Open lazily (header only) and refuse bombs before any pixel is decoded."""
    limit = max_pixels()
    # Pillow refuses images over twice its own limit by itself, whatever SDTOOL_MAX_PIXELS says: switch its check
    # off so that ours (below, on the header's size, still before any decoding) is the one that decides.
    Image.MAX_IMAGE_PIXELS = None
    try:
        problem = file_problem(path)  # a FIFO would block the read below, a device would never end
        if problem is not None:
            raise ImageError(path, problem)
        if path.stat().st_size == 0:
            raise ImageError(path, "empty file")
        with warnings.catch_warnings():
            # Our own limit applies below; Pillow's warning is redundant and its error is re-worded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _pil_open(path)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(
            path, f"decompression bomb refused ({exc})", hint="raise SDTOOL_MAX_PIXELS if the image is genuine"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image Pillow can identify") from exc
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise ImageError(path, f"dangling symlink: its target {os.readlink(path)} does not exist") from exc
        raise ImageError(path, "file not found") from exc
    except OSError as exc:
        raise ImageError(path, f"cannot read header: {exc}") from exc
    w, h = img.size
    if w <= 0 or h <= 0:
        img.close()
        raise ImageError(path, f"invalid size {w}x{h}")
    if w * h > limit:
        img.close()
        raise ImageError(
            path,
            f"decompression bomb refused: {w}x{h} = {w * h:,} pixels is over the limit of {limit:,}",
            hint="raise SDTOOL_MAX_PIXELS if the image is genuine",
        )
    return img


def _orientation(img: Image.Image, path: Path | None = None) -> int:
    try:
        if img.format == "PNG" and "exif" not in img.info and path is not None and not _png_has_late_metadata(path):
            # Pillow's PNG getexif() decodes the whole image to look for metadata after the pixel data; when the
            # chunk list shows there is none, the header's metadata is all there is and no decode is needed.
            exif = Image.Image.getexif(img)
        else:
            exif = img.getexif()
        value = exif.get(_ORIENTATION_TAG, 1)
        return int(value) if value else 1
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_METADATA_CHUNKS = {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}


def _png_has_late_metadata(path: Path) -> bool:
    """Whether a PNG has EXIF or text chunks after its first IDAT (walks chunk headers, reads no pixel data)."""
    # Unbuffered: each chunk costs one small read and a seek, not a refilled 8 KiB buffer.
    with open(path, "rb", buffering=0) as f:
        if f.read(8) != _PNG_SIGNATURE:
            return True  # not what we expect: let Pillow decide the slow way
        seen_idat = False
        while True:
            header = f.read(8)
            if len(header) < 8:
                return False
            length = int.from_bytes(header[:4], "big")
            kind = header[4:]
            if kind == b"IDAT":
                seen_idat = True
            elif kind == b"IEND":
                return False
            elif seen_idat and kind in _PNG_METADATA_CHUNKS:
                return True
            f.seek(length + 4, os.SEEK_CUR)  # chunk data and CRC


def read_size(path: str | Path) -> tuple[int, int]:
    """The displayed (EXIF-rotated) size from the header alone; raises ImageError."""
    return read_sizes(path)[1]


def read_sizes(path: str | Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stored, displayed) size from the header alone: the pixel grid in the file, and the size once EXIF
    orientation is applied (W and H swapped for a 90°/270° rotation); raises ImageError."""
    path = Path(path)
    img = _open_checked(path)
    try:
        w, h = img.size
        if _orientation(img, path) in _SWAPS_AXES:
            return (w, h), (h, w)
        return (w, h), (w, h)
    finally:
        img.close()


def open_image(path: str | Path) -> Image.Image:
    """Decode to 8-bit RGB, displayed orientation, alpha on white; raises ImageError."""
    path = Path(path)
    img = _open_checked(path)
    try:
        with img:
            img.load()
            with contextlib.suppress(Exception):  # unreadable EXIF: keep the stored orientation
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(path, f"corrupt or truncated image data: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        img = _high_bit_depth_to_l(img)
        mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB" and "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int/float) grey to 8-bit by scaling, not clipping as Pillow's convert does."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        peak = 1.0 if arr.size and float(arr.max()) <= 1.0 else 255.0
    elif img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
        peak = 65535.0
    else:
        peak = 255.0
    arr = np.clip(np.rint(arr / peak * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


# ------------------------------------------------------------------------------------------- outputs vs inputs
def check_output_path(output: str | Path, flag: str, inputs: Iterable[str | Path] = ()) -> None:
    """The one rule every command applies to what it writes beside images (metadata files, sidecars): an output is
    never named like an image (it would replace one, or be read as one by the next run) and is never one of its
    `inputs` (the same file under any name), so `--overwrite` cannot destroy an input. Raises UsageError (exit 2).
    """
    from sdtool.errors import UsageError

    output = Path(output)
    if is_image_path(output):
        raise UsageError(
            f"{flag} {output}: an output named like an image ({output.suffix}) could replace or pass for an image",
            hint="use the extension the option expects (e.g. .json, .caption, .txt)",
        )
    try:
        target = os.stat(output)
    except OSError:
        return  # nothing there yet: it cannot be an existing input
    for item in inputs:
        try:
            st = os.stat(item)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            raise UsageError(f"{flag} {output} is one of the inputs ({item}); it would be overwritten")


def check_sidecar_extension(extension: str, flag: str) -> None:
    """A sidecar extension is never an image extension: `<stem><ext>` would replace an image (`--caption-extension
    .jpg` overwrites a.jpg with a.png's caption)."""
    check_output_path("sidecar" + extension, flag)
