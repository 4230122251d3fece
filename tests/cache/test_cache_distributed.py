"""`sdtool cache` under torchrun: each image is encoded once, by one rank, into the entry a one-process run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests import imagegen
from tests.cache.conftest import entry
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

# 7 images, 3 buckets, batch size 2: 4 batches, so both ranks get two and one batch is short.
IMAGES = [
    ("a.png", (96, 64), (64, 48)),
    ("b.png", (100, 70), (64, 48)),
    ("c.png", (120, 80), (64, 48)),
    ("d.png", (50, 90), (40, 64)),
    ("e.png", (70, 70), (64, 64)),
    ("f.png", (66, 66), (64, 64)),
    ("g.png", (80, 80), (64, 64)),
]


def _dataset(root: Path) -> Path:
    meta = {}
    for i, (name, (w, h), (bw, bh)) in enumerate(IMAGES):
        path = imagegen.save_rgb(root / "img" / name, w, h, seed=i)
        meta[str(path)] = entry(w, h, bw, bh)
    (root / "img" / "broken.png").write_bytes(b"not a png")
    meta[str(root / "img" / "broken.png")] = entry(64, 64, 64, 64)
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root / "meta.json"


def _run(args: list, processes: int) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if processes == 1:
        cmd = [sys.executable, "-m", "sdtool"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        cmd += ["-m", "sdtool"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_two_ranks_write_each_entry_once_identical_to_one_process(tmp_path, tiny_v1):
    meta = _dataset(tmp_path)
    common = ["--model", tiny_v1, "--batch-size", 2, "--flip-aug", "--device", "cpu", "--workers", 1]
    r1 = _run(["cache", meta, *common], 1)
    assert r1.returncode == 0, r1.stderr[-3000:]
    (tmp_path / "meta.latents").rename(tmp_path / "one.latents")
    r2 = _run(["cache", meta, *common], 2)
    assert r2.returncode == 0, r2.stderr[-3000:]

    # One line per written entry, printed once; the summary and the skipped image once.
    paths = r2.stdout.split()
    assert len(paths) == len(set(paths)) == len(IMAGES)
    assert sorted(Path(p).name for p in paths) == sorted(Path(p).name for p in r1.stdout.split())
    assert r1.stderr.count("cached 7 images, skipped 1") == 1
    assert r2.stderr.count("cached 7 images, skipped 1") == 1, r2.stderr[-3000:]
    assert r2.stderr.count("skipped ") == 2  # the skip line and the summary
    assert "2 processes" in r2.stderr

    entries1 = sorted((tmp_path / "one.latents").glob("*.safetensors"))
    entries2 = sorted((tmp_path / "meta.latents").glob("*.safetensors"))
    assert [p.name for p in entries1] == [p.name for p in entries2] and len(entries2) == len(IMAGES)
    for a, b in zip(entries1, entries2, strict=True):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() == {"mean", "std", "flipped_mean", "flipped_std"}
        for k in ta:
            assert ta[k].equal(tb[k]), (a.name, k)

    # A rerun on two ranks keeps every entry (only the unreadable image is tried again) and says so once.
    again = _run(["cache", meta, *common], 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == "" and again.stderr.count("7 up to date") == 1
    assert again.stderr.count("cached 0 images, skipped 1") == 1


def test_two_ranks_kohya_and_status_once(tmp_path, tiny_v1):
    pytest.importorskip("cv2")  # kohya's resize rule uses OpenCV (a dependency; a venv older than it lacks it)
    meta = _dataset(tmp_path)
    args = ["--model", tiny_v1, "--batch-size", 2, "--format", "kohya", "--device", "cpu", "--json"]
    r = _run(["cache", meta, *args], 2)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    written = [x["path"] for x in records if x["status"] == "written"]
    assert len(written) == len(set(written)) == len(IMAGES)
    assert [x["status"] for x in records].count("skipped") == 1
    assert len(list((tmp_path / "img").glob("*_sd.npz"))) == len(IMAGES)

    status = _run(["cache", meta, "--status", "--format", "kohya", "--model", tiny_v1, "--json"], 2)
    assert status.returncode == 0, status.stderr[-3000:]
    lines = [json.loads(line) for line in status.stdout.splitlines()]
    assert len(lines) == len(IMAGES) + 1 and sum(x["status"] == "ok" for x in lines) == len(IMAGES)
