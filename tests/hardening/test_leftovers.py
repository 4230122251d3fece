"""What interrupted writes leave behind (docs/promises.md): every command removes, before it writes, the
temp files and partial folders a killed sdtool left where it writes, but never those a running sdtool process is
still writing (the writer holds a lock on each while it writes); a folder replacement cut between its two renames
is repaired by putting the old folder back.

Before: the `.tmp` of a killed save stayed even after a later successful run, a second `cache` on the same folder
deleted the first one's temp files in flight, and a kill between the renames of a folder swap left nothing under
the folder's name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.hardening.test_signals import _temps, config, finish, start
from tests.imagegen import save_rgb
from tests.train.conftest import write_train_config


@contextmanager
def write_in_flight(path: Path) -> Iterator[Path]:
    """Another live sdtool process in the middle of an atomic write of `path`; yields its temp file."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from sdtool.fsutil import atomic_path\n"
            f"with atomic_path({str(path)!r}) as tmp:\n"
            "    tmp.write_bytes(b'in flight'); print(tmp.name, flush=True); time.sleep(600)\n",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        temp = path.parent / holder.stdout.readline().strip()
        assert temp.is_file()
        yield temp
    finally:
        holder.kill()
        holder.wait()


def test_a_second_cache_never_removes_the_first_ones_write_in_flight(cli, tmp_path, tiny_v1):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        save_rgb(images / f"{i}.png", 32, 32, seed=i)
    meta = tmp_path / "meta.json"
    bucket = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32"]
    assert cli("bucket", images, "-o", meta, *bucket).exit_code == 0
    cache_dir = tmp_path / "meta.latents"
    cache_dir.mkdir()
    stale = cache_dir / ".0-0123456789abcdef.safetensors.0a1b2c3d.tmp"  # what a kill -9 left
    stale.write_bytes(b"half an entry")
    with write_in_flight(cache_dir / "other-fedcba9876543210.safetensors") as live:
        result = cli("cache", meta, "-m", tiny_v1, "--workers", "0")
        assert result.exit_code == 0 and "unexpected" not in result.stderr, result.stderr
        assert live.exists(), "another process's write in flight was removed"
        assert not stale.exists()


@pytest.mark.slow
def test_a_kill_9_mid_save_leaves_debris_that_the_next_run_removes_but_never_a_live_writers(tmp_path, tiny_v1):
    """Before: the `.tmp` of a killed save stayed, even after a later successful run."""
    extra = "max_data_loader_n_workers = 0\nsave_state_on_train_end = true"
    cfg = config(tmp_path, tiny_v1, "out", 2, extra)
    out = tmp_path / "out"
    out.mkdir()
    # Debris a `kill -9` leaves: a model temp file and a partial state folder, whose writer is gone.
    (out / ".m.safetensors.0a1b2c3d.tmp").write_bytes(b"half a model")
    (out / ".m-state.partial.tmp").mkdir()
    (out / ".m-state.partial.tmp" / "optimizer.bin").write_bytes(b"half a state")
    # A write in flight in another live sdtool process (same output folder, another output name).
    with write_in_flight(out / "other.safetensors") as live:
        proc = start(cfg, "--set", "overwrite=true", "--set", "output_name=other")
        stderr = finish(proc)
        assert proc.returncode == 0, stderr
        assert live.exists(), "a live process's write was removed"
        proc = start(cfg, "--set", "overwrite=true")
        stderr = finish(proc)
        assert proc.returncode == 0, stderr
        assert [p.name for p in _temps(out)] == [live.name]  # the killed run's debris is gone, the live one stays
        assert "cleaned up after an interrupted run" in stderr


@pytest.mark.slow
def test_a_kill_between_the_two_renames_of_a_folder_swap_is_repaired(cli, tmp_path, tiny_v1):
    """A replaced folder is moved aside as `.<name>.old.tmp` before the new one takes its name; a kill between the
    two renames left nothing under the name. The next run puts the old folder back (no live process owns it)."""
    model = tmp_path / "model"
    assert cli("convert", tiny_v1, model).exit_code == 0
    model.rename(tmp_path / ".model.old.tmp")  # the moment between the renames
    again = cli("convert", tiny_v1, model)
    assert (
        again.exit_code == 1 and "already exists" in again.stderr and "unexpected" not in again.stderr
    )  # put back, and kept
    assert (model / "model_index.json").is_file() and not (tmp_path / ".model.old.tmp").exists()

    template = (
        'pretrained_model_name_or_path = "{model}"\noutput_dir = "{out}"\noutput_name = "m"\n'
        "max_train_steps = {steps}\ncache_latents = false\nmax_data_loader_n_workers = 0\n"
        "save_state_on_train_end = true\noverwrite = true\n"
    )
    cfg = write_train_config(tmp_path, "out", template, 2, model=tiny_v1, steps=1)
    assert cli("train", cfg).exit_code == 0
    state = tmp_path / "out" / "m-state"
    state.rename(tmp_path / "out" / ".m-state.old.tmp")
    resumed = cli("train", cfg, "--set", f"resume={state}", "--set", "max_train_steps=2")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 1" in resumed.stderr
