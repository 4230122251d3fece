"""`sdtool demo` runs the whole chain end to end, offline, on CPU (CONTRACT §M)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.conftest import run_sdtool


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    root = tmp_path / "demo"
    proc = run_sdtool("demo", "--dir", root, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(root)  # stdout is data: where everything went
    # Each step is shown as the command a user would type.
    for command in ("$ sdtool bucket", "$ sdtool cache", "$ sdtool train", "$ sdtool convert"):
        assert command in proc.stderr
    metadata = json.loads((root / "meta.json").read_text())
    assert len(metadata) == 16 and all("train_resolution" in e for e in metadata.values())
    assert len(list((root / "meta.latents").glob("*.safetensors"))) == 16
    lines = [json.loads(line) for line in (root / "output" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 10, 20, 30]  # 4 held-out images, every 10 steps
    assert (root / "output" / "report.html").is_file()
    assert (root / "output" / "demo.safetensors").is_file()
    assert (root / "demo-diffusers" / "model_index.json").is_file()
    assert len(list((root / "output" / "sample").glob("*_grid.png"))) == 3
    assert Image.open(root / "sample.png").size == (128, 128)


def test_demo_refuses_a_folder_with_files(tmp_path, cli):
    (tmp_path / "keep.txt").write_text("mine")
    result = cli("demo", "--dir", tmp_path)
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_demo_overwrite_replaces_only_a_demo_folder(tmp_path, cli):
    from sdtool.demo.run import MARKER, prepare_folder

    (tmp_path / "keep.txt").write_text("mine")
    result = cli("demo", "--dir", tmp_path, "--overwrite")
    assert result.exit_code == 2 and "not written by sdtool demo" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"

    demo = tmp_path / "demo"
    prepare_folder(demo, overwrite=False)
    (demo / "old-output.txt").write_text("from the last demo")
    prepare_folder(demo, overwrite=True)
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]


def test_demo_refuses_a_file_as_its_folder(tmp_path, cli):
    target = tmp_path / "file"
    target.write_text("mine")
    result = cli("demo", "--dir", target)
    assert result.exit_code == 2 and "is not a folder" in result.stderr
    assert target.read_text() == "mine"
