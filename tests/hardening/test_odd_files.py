"""Files that are not what their names say (docs/promises.md): FIFOs, devices, symlink loops, folders and
giant files where images, sidecars or metadata go. Nothing hangs, nothing reads without end, and every one is named
as `skipped <path>: <reason>` while the rest is processed.

Before: a FIFO named `x.caption` hung `bucket`, `x.txt` as a FIFO hung `tag --append`, a link to /dev/zero read
until memory ran out, FIFOs and symlink loops named like images were passed over without a word, a folder where a
sidecar goes crashed `tag` and counted as an existing caption in `caption`, and a tag name with a line break in
the tagger's CSV wrote a two-line sidecar.

Every command runs in a subprocess with a timeout, so a hang fails the test instead of stopping the suite.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.hardening.conftest import skip_lines
from tests.imagegen import save_rgb

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def run(sdtool_proc, *args):
    result = sdtool_proc(*args, timeout=120)
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def odd(tmp_path) -> Path:
    """Two good images, sidecars that are a FIFO, a /dev/zero link and a giant file, odd things named like images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        save_rgb(folder / f"{name}.png", 32, 32, seed=ord(name))
    os.mkfifo(folder / "a.caption")
    (folder / "b.caption").symlink_to("/dev/zero")
    (folder / "c.caption").write_bytes(b"x" * (4 << 20))  # a 4 MiB "caption": over any sidecar's size
    os.mkfifo(folder / "fifo.png")
    (folder / "loop.png").symlink_to("loop.png")
    return folder


BUCKET = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32"]


def test_bucket_names_odd_sidecars_and_images_and_never_hangs(sdtool_proc, odd, tmp_path):
    result = run(sdtool_proc, "bucket", odd, "-o", tmp_path / "meta.json", *BUCKET)
    assert result.returncode == 0, result.stderr
    named = skip_lines(result.stderr)
    assert "FIFO" in named[str(odd / "a.caption")] and "kept without its caption" in named[str(odd / "a.caption")]
    assert "character device" in named[str(odd / "b.caption")]
    assert "over the limit" in named[str(odd / "c.caption")]
    assert "FIFO" in named[str(odd / "fifo.png")]
    assert "symlink loop" in named[str(odd / "loop.png")]
    assert len(named) == 5, named


def test_tag_append_and_sidecar_places_that_are_not_files(sdtool_proc, odd, tmp_path, tiny_tagger):
    os.mkfifo(odd / "a.txt")
    (odd / "b.txt").symlink_to("/dev/zero")
    (odd / "c.txt").mkdir()  # a folder where c.png's tags would go
    result = run(sdtool_proc, "tag", odd, "-m", tiny_tagger, "--append", "--workers", "0")
    assert result.returncode == 0, result.stderr
    named = skip_lines(result.stderr)
    assert "FIFO" in named[str(odd / "a.png")]
    assert "character device" in named[str(odd / "b.png")]
    assert "folder" in named[str(odd / "c.png")]
    assert "FIFO" in named[str(odd / "fifo.png")] and "symlink loop" in named[str(odd / "loop.png")]
    assert (odd / "d.txt").read_text().count("\n") == 1  # the good image is tagged
    assert (odd / "c.txt").is_dir() and not list((odd / "c.txt").iterdir())  # the folder is left alone


@pytest.mark.slow
def test_caption_does_not_take_a_folder_for_a_caption(sdtool_proc, tmp_path, tiny_blip):
    folder = tmp_path / "images"
    folder.mkdir()
    save_rgb(folder / "a.png", 32, 32, seed=1)
    save_rgb(folder / "b.png", 32, 32, seed=2)
    (folder / "a.caption").mkdir()
    result = run(sdtool_proc, "caption", folder, "-m", tiny_blip, "--workers", "0", "--max-length", "5")
    assert result.returncode == 0, result.stderr
    named = skip_lines(result.stderr)
    assert "folder" in named[str(folder / "a.png")]
    assert "kept" not in result.stderr  # it was not counted as an existing caption
    assert (folder / "b.caption").is_file()


def test_metadata_that_is_a_fifo_is_an_error_not_a_hang(sdtool_proc, tmp_path, tiny_v1):
    os.mkfifo(tmp_path / "meta.json")
    result = run(sdtool_proc, "cache", tmp_path / "meta.json", "-m", tiny_v1)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'meta.json'}: is a FIFO, not a regular file"


def test_tag_names_with_control_characters_still_give_one_line_sidecars(sdtool_proc, tmp_path, tiny_tagger):
    model = tmp_path / "tagger"
    shutil.copytree(tiny_tagger, model)
    with (model / "selected_tags.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        if row[1] == "blue_sky":
            row[1] = "blue\nsky"
        if row[1] == "white_background":
            row[1] = "white\r\nbackground\x00"
    with (model / "selected_tags.csv").open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "white.png")
    result = run(sdtool_proc, "tag", folder, "-m", model, "--workers", "0")
    assert result.returncode == 0, result.stderr
    text = (folder / "white.txt").read_text(encoding="utf-8")
    assert text.count("\n") == 1 and text.endswith("\n"), repr(text)
    assert "blue sky" in text and "white background" in text, repr(text)
    assert "control characters" in result.stderr  # the model's file is named once
