"""Write `torch.save` files (`.pt`, `.ckpt`) that AUTOMATIC1111's safe loader, torch, ComfyUI and kohya all read.

torch ≥ 2.6 puts `.format_version`, `.storage_alignment`, `byteorder` and `.data/serialization_id` records into
every zip it writes, and no option leaves them out; A1111's `modules/safe.py` accepts only
`<folder>/data.pkl`, `<folder>/data/<N>` and `<folder>/version` and refuses anything else as possibly malicious.
So the file is written by `torch.save` to a temporary file, then copied record by record into a zip that holds only
those three kinds (torch reads such a file as it reads its own: without `.format_version` it finds the storages by
name, and without `byteorder` it assumes little-endian). The inner folder is the file's own stem, as `torch.save`
would name it, not the temporary name. Data records stay uncompressed and 64-byte aligned (the padding goes into
the local header's extra field, as torch's own writer does), so `torch.load(mmap=True)` still works.

Only plain Python values (dict, list, str, int, float, bool, None) and tensors should go in: A1111 unpickles with an
allow-list of globals, and so does `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from sdtool.fsutil import TEMP_SUFFIX, atomic_path

# The record names A1111's check allows, relative to the archive's folder (see the module docstring).
_KEPT = re.compile(r"^(data\.pkl|data/\d+|version)$")
_ALIGNMENT = 64  # torch's kFieldAlignment: where each record's data starts
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
_ZIP64_EXTRA = 20  # what Python's zipfile appends to the extra field of a record that needs zip64


def save_torch_file(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` atomically, as a zip with only the records A1111's safe loader accepts."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        fd, raw_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".raw{TEMP_SUFFIX}", dir=path.parent)
        os.close(fd)
        raw = Path(raw_name)
        try:
            torch.save(obj, raw)
            _copy_allowed_records(raw, tmp, archive=path.stem)
        finally:
            raw.unlink(missing_ok=True)
    return path


def _copy_allowed_records(src: Path, dst: Path, archive: str) -> None:
    # A file read on another byte order needs the marker; A1111 refuses such a file, but it must not be misread.
    keep_byteorder = sys.byteorder != "little"
    with zipfile.ZipFile(src) as zin, open(dst, "wb") as f, zipfile.ZipFile(f, "w") as zout:
        for info in zin.infolist():
            _, _, rel = info.filename.partition("/")
            if rel == ".data/version":  # torch writes this name instead of `version` from format version 6 on
                rel = "version"
            if not (_KEPT.match(rel) or (keep_byteorder and rel == "byteorder")):
                continue
            out = zipfile.ZipInfo(f"{archive}/{rel}", date_time=(1980, 1, 1, 0, 0, 0))
            out.compress_type = zipfile.ZIP_STORED
            out.file_size = info.file_size
            out.extra = _alignment_padding(f.tell(), out)
            with zin.open(info) as r, zout.open(out, "w") as w:
                shutil.copyfileobj(r, w, 1 << 24)


def _alignment_padding(offset: int, info: zipfile.ZipInfo) -> bytes:
    """An extra field that makes the record's data start on a 64-byte boundary (torch's "FB" padding field)."""
    name_len = len(info.filename.encode("utf-8"))
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for writing a zip64 local header
    start = offset + _LOCAL_HEADER + name_len + 4 + (_ZIP64_EXTRA if zip64 else 0)
    pad = -start % _ALIGNMENT
    return b"FB" + struct.pack("<H", pad) + b"Z" * pad
