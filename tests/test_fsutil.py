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


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    from sdtool.errors import SdtoolError

    target = tmp_path / "model"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with (
        pytest.raises(SdtoolError, match="is never replaced"),
        atomic_path(target, folder=True, replaces=("x",)) as tmp,
    ):
        (tmp / "weights").write_text("new")
    assert (target / "mine.txt").read_text() == "keep"
    assert leftover_temp_files(tmp_path) == []


def test_stale_temps_are_removed_live_ones_kept_and_a_cut_swap_put_back(tmp_path):
    import subprocess
    import sys

    from sdtool.fsutil import clean_stale_temps
    from tests.conftest import REPO_ROOT

    stale = tmp_path / ".a.txt.0a1b2c3d.tmp"
    stale.write_text("half")
    (tmp_path / ".model.old.tmp").mkdir()  # a kill between the renames: nothing under "model"
    (tmp_path / ".keep.0a1b2c3d.tmp").write_text("not matched")
    code = (
        "import sys, time\nfrom sdtool.fsutil import atomic_path\n"
        f"with atomic_path({str(tmp_path / 'b.txt')!r}) as tmp:\n    print(tmp.name, flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO_ROOT)}
    )
    try:
        live = tmp_path / holder.stdout.readline().strip()
        touched = clean_stale_temps(tmp_path, "[abm]*")
        assert sorted(p.name for p in touched) == [".a.txt.0a1b2c3d.tmp", "model"]
        assert live.exists() and (tmp_path / "model").is_dir() and (tmp_path / ".keep.0a1b2c3d.tmp").exists()
    finally:
        holder.kill()
        holder.wait()
    assert clean_stale_temps(tmp_path, "b*") == [live]  # its writer is gone now


def test_only_regular_files_are_read_and_only_up_to_the_limit(tmp_path):
    import os

    from sdtool.errors import InputError
    from sdtool.fsutil import read_regular_file

    (tmp_path / "ok").write_bytes(b"12345")
    assert read_regular_file(tmp_path / "ok", 5) == b"12345"
    with pytest.raises(InputError, match="over the limit"):
        read_regular_file(tmp_path / "ok", 4)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    (tmp_path / "loop").symlink_to("loop")
    for name, words in (("fifo", "FIFO"), ("zero", "character device"), ("loop", "symlink loop"), (".", "folder")):
        with pytest.raises(InputError, match=words):
            read_regular_file(tmp_path / name, 1 << 20)
    with pytest.raises(FileNotFoundError):
        read_regular_file(tmp_path / "missing", 10)
