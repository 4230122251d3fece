"""kill -9 at random moments (CONTRACT §B: an interrupted run leaves no half-written file and is simply run again).

Each command runs in its own process group and the whole group (with any DataLoader workers) is killed, as a power
cut or the OOM killer would. Afterwards every file under its final name must be whole, and running the same command
again must finish the job with exactly the result of an uninterrupted run. The moments are random; the seed is in
every failure message.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtool.fsutil import TEMP_SUFFIX
from sdtool.metadata import read_metadata
from tests.conftest import REPO_ROOT
from tests.imagegen import save_rgb, save_truncated_jpeg

SEED = int.from_bytes(os.urandom(4), "little")


def make_dataset(folder: Path, n: int, distinct: int = 40) -> None:
    """`n` small PNGs in `distinct` sizes (copies of the same bytes, so building 2,000 of them is quick) + bad files."""
    folder.mkdir(parents=True)
    for i in range(distinct):
        save_rgb(folder / f"src{i:03d}.png", 16 + (i * 7) % 48, 16 + (i * 13) % 48, seed=i)
    blobs = [(folder / f"src{i:03d}.png").read_bytes() for i in range(distinct)]
    for i in range(distinct, n):
        (folder / f"img{i:05d}.png").write_bytes(blobs[i % distinct])
    (folder / "empty.png").write_bytes(b"")
    save_truncated_jpeg(folder / "truncated.jpg")


def start(args: list[object], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "sdtool", *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            start_new_session=True,  # its own process group: the kill takes the DataLoader workers too
        )


def kill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL the command's process group; True when it was still running (so it really was interrupted)."""
    running = proc.poll() is None
    if running:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return running


def run_to_end(args: list[object], log: Path) -> None:
    proc = start(args, log)
    assert proc.wait(timeout=120) == 0, log.read_text(encoding="utf-8", errors="replace")


def sidecars(folder: Path, ext: str) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.suffix == ext}


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX))


def assert_only_temp_debris(folder: Path, known: set[str]) -> None:
    """Besides the known files, the only thing a kill may leave is an atomic write's hidden temp file."""
    extra = {p.name for p in folder.iterdir()} - known
    assert all(name.startswith(".") and name.endswith(TEMP_SUFFIX) for name in extra), (SEED, sorted(extra))


@pytest.mark.slow
def test_kill_tag_then_rerun(tmp_path, tiny_tagger):
    rng = random.Random(SEED)
    n = 300
    reference = tmp_path / "reference"
    make_dataset(reference, n)
    args = ["-m", tiny_tagger, "--batch-size", "4", "--workers", "1"]
    run_to_end(["tag", reference, *args], tmp_path / "reference.log")
    expected = sidecars(reference, ".txt")
    assert len(expected) == n

    interrupted = 0
    for attempt in range(3):
        folder = tmp_path / f"run{attempt}"
        make_dataset(folder, n)
        images = {p.name for p in folder.iterdir()}
        target = rng.randrange(1, n)  # kill once this many sidecars are on disk
        proc = start(["tag", folder, *args], tmp_path / f"run{attempt}.log")
        while proc.poll() is None and sum(1 for p in os.scandir(folder) if p.name.endswith(".txt")) < target:
            time.sleep(0.002)
        interrupted += kill_group(proc)

        found = sidecars(folder, ".txt")
        for name, text in found.items():  # every sidecar under its final name is whole
            assert text == expected[name], (SEED, attempt, name, text)
        assert_only_temp_debris(folder, images | set(found))

        run_to_end(["tag", folder, *args], tmp_path / f"rerun{attempt}.log")
        assert sidecars(folder, ".txt") == expected, (SEED, attempt)
        assert temp_files(folder) == [], (SEED, attempt)  # the rerun removed what the kill left
    assert interrupted, f"seed {SEED}: no kill landed while tag was running"


@pytest.mark.slow
def test_kill_tag_with_metadata_output_then_rerun(tmp_path, tiny_tagger):
    rng = random.Random(SEED)
    folder = tmp_path / "images"
    make_dataset(folder, 300)
    args = ["-m", tiny_tagger, "--batch-size", "4", "--workers", "1"]
    reference = tmp_path / "reference.json"
    run_to_end(["tag", folder, *args, "--output-path", reference], tmp_path / "reference.log")
    expected = read_metadata(reference)

    out = tmp_path / "meta.json"
    out.write_text('{"/elsewhere/kept.png": {"caption": "kept"}}\n', encoding="utf-8")  # must survive the kill
    proc = start(["tag", folder, *args, "--output-path", out], tmp_path / "run.log")
    time.sleep(rng.uniform(0.5, 2.5))
    kill_group(proc)
    partial = read_metadata(out)  # whole JSON whatever the moment
    assert partial["/elsewhere/kept.png"] == {"caption": "kept"}, SEED
    for key, fields in partial.items():
        if key != "/elsewhere/kept.png":
            assert fields == expected[key], (SEED, key)

    run_to_end(["tag", folder, *args, "--output-path", out], tmp_path / "rerun.log")
    final = read_metadata(out)
    assert final.pop("/elsewhere/kept.png") == {"caption": "kept"}
    assert final == expected, SEED


@pytest.mark.slow
def test_kill_bucket_then_rerun(tmp_path):
    rng = random.Random(SEED)
    folder = tmp_path / "images"
    make_dataset(folder, 2000)
    started = time.monotonic()
    run_to_end(["bucket", folder, "-o", tmp_path / "reference.json", "--workers", "1"], tmp_path / "reference.log")
    duration = time.monotonic() - started
    expected = read_metadata(tmp_path / "reference.json")
    assert len(expected) == 2001  # the truncated JPEG too: its header is fine

    for attempt in range(4):
        out_dir = tmp_path / f"out{attempt}"
        out_dir.mkdir()
        out = out_dir / "meta.json"
        if attempt % 2:  # half the runs update an existing file, which must never be lost or half-written
            out.write_text('{"/elsewhere/kept.png": {"caption": "kept"}}\n', encoding="utf-8")
        args = ["bucket", folder, "-o", out, "--workers", "1", "--update"]
        proc = start(args, tmp_path / f"run{attempt}.log")
        time.sleep(rng.uniform(0.2, duration))
        kill_group(proc)
        assert_only_temp_debris(out_dir, {"meta.json"})
        if out.exists():
            partial = read_metadata(out)  # whole JSON
            partial.pop("/elsewhere/kept.png", None)
            assert partial in ({}, expected), (SEED, attempt)
        if attempt % 2:
            assert read_metadata(out)["/elsewhere/kept.png"] == {"caption": "kept"}, (SEED, attempt)

        run_to_end(args, tmp_path / f"rerun{attempt}.log")
        assert temp_files(out_dir) == [], (SEED, attempt)  # the rerun removed what the kill left
        final = read_metadata(out)
        if attempt % 2:
            assert final.pop("/elsewhere/kept.png") == {"caption": "kept"}
        assert final == expected, (SEED, attempt)
