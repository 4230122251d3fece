"""dev.py, the one-command set-up: which environment it uses, when it reinstalls, and that it keeps a torch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dev():
    spec = importlib.util.spec_from_file_location("dev_script", REPO / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_environment_choice(dev, monkeypatch, tmp_path):
    monkeypatch.setenv("SDTOOL_VENV", str(tmp_path / "elsewhere"))
    assert dev.env_dir() == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv("SDTOOL_VENV")
    # Run from inside a virtual environment (as the suite is): that one is used, not a new .venv.
    monkeypatch.setattr(sys, "prefix", "/some/venv")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert dev.env_dir() == Path("/some/venv")
    monkeypatch.setattr(sys, "prefix", "/usr")
    assert dev.env_dir() == REPO / ".venv"


def test_stamp_changes_with_the_project_and_not_otherwise(dev, tmp_path, monkeypatch):
    copy = tmp_path / "repo"
    copy.mkdir()
    (copy / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    monkeypatch.setattr(dev, "ROOT", copy)
    python = Path(sys.executable)
    first = dev.stamp_text(python)
    assert dev.stamp_text(python) == first
    (copy / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + "\n# a new dependency\n")
    assert dev.stamp_text(python) != first


def test_an_installed_torch_is_found_and_kept(dev):
    found = dev.installed_torch(Path(sys.executable))
    import torch

    assert found == torch.__version__  # the suite's own torch: setup would hold it, never replace it
