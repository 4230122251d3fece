"""A corpus of bad and odd inputs, generated at test time, that knows what every command should make of each file.

Each `Entry` records whether header-only readers (`bucket`) and decoders (`caption`, `tag`, later `cache`) accept the
file, the reason words a skip must contain, and the displayed size of every readable image, so a test can check a
command's output file by file. The corpus is plain files on disk: the `cache` and `train` halves of the hardening
suite run their commands over the same tree.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from tests.imagegen import (
    save_cmyk,
    save_corrupt_png,
    save_exif_rotated,
    save_grey16,
    save_palette_transparent,
    save_png_header_claiming,
    save_rgb,
    save_rgb48_png,
    save_rgba,
    save_truncated_jpeg,
)

Size = tuple[int, int]

# Reason words a skip must contain (any one of them, case-insensitive), per kind of damage.
EMPTY = ("empty",)
NOT_IMAGE = ("not an image", "identify")
TRUNCATED = ("truncated", "corrupt")
CORRUPT = ("corrupt", "decompress", "truncated")
BOMB = ("decompression bomb",)
MISSING = ("not found", "symlink", "missing")


@dataclass(frozen=True)
class Entry:
    """One file of the corpus and what a reader must make of it."""

    rel: str  # path below the corpus root, '/'-separated
    kind: str  # what it is, for messages
    size: Size | None = None  # displayed size (EXIF applied) where the header can be read
    header_skip: tuple[str, ...] | None = None  # reason words when a header-only reader must skip it
    decode_skip: tuple[str, ...] | None = None  # reason words when a full decode must skip it
    caption: str | None = None  # text of its `.caption` sidecar, if it has one
    tags: str | None = None  # text of its `.txt` sidecar, if it has one
    sidecar_taken_by: str | None = None  # rel of an earlier image whose `<stem>.caption`/`.txt` this one shares
    bad_sidecars: tuple[str, ...] = ()  # rels of its sidecars that cannot be read as text

    @property
    def nested(self) -> bool:
        return "/" in self.rel

    def header_ok(self) -> bool:
        return self.header_skip is None

    def decode_ok(self) -> bool:
        return self.header_skip is None and self.decode_skip is None

    def skip_words(self, reads: str) -> tuple[str, ...] | None:
        """Reason words for a skip when reading `header`s or `pixels`; None when the file must be processed."""
        if self.header_skip is not None:
            return self.header_skip
        return self.decode_skip if reads == "pixels" else None


@dataclass
class Expectation:
    """What one command run over the corpus must do: process `good` (path → displayed size), skip `bad`."""

    good: dict[Path, Size] = field(default_factory=dict)
    bad: dict[Path, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class Corpus:
    """The generated tree: image entries, plus files that are not images and must be left alone."""

    root: Path
    entries: list[Entry]
    bystanders: list[str]  # files that are not listed as images (orphan sidecars, notes, hidden files)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def entry(self, rel: str) -> Entry:
        return next(e for e in self.entries if e.rel == rel)

    def expect(self, reads: str, *, recursive: bool = True, sidecars: bool = False) -> Expectation:
        """The outcome for a command reading `header`s (bucket) or `pixels` (caption, tag, cache).

        With `sidecars`, an image whose sidecar another image already owns (`twin.jpg`, `twin.png`) is skipped.
        """
        assert reads in ("header", "pixels")
        out = Expectation()
        for e in self.entries:
            if e.nested and not recursive:
                continue
            path = self.path(e.rel)
            words = e.skip_words(reads)
            if sidecars and e.sidecar_taken_by is not None:
                words = ("also belongs to",)
            if words is None:
                assert e.size is not None, e.rel
                out.good[path] = e.size
            else:
                out.bad[path] = words
        return out

    def snapshot(self) -> dict[str, str]:
        """rel path → content hash (or link target) of everything under the root, for before/after comparisons."""
        return snapshot(self.root)


def snapshot(root: Path) -> dict[str, str]:
    """rel path → `file:<sha1>`, `link:<target>` or `dir` for everything below `root` (links are not followed)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                found[rel] = f"link:{os.readlink(full)}"
            elif full.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = "file:" + hashlib.sha1(full.read_bytes()).hexdigest()
    return found


def build_corpus(root: Path) -> Corpus:
    """Write the corpus below `root` (created) and return its description."""
    root.mkdir(parents=True, exist_ok=True)
    entries: list[Entry] = []

    def good(rel: str, kind: str, size: Size, **kw) -> None:
        entries.append(Entry(rel, kind, size=size, **kw))

    def p(rel: str) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # ---------------------------------------------------------------------------------------------- readable images
    save_rgb(p("plain.png"), 64, 48, seed=1)
    good("plain.png", "RGB PNG", (64, 48), caption="a plain picture", tags="plain, picture")
    p("plain.caption").write_text("a plain picture\n", encoding="utf-8")
    p("plain.txt").write_text("plain, picture\n", encoding="utf-8")

    save_rgb(p("photo.jpg"), 80, 60, seed=2, quality=90)
    good("photo.jpg", "RGB JPEG", (80, 60))

    save_rgb(p("one_pixel.png"), 1, 1, seed=3)
    good("one_pixel.png", "1×1 pixel", (1, 1))

    save_rgb(p("sliver.png"), 8, 4000, seed=4)
    good("sliver.png", "8×4000 sliver", (8, 4000))

    save_cmyk(p("cmyk.jpg"), 40, 30)
    good("cmyk.jpg", "CMYK JPEG", (40, 30))

    save_grey16(p("grey16.png"), 36, 20)
    good("grey16.png", "16-bit grey PNG", (36, 20))

    save_rgb48_png(p("rgb48.png"), 20, 12)
    good("rgb48.png", "16-bit RGB PNG", (20, 12))

    save_palette_transparent(p("palette.png"), 24, 16)
    good("palette.png", "palette PNG with transparency", (24, 16))

    save_rgba(p("rgba.png"), 32, 24)
    good("rgba.png", "RGBA PNG", (32, 24))

    save_exif_rotated(p("rotated.jpg"), 60, 20, orientation=6)
    good("rotated.jpg", "EXIF orientation 6 (stored 60×20)", (20, 60))

    save_rgb(p("ünï cödé.png"), 30, 40, seed=5)
    good("ünï cödé.png", "unicode and a space in the name", (30, 40), caption="ünïcödé caption")
    p("ünï cödé.caption").write_text("ünïcödé caption\n", encoding="utf-8")

    save_rgb(p("with space.JPG"), 50, 50, seed=6, format="JPEG")
    good("with space.JPG", "space in the name, upper-case extension", (50, 50))

    save_rgb(p("$(touch pwned).png"), 20, 20, seed=7)
    good("$(touch pwned).png", "shell command substitution in the name", (20, 20))

    save_rgb(p("semi;colon & pipe|quote'.webp"), 26, 18, seed=8, format="WEBP")
    good("semi;colon & pipe|quote'.webp", "shell metacharacters in the name", (26, 18))

    save_rgb(p("bitmap.bmp"), 17, 9, seed=9)
    good("bitmap.bmp", "BMP", (17, 9))

    # Sidecars that are not UTF-8: bucket names them and keeps the image; the labellers must not stumble on them.
    save_rgb(p("latin1.png"), 30, 30, seed=14)
    good("latin1.png", "image whose sidecars are Latin-1", (30, 30), bad_sidecars=("latin1.caption", "latin1.txt"))
    p("latin1.caption").write_bytes("café au lait\n".encode("latin-1"))
    p("latin1.txt").write_bytes("café, lait\n".encode("latin-1"))

    # Two images with one stem: bucket keeps both, the labellers would write one sidecar for two images.
    save_rgb(p("twin.jpg"), 24, 24, seed=10, format="JPEG")
    good("twin.jpg", "first of two images sharing a stem", (24, 24))
    save_rgb(p("twin.png"), 28, 24, seed=11)
    good("twin.png", "second of two images sharing a stem", (28, 24), sidecar_taken_by="twin.jpg")

    # Nested folders (read with --recursive), including a folder whose name looks like an image.
    save_rgb(p("sub/deeper/nested.png"), 44, 33, seed=12)
    good("sub/deeper/nested.png", "two folders down", (44, 33), caption="nested caption")
    p("sub/deeper/nested.caption").write_text("  nested caption  \n", encoding="utf-8")
    save_rgb(p("dir.png/inside.png"), 22, 30, seed=13)
    good("dir.png/inside.png", "inside a folder named like an image", (22, 30))

    # A symlink to an image is read as that image.
    (root / "link.png").symlink_to("plain.png")
    good("link.png", "symlink to plain.png", (64, 48))

    # ----------------------------------------------------------------------------------- files no reader can use
    p("empty.png").write_bytes(b"")
    entries.append(Entry("empty.png", "empty file", header_skip=EMPTY))
    p("zero bytes.jpg").write_bytes(b"")
    entries.append(Entry("zero bytes.jpg", "empty file", header_skip=EMPTY))

    p("notes.png").write_text("this is text, not a picture\n", encoding="utf-8")
    entries.append(Entry("notes.png", "text with an image extension", header_skip=NOT_IMAGE))
    p("garbage.webp").write_bytes(os.urandom(2048))
    entries.append(Entry("garbage.webp", "random bytes", header_skip=NOT_IMAGE))

    save_png_header_claiming(p("bomb.png"), 60000, 60000)
    entries.append(Entry("bomb.png", "header claims 60000×60000", header_skip=BOMB))

    (root / "dangling.png").symlink_to("no-such-target.png")
    entries.append(Entry("dangling.png", "dangling symlink", header_skip=MISSING))

    # Headers are fine, pixel data is not: header-only bucketing accepts them (cache finds them), decoders skip them.
    save_truncated_jpeg(p("truncated.jpg"), 64, 48)
    entries.append(Entry("truncated.jpg", "truncated JPEG", size=(64, 48), decode_skip=TRUNCATED))
    save_corrupt_png(p("corrupt.png"), 32, 32)
    entries.append(Entry("corrupt.png", "PNG with garbage IDAT", size=(32, 32), decode_skip=CORRUPT))
    _save_png_bad_crc(p("sub/badcrc.png"), 16, 16)
    entries.append(Entry("sub/badcrc.png", "PNG with a broken IDAT checksum", size=(16, 16), decode_skip=CORRUPT))

    # ------------------------------------------------------------------------------------ not images: left alone
    bystanders = {
        "orphan.caption": "a caption without an image\n",
        "orphan.txt": "tags, without, image\n",
        "README.md": "# not a picture\n",
        "sub/notes.json": '{"not": "metadata"}\n',
        ".hidden.png": None,  # hidden files are passed over
    }
    for rel, text in bystanders.items():
        if text is None:
            save_rgb(p(rel), 8, 8)
        else:
            p(rel).write_text(text, encoding="utf-8")
    entries.sort(key=lambda e: e.rel)
    return Corpus(root, entries, sorted(bystanders))


def _save_png_bad_crc(path: Path, w: int, h: int) -> None:
    """A valid PNG whose IDAT checksum is wrong (bit rot in the pixel data)."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip a byte of the compressed data, leave the CRC as it was
    path.write_bytes(bytes(data))


def unexpected_files(before: dict[str, str], after: dict[str, str], allowed_new: Iterable[str]) -> list[str]:
    """New or changed paths that are not in `allowed_new` (changed existing files are always unexpected)."""
    allowed = set(allowed_new)
    problems = []
    for rel, state in after.items():
        if rel not in before:
            if rel not in allowed:
                problems.append(f"new: {rel}")
        elif before[rel] != state and rel not in allowed:
            problems.append(f"changed: {rel}")
    problems += [f"removed: {rel}" for rel in before if rel not in after]
    return problems
