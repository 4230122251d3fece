"""The app's shape: help, version, global flags, exit codes, error lines, fast start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdtool import __version__
from tests.conftest import REPO_ROOT, run_sdtool

COMMANDS = ["caption", "tag", "bucket", "cache", "train", "convert", "doctor", "demo"]

# Flags each command's --help must show (CONTRACT §A, §E, §F, §H, §J, §K, §M).
CONTRACT_FLAGS = {
    "caption": [
        "--model",
        "--num-beams",
        "--top-p",
        "--max-length",
        "--min-length",
        "--prompt",
        "--seed",
        "--caption-extension",
        "--batch-size",
        "--workers",
        "--overwrite",
        "--recursive",
        "--json",
        "--precision",
        "--device",
        "--strict",
    ],
    "tag": [
        "--model",
        "--threshold",
        "--general-threshold",
        "--character-threshold",
        "--use-rating-tags",
        "--character-tags-first",
        "--remove-underscore",
        "--undesired-tags",
        "--always-first-tags",
        "--tag-separator",
        "--append",
        "--output-path",
        "--frequency",
        "--recursive",
        "--json",
        "--strict",
    ],
    "bucket": [
        "--output",
        "--resolution",
        "--min-bucket-reso",
        "--max-bucket-reso",
        "--bucket-reso-steps",
        "--no-upscale",
        "--recursive",
        "--caption-extension",
        "--tags-extension",
        "--relative",
        "--update",
        "--json",
        "--workers",
        "--strict",
    ],
    "cache": [
        "--model",
        "--image-dir",
        "--vae",
        "--batch-size",
        "--flip-aug",
        "--precision",
        "--device",
        "--workers",
        "--resize-interpolation",
        "--format",
        "--cache-dir",
        "--overwrite",
        "--status",
        "--json",
        "--strict",
    ],
    "train": ["--set", "--dry-run", "--print-config", "--num-processes"],
    "convert": ["--to", "--precision", "--model-type", "--prediction", "--vae", "--config", "--allow-pickle"],
    "doctor": ["--json"],
    "demo": ["--dir", "--device"],
}


def test_root_help_lists_every_command(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_shows_contract_flags(cli, name):
    result = cli(name, "--help", env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    for flag in CONTRACT_FLAGS[name]:
        assert flag in result.stdout, f"{name} --help lacks {flag}"


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"sdtool {__version__}"


def test_usage_error_exits_2(cli):
    result = cli("bucket", "/nonexistent", "--bogus-flag")
    assert result.exit_code == 2
    assert "--bogus-flag" in result.stderr


def test_bad_device_is_usage_error(cli):
    result = cli("demo", "--device", "gpu7")
    assert result.exit_code == 2


def test_verbose_and_quiet_exclude_each_other(cli):
    result = cli("-v", "-q", "doctor")
    assert result.exit_code == 2


def test_python_m_names_itself_sdtool():
    proc = run_sdtool("--help")
    assert proc.returncode == 0
    assert "Usage: sdtool" in proc.stdout


def test_error_is_one_line_without_traceback_and_with_it_under_debug(tmp_path):
    # A failing command must print one `error:` line; -v adds the traceback.
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    proc = run_sdtool("convert", str(junk), str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    proc = run_sdtool("convert", str(junk), str(tmp_path / "out"), env={"SDTOOL_DEBUG": "1"})
    assert "Traceback" in proc.stderr


def test_cli_import_does_not_pull_heavy_packages():
    code = (
        "import sys, sdtool.cli, sdtool.console, sdtool.errors, sdtool.images;"
        "heavy=[m for m in ('torch','diffusers','transformers','accelerate','onnxruntime','matplotlib')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_doctor_json_on_this_machine():
    proc = run_sdtool("doctor", "--json")
    report = json.loads(proc.stdout)
    names = {c["name"]: c for c in report["checks"]}
    for required in ("python", "packages", "cpu", "bitsandbytes", "onnxruntime", "accelerate"):
        assert required in names
    for c in report["checks"]:
        assert set(c) == {"name", "status", "detail"}
        assert c["status"] in ("ok", "warn", "fail")
    import torch

    if not torch.cuda.is_available():
        assert names["cuda"]["status"] == "warn"
        assert proc.returncode == 0, proc.stderr
    assert names["cpu"]["status"] == "ok"
    assert "sdtool doctor" in proc.stderr  # the table is for people: stderr
