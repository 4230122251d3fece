"""The metadata file every step shares (CONTRACT §D): read, resolve keys to images, merge, write atomically.

Shape (kohya-compatible): one JSON object keyed by image path,
`{"/data/a/img1.png": {"caption": …, "tags": …, "image_size": [W, H], "train_resolution": [bw, bh]}}`,
or JSONL with one `{"image_path": …, …}` object per line. Keys are absolute paths, paths relative to the image
folder (with extension, `/` separators), or kohya's older bare stems (no extension), which are looked up in the
image folder. Unknown fields are kept as they are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from sdtool.errors import InputError
from sdtool.fsutil import METADATA_LIMIT, atomic_write_text, read_regular_file
from sdtool.images import image_extensions

Metadata = dict[str, dict[str, Any]]


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def read_metadata(path: str | Path) -> Metadata:
    """Read a metadata JSON object or JSONL file into `{key: fields}` (insertion order kept)."""
    path = Path(path)
    try:
        text = read_regular_file(path, METADATA_LIMIT, "metadata file").decode("utf-8")
    except FileNotFoundError as exc:
        raise InputError(path, "metadata file not found") from exc
    except UnicodeDecodeError as exc:
        raise InputError(path, f"cannot read metadata ({exc})") from exc
    stripped = text.lstrip()
    if is_jsonl(path) or (stripped.startswith("{") and _looks_like_jsonl(stripped)):
        return _parse_jsonl(path, text)
    if not stripped:
        raise InputError(path, "metadata file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "metadata must be a JSON object keyed by image path")
    for key, value in data.items():
        if not isinstance(value, dict):
            raise InputError(path, f"entry {key!r} is not an object")
    return data


_TEXT_FIELDS = ("caption", "tags")
_SIZE_FIELDS = {"image_size": 2, "train_resolution": 2, "resized_size": 2, "crop_ltrb": 4}


def entry_problem(fields: Mapping[str, Any]) -> str | None:
    """Why a metadata entry's known fields cannot be used, or None: `caption`/`tags` must be text, sizes whole
    numbers (JSON's `Infinity`, `1.5` or `"64"` are not). Commands skip such an entry and name it; unknown fields
    are not looked at."""
    for name in _TEXT_FIELDS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            return f"metadata field {name} must be text, got {value!r}"
    for name, n in _SIZE_FIELDS.items():
        value = fields.get(name)
        if value is not None and whole_numbers(value, n) is None:
            return f"metadata field {name} must be {n} whole numbers, got {value!r}"
    return None


def whole_numbers(value: Any, n: int) -> tuple[int, ...] | None:
    """`value` as `n` whole numbers (ints, or floats without a fraction such as 64.0), None when it is not that."""
    if not isinstance(value, list | tuple) or len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return None
        if isinstance(v, float) and not v.is_integer():  # also NaN and ±Infinity
            return None
        out.append(int(v))
    return tuple(out)


def _looks_like_jsonl(text: str) -> bool:
    first_line = text.split("\n", 1)[0].strip()
    if not first_line.endswith("}"):
        return False
    try:
        obj = json.loads(first_line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "image_path" in obj


def _parse_jsonl(path: Path, text: str) -> Metadata:
    data: Metadata = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {lineno} is not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict) or "image_path" not in obj:
            raise InputError(path, f"line {lineno} has no image_path")
        key = str(obj.pop("image_path"))
        data.setdefault(key, {}).update(obj)
    return data


def write_metadata(path: str | Path, data: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write atomically: JSON (indent 2, UTF-8 as is) or, for a .jsonl path, one object per line."""
    path = Path(path)
    if is_jsonl(path):
        lines = [json.dumps({"image_path": key, **dict(fields)}, ensure_ascii=False) for key, fields in data.items()]
        return atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def merge_metadata(existing: Mapping[str, Mapping[str, Any]], updates: Mapping[str, Mapping[str, Any]]) -> Metadata:
    """Update fields entry by entry; entries and fields the update does not mention are kept."""
    merged: Metadata = {key: dict(fields) for key, fields in existing.items()}
    for key, fields in updates.items():
        merged.setdefault(key, {}).update(fields)
    return merged


def metadata_key(image: Path, root: Path | None, relative: bool) -> str:
    """The key an image gets: its absolute path, or with `relative` its `/`-separated path below `root`."""
    image = image.absolute()
    if relative and root is not None:
        return PurePosixPath(*image.relative_to(root.absolute()).parts).as_posix()
    return str(image)


class ImageResolver:
    """Resolve metadata keys to image files below `image_dir` (absolute keys resolve to themselves).

    Stem-only keys (kohya's older default) are looked up as `<stem>.<ext>` for every image extension; when two
    files match, that is an error naming both.
    """

    def __init__(self, image_dir: str | Path | None):
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self._exts = image_extensions()

    def resolve(self, key: str) -> Path:
        candidate = Path(key)
        if candidate.is_absolute():
            return candidate
        if ".." in PurePosixPath(key.replace("\\", "/")).parts:
            # A relative key names a file below image_dir, never beside or above it (CONTRACT §D).
            raise InputError(key, "a relative metadata key must not leave the image folder ('..'); use an absolute key")
        if self.image_dir is None:
            raise InputError(
                key,
                "relative metadata key but no image folder to resolve it against",
                hint="pass the image folder (--image-dir, or image_dir in the dataset config)",
            )
        if candidate.suffix.lower() in self._exts:
            return self.image_dir / candidate
        return self._resolve_stem(key)

    def _resolve_stem(self, key: str) -> Path:
        assert self.image_dir is not None
        base = self.image_dir / key
        matches = [p for p in (base.with_name(base.name + ext) for ext in self._all_case_exts()) if p.is_file()]
        # Case-insensitive filesystems report the same file under several spellings.
        unique = sorted({p.resolve(): p for p in matches}.values(), key=str)
        if not unique:
            raise InputError(base, f"no image found for the stem-only key {key!r}")
        if len(unique) > 1:
            names = " and ".join(str(p) for p in unique[:2])
            raise InputError(
                base,
                f"the stem-only key {key!r} is ambiguous: {names}",
                hint="use keys with extensions (sdtool bucket writes them)",
            )
        return unique[0]

    def _all_case_exts(self) -> Iterable[str]:
        for ext in self._exts:
            yield ext
            yield ext.upper()
