"""Atomic writes leave the old file or the whole new one, never a partial file or a stray temp file."""

from __future__ import annotations

import pytest

from sdtool.fsutil import atomic_path, atomic_write_text, leftover_temp_files


def test_write_and_replace(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert leftover_temp_files(tmp_path) == []


def test_failure_keeps_old_content_and_cleans_up(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert leftover_temp_files(tmp_path) == []


def test_folder_replacement(tmp_path):
    target = tmp_path / "model"
    for content in ("a", "b"):
        with atomic_path(target, folder=True) as tmp:
            (tmp / "weights").write_text(content)
    assert (target / "weights").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
