"""`sdtool report`: the page from a run's output folder, the curves' PNG, the CLI, and the page in a real browser."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtool.report import write_report
from tests.report.browser import REPORT_PROBE, find_chromium, view_page
from tests.train.conftest import dataset_toml, make_dataset, write_config

PROMPTS = ["a red circle on a white background", "a blue square <b>not bold</b> & stripes"]


def sample_png(path: Path, record: dict, color: tuple[int, int, int], size: int = 96) -> Path:
    """A sample image as sdtool's sampling writes them: a PNG whose `sdtool` text chunk holds its settings."""
    info = PngInfo()
    info.add_text("sdtool", json.dumps(record))
    Image.new("RGB", (size, size), color).save(path, pnginfo=info)
    return path


def make_run(root: Path, steps: int = 30, every: int = 10, samples: bool = True) -> Path:
    """An output folder as a run with validation and samples leaves it: metrics.jsonl, run.json, sample/."""
    from sdtool.train.config import load_config
    from sdtool.train.plan import make_plan, write_run_record

    images, meta = make_dataset(root / "data", 8)
    out = root / "out"
    out.mkdir(parents=True)
    text = f'pretrained_model_name_or_path = "{root}"\noutput_dir = "{out}"\noutput_name = "cat"\nseed = 3\n'
    text += "validation_split = 0.25\nvalidate_every_n_steps = 10\n" + dataset_toml(meta, images, batch_size=2)
    cfg = load_config(write_config(root / "c.toml", text), [])
    write_run_record(out, cfg, make_plan(cfg))
    lines = []
    for step in range(0, steps + 1):
        if step:
            loss = 0.5 / (1 + step / 10) + 0.05 * ((step * 7) % 5) / 5
            lines.append({"step": step, "epoch": 1 + step // 4, "loss": loss, "lr": {"unet": 1e-4 * min(1, step / 5)}})
            lines[-1] |= {"timestep_mean": 500.0, "seconds": 0.5}
        if step % every == 0:
            by_t = {str(t): 0.3 + t / 4000 - step / 100 + (step / 50) ** 2 for t in (200, 400, 600, 800)}
            mean = sum(by_t.values()) / 4
            lines.append({"step": step, "epoch": step // 4, "val_loss": mean, "val_loss_by_t": by_t, "val_images": 2})
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if samples:
        folder = out / "sample"
        folder.mkdir()
        for step in (0, 10, 20, 30):
            names = []
            for i, prompt in enumerate(PROMPTS):
                name = f"cat_{step:06d}_{i:02d}_{i + 1}.png"
                sample_png(folder / name, {"prompt": prompt, "step": step}, (step * 8, 100 + 50 * i, 40))
                names.append(name)
            sample_png(
                folder / f"cat_{step:06d}_grid.png", {"step": step, "epoch": step // 4, "samples": names}, (0, 0, 0)
            )
    (out / "cat.safetensors").write_bytes(b"")
    (out / "cat-best.safetensors").write_bytes(b"")
    return out


def test_report_shows_the_run_in_one_self_contained_page(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path)
    files = write_report(out)
    assert files.html == out / "report.html" and files.png == out / "report-loss.png" and files.note is None
    html = files.html.read_text(encoding="utf-8")
    # Self-contained: nothing to fetch (no URL in any src/href but the samples' own files), no script.
    assert not re.search(r"""(src|href)=["'](https?:|//)""", html) and "<script" not in html
    assert "default-src 'none'" in html  # and the browser is told to load nothing at all
    assert html.count("<svg") == 1 and html.count('src="data:image/') == 8  # curves + 2 prompts × 4 points
    for heading in ("Summary", "Curves", "Validation", "Samples", "Bucket plan", "Config", "Files"):
        assert f"<h2>{heading}</h2>" in html
    # The lowest validation loss (the curve above bottoms out at step 10) is named and highlighted.
    assert "best validation loss" in html and "@ step 10" in html
    assert re.search(r'<tr class="best"><td>10</td>', html)
    assert "lowest validation loss" in html  # beside cat-best.safetensors in the file list
    # Held-out images and config come from run.json; text from files is escaped, never markup.
    assert "validation_split 0.25, seed 3" in html and "validation_split = 0.25" in html
    assert "&lt;b&gt;not bold&lt;/b&gt; &amp; stripes" in html and "<b>not bold" not in html
    assert 'href="sample/cat_000030_01_2.png"' in html
    with Image.open(files.png) as png:
        assert png.format == "PNG" and png.width >= 800
    # Three panels (loss, validation per timestep, learning rate), the curves drawn as paths.
    svg = re.search(r"<svg.*</svg>", html, re.S).group(0)
    assert svg.count('<g id="axes_') == 3 and svg.count("<path") > 100


def test_report_of_a_run_that_has_not_stepped_yet_or_lost_a_line(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path, samples=False)
    (out / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "val_loss": 0.4, "val_loss_by_t": {"200": 0.4}}\n{"st')
    files = write_report(out)
    html = files.html.read_text(encoding="utf-8")
    assert "metrics.jsonl line 2: not JSON" in html and "<svg" in html and "Samples" not in html


def test_without_matplotlib_the_report_says_why_the_curves_are_missing(tmp_path, monkeypatch, capsys):
    out = make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError, as when not installed
    files = write_report(out)
    assert files.png is None and not (out / "report-loss.png").exists()
    html = files.html.read_text(encoding="utf-8")
    assert "The curves need matplotlib" in html and "pip install matplotlib" in html
    assert "<h2>Samples</h2>" in html and "<h2>Validation</h2>" in html  # everything else is there
    assert "report without curves" in capsys.readouterr().err


def test_report_command(cli, tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path, samples=False)
    result = cli("report", out, "-o", tmp_path / "shared" / "run.html")  # its folder is made
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(tmp_path / "shared" / "run.html"),
        str(tmp_path / "shared" / "run-loss.png"),
    ]
    result = cli("report", out)
    assert result.stdout.splitlines() == [str(out / "report.html"), str(out / "report-loss.png")]
    again = cli("report", out)  # the run's own report is the run's: rewritten without --overwrite
    assert again.exit_code == 0, again.stderr


def test_report_output_never_replaces_a_file_unless_told(cli, tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path, samples=False)
    page = tmp_path / "notes.html"
    page.write_text("my notes")
    refused = cli("report", out, "-o", page)
    assert refused.exit_code == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert page.read_text() == "my notes"
    assert cli("report", out, "-o", page, "--overwrite").exit_code == 0
    assert "<html" in page.read_text()
    # Never over what the report reads, whatever the flags; never a non-HTML name.
    for target in (out / "metrics.jsonl", out / "run.json"):
        before = target.read_bytes()
        result = cli("report", out, "-o", target, "--overwrite")
        assert result.exit_code == 2 and result.stderr.startswith("error: "), result.stderr
        assert target.read_bytes() == before
    assert cli("report", out, "-o", tmp_path / "page.png").exit_code == 2


def test_report_command_refuses_what_is_not_a_run(cli, tmp_path):
    result = cli("report", tmp_path / "missing")
    assert (
        result.exit_code == 2 and "does not exist" in result.stderr and "output_dir of a training run" in result.stderr
    )
    (tmp_path / "metrics.jsonl").write_text("")
    result = cli("report", tmp_path / "metrics.jsonl")  # the file instead of its folder: the folder is the hint
    assert result.exit_code == 2 and f"{tmp_path}?" in result.stderr
    (tmp_path / "metrics.jsonl").unlink()
    result = cli("report", tmp_path)
    assert result.exit_code == 2 and "no metrics.jsonl or run.json" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(find_chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_the_page_in_a_real_headless_browser(tmp_path):
    pytest.importorskip("matplotlib")
    out = make_run(tmp_path)
    page = write_report(out).html
    seen = view_page(page, REPORT_PROBE, tmp_path / "profile")
    assert seen.errors == [], seen.errors
    probe = seen.probe
    assert len(probe["images"]) == 8 and all(i["complete"] and i["width"] == 96 for i in probe["images"])
    assert probe["svgPaths"] > 50 and probe["svgWidth"] > 800  # the curves are drawn, at the page's width
    assert probe["sampleColumns"] == 5 and probe["scripts"] == 0
    assert probe["headings"] == ["Summary", "Curves", "Validation", "Samples", "Bucket plan", "Config", "Files"]
    with Image.open(__import__("io").BytesIO(seen.screenshot)) as shot:
        assert shot.width == 1280 and shot.height > 1500
        colors = shot.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 200  # curves, samples and text, not a blank page
