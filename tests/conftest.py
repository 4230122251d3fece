"""Shared fixtures: tiny SD-shaped models built offline, generated images, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Rendering does not depend on the terminal the suite runs in: rich reads COLUMNS once, when a console is made,
# and tables wrap their headers at the width they get. Tests that check narrow output make their own console.
os.environ["COLUMNS"] = "200"
os.environ.pop("LINES", None)

# Nothing in the tests may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Under `pytest -n N` every worker gets one compute thread: N workers × all-core torch pools would fight for the
# same cores and make the run slower, not faster. (Read by torch when it is first imported.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory) -> Path:
    """A tiny SD-1.x-shaped diffusers folder: EOS padding, epsilon prediction."""
    from sdtool.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-v1", "v1")


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory) -> Path:
    """A tiny SD-2.x-768-v-shaped diffusers folder: '!' padding, linear projection, v-prediction."""
    from sdtool.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-v2", "v2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped diffusers folder: two text encoders, `text_time` micro-conditioning, epsilon."""
    from sdtool.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sdxl", "sdxl")


@pytest.fixture
def cli():
    """Invoke the Typer app in-process; stdout and stderr stay separate."""
    from typer.testing import CliRunner

    from sdtool.cli import app

    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return invoke


def run_sdtool(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600):
    """Run `python -m sdtool …` in a subprocess, the way a user's shell does."""
    # The repository first; anything already on PYTHONPATH stays importable after it.
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sdtool", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def sdtool_proc():
    return run_sdtool


def pytest_configure(config):
    from sdtool.runtime import quiet_third_party

    quiet_third_party()
