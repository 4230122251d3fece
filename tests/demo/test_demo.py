"""`sdtool demo` runs every step of the README's workflow end to end, offline, on CPU (CONTRACT §M)."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, run_sdtool

README = REPO_ROOT / "README.md"


def readme_workflow() -> list[list[str]]:
    """The `sdtool …` lines of the README's workflow script, as argument lists."""
    text = README.read_text(encoding="utf-8").split("## The workflow", 1)[1]
    script = text.split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in script.splitlines() if line.startswith("sdtool ")]


def readme_demo_outputs() -> set[str]:
    """The paths the README's demo section lists (the backticked names in its list of what the demo writes)."""
    text = README.read_text(encoding="utf-8").split("## The demo", 1)[1].split("\n## ", 1)[0]
    listing = text.split("It writes", 1)[1]
    items = [line for line in listing.splitlines() if line.startswith("- ")]
    return {name.rstrip("/") for line in items for name in re.findall(r"`([^`]+)`", line)}


@pytest.mark.slow
def test_demo_runs_every_step_of_the_readme_workflow(tmp_path):
    root = tmp_path / "demo"
    proc = run_sdtool("demo", "--dir", root, "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(root)  # stdout is data: where everything went
    assert "Traceback" not in proc.stderr
    assert not re.search(r"\w+Warning:|\[transformers\]|Failed to load|it/s\]", proc.stderr)  # no library noise

    # Each step of the README's workflow is shown as the command a user would type, with the same flags that matter
    # (the values differ: the demo's data and models are its own).
    shown = [shlex.split(line.split("$ ", 1)[1]) for line in proc.stderr.splitlines() if line.startswith("$ sdtool ")]
    for step in readme_workflow():
        flags = {a for a in step if a in ("--status", "--dry-run", "--flip-aug")}
        assert any(s[1] == step[0] and flags <= set(s) for s in shown), f"the demo skips: sdtool {shlex.join(step)}"
    assert "noise" in proc.stderr  # says that the tiny model's samples are noise by design

    metadata = json.loads((root / "meta.json").read_text())
    assert len(metadata) == 16
    assert all(e["caption"] and "tags" in e and "train_resolution" in e for e in metadata.values())
    assert len({tuple(e["train_resolution"]) for e in metadata.values()}) == 5  # every bucket of the demo's list
    assert len(list((root / "meta.latents").glob("*.safetensors"))) == 16
    lines = [json.loads(line) for line in (root / "output" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 10, 20, 30]  # 4 held-out images, every 10 steps
    assert (root / "output" / "report.html").is_file()
    assert (root / "output" / "demo.safetensors").is_file()
    assert (root / "demo-diffusers" / "model_index.json").is_file()
    assert len(list((root / "output" / "sample").glob("*_grid.png"))) == 3
    assert Image.open(root / "sample.png").size == (128, 128)

    # The README's list of what the demo writes is exactly what is there (no leftover folders such as final-sample/).
    from sdtool.demo.run import MARKER, OUTPUTS

    listed = readme_demo_outputs()
    assert listed == set(OUTPUTS.values())
    top = {p.name for p in root.iterdir()} - {MARKER}
    assert top == {path.split("/")[0] for path in listed}
    for path in listed:
        assert (root / path).exists(), path


def test_the_readme_opens_with_the_two_commands():
    """CONTRACT §M: the README's first code block, within its first screen, holds exactly the two commands."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("```"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    assert end < 60
    commands = [line.split("#", 1)[0].strip() for line in lines[start + 1 : end]]
    assert commands == ["python3 dev.py demo", "python3 dev.py test"]


def test_the_readme_workflow_config_and_prompts_are_valid(tmp_path):
    """The short config and prompts.txt beside the workflow script use real keys and kohya's prompt syntax."""
    import tomllib

    from sdtool.train.config.schema import SUBSET_KEYS, TOP_KEYS
    from sdtool.train.sample_prompts import read_sample_prompts

    text = README.read_text(encoding="utf-8").split("## The workflow", 1)[1].split("\n## ", 1)[0]
    config = tomllib.loads(text.split("```toml", 1)[1].split("```", 1)[0])
    assert set(config) - {"datasets"} <= TOP_KEYS
    assert {k for d in config["datasets"] for s in d["subsets"] for k in s} <= SUBSET_KEYS
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(text.split("```text", 1)[1].split("```", 1)[0])
    read = read_sample_prompts(prompts)
    assert [(p.width, p.height, p.seed) for p in read] == [(512, 512, 1), (512, 768, 2)]
    assert read[1].negative_prompt == "blurry, lowres"


def test_the_shipped_demo_tagger_is_what_its_builder_makes(tmp_path):
    """sdtool/demo/tagger/ holds the ONNX file `save_mean_tagger` builds from the weights in demo/data.py
    (shipped, because `onnx` is only a development dependency); SDTOOL_UPDATE_DEMO_TAGGER=1 rewrites it."""
    from sdtool.demo.data import TAGGER_DIR, TAGGER_SIZE, TAGGER_TAGS, tagger_weights
    from sdtool.label.tiny import save_mean_tagger, write_selected_tags

    weights, bias = tagger_weights()
    target = TAGGER_DIR if os.environ.get("SDTOOL_UPDATE_DEMO_TAGGER") == "1" else tmp_path
    save_mean_tagger(target / "model.onnx", weights=weights, bias=bias, size=TAGGER_SIZE)
    write_selected_tags(target / "selected_tags.csv", [(name, category) for name, category, _, _ in TAGGER_TAGS])
    for name in ("model.onnx", "selected_tags.csv"):
        assert (target / name).read_bytes() == (TAGGER_DIR / name).read_bytes(), name


def test_the_demo_images_fill_every_bucket():
    from sdtool.bucket.algorithm import BucketSettings, select_bucket
    from sdtool.demo.data import DEMO_SIZES
    from sdtool.demo.run import DEMO_RESOLUTION

    settings = BucketSettings((DEMO_RESOLUTION, DEMO_RESOLUTION), 64, 256, 64, False)
    buckets = {select_bucket(w, h, settings).bucket for w, h in DEMO_SIZES}
    assert buckets == set(settings.resolutions)


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


@pytest.mark.slow
def test_the_sdxl_demo_trains_a_tiny_sdxl_model_on_cached_text_encoder_outputs(tmp_path):
    root = tmp_path / "demo"
    proc = run_sdtool("demo", "--sdxl", "--dir", root, "--device", "cpu", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    shown = [line.split("$ ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("$ sdtool ")]
    assert any("--text-encoder-outputs" in s and "--status" not in s for s in shown)
    assert "model " in proc.stderr and "SDXL, epsilon prediction" in proc.stderr

    config = (root / "config.toml").read_text()
    assert "cache_text_encoder_outputs = true" in config and "shuffle_caption" not in config.split("#", 1)[0]
    assert list((root / "meta.text").rglob("*.safetensors"))  # the outputs training read, on disk
    lines = [json.loads(line) for line in (root / "output" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 10, 20, 30]  # held-out images, on cached text too
    index = json.loads((root / "demo-diffusers" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    assert Image.open(root / "sample.png").size == (128, 128)

    from sdtool.demo.run import DEMO_MODELS, MARKER, OUTPUTS

    top = {p.name for p in root.iterdir()} - {MARKER}
    assert top == {path.split("/")[0] for path in {**OUTPUTS, **DEMO_MODELS["sdxl"].extra_outputs}.values()}
