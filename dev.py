#!/usr/bin/env python3
"""Set up sdtool's development environment when needed, then run the demo or the tests.

    python3 dev.py demo [sdtool demo options]   # set up if needed, then run the demo
    python3 dev.py test [pytest options]        # set up if needed, then ruff, mypy and the whole test suite
    python3 dev.py setup                        # only the set-up

Set-up (stdlib only, so it runs on a bare Python >= 3.11):
- the environment is the virtual environment this script runs in, if any; else `.venv` beside this file, created
  on first use (`SDTOOL_VENV` names another folder);
- torch is installed only when the environment has none, so a CUDA build already there is never replaced; where no
  NVIDIA GPU is visible the CPU build is installed, and `TORCH_SPEC` overrides the choice (e.g. `TORCH_SPEC=torch`
  for PyPI's default build, or `TORCH_SPEC="torch==2.13.0 --index-url https://…/cu128"`);
- sdtool is installed in editable mode with its `dev` extra, holding torch at the installed version;
- a stamp in the environment records what was installed; the next run skips every step unless pyproject.toml,
  this script or the interpreter changed (a run with nothing to do starts in well under a second).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"  # the release the test suite is run with
# PyTorch's own index of CPU-only wheels: on Linux and Windows, PyPI's `torch` is the multi-GB CUDA build.
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
STAMP = "sdtool-dev.stamp"
MIN_PYTHON = (3, 11)


def say(message: str) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kwargs) -> None:
    say("$ " + shlex.join(cmd))
    subprocess.run(cmd, check=True, **kwargs)


def env_dir() -> Path:
    """The environment to use: SDTOOL_VENV, else the active virtual environment, else ./.venv."""
    if os.environ.get("SDTOOL_VENV"):
        return Path(os.environ["SDTOOL_VENV"]).resolve()
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return ROOT / ".venv"


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def stamp_text(python: Path) -> str:
    digest = hashlib.sha256()
    for part in (ROOT / "pyproject.toml", Path(__file__)):
        digest.update(part.read_bytes())
    digest.update(str(ROOT).encode())
    version = subprocess.run(
        [str(python), "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    ).stdout
    digest.update(version.encode())
    return digest.hexdigest()


def has_nvidia_gpu() -> bool:
    if Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def installed_torch(python: Path) -> str | None:
    found = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"], capture_output=True, text=True
    )
    return found.stdout.strip() if found.returncode == 0 else None


def install_torch(python: Path) -> None:
    pip = [str(python), "-m", "pip", "install"]
    spec = os.environ.get("TORCH_SPEC")
    if spec:
        run([*pip, *shlex.split(spec)])
        return
    if has_nvidia_gpu() or platform.system() == "Darwin":
        run([*pip, f"torch=={TORCH_VERSION}"])  # PyPI's build: CUDA on Linux/Windows, Metal on macOS
        return
    cpu = f"torch=={TORCH_VERSION}+cpu"
    # Where pip's own configuration already finds the CPU wheel (a wheelhouse, a mirror), that is all it takes;
    # PyPI has no "+cpu" builds, so elsewhere this fails at once and PyTorch's CPU index supplies it.
    say(f"$ {shlex.join([*pip[1:], cpu])}")
    if subprocess.run([*pip, cpu], capture_output=True, text=True).returncode == 0:
        return
    run([*pip, cpu, "--extra-index-url", CPU_INDEX])


def setup() -> Path:
    """Create and fill the environment unless its stamp says it is up to date; return its Python."""
    if sys.version_info < MIN_PYTHON:
        sys.exit(
            f"dev.py: sdtool needs Python >= {'.'.join(map(str, MIN_PYTHON))}, this is {platform.python_version()}"
        )
    env = env_dir()
    python = env_python(env)
    if not python.exists():
        say(f"creating the virtual environment {env}")
        run([sys.executable, "-m", "venv", str(env)])
    stamp = env / STAMP
    wanted = stamp_text(python)
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    torch = installed_torch(python)
    if torch is None:
        install_torch(python)
        torch = installed_torch(python)
        if torch is None:
            sys.exit("dev.py: torch did not install; set TORCH_SPEC to the pip arguments for your platform")
    else:
        say(f"keeping the installed torch {torch}")
    # Hold torch where it is: another requirement must never swap the user's build for a different one.
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as hold:
        hold.write(f"torch=={torch}\n")
    try:
        run([str(python), "-m", "pip", "install", "--quiet", "-c", hold.name, "-e", f"{ROOT}[dev]"])
    finally:
        os.unlink(hold.name)
    stamp.write_text(wanted + "\n")
    say(f"environment ready: {env}")
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    python = setup()
    os.chdir(ROOT)
    if what == "setup":
        return 0
    if what == "demo":
        # The demo's own folder is replaced on a rerun (sdtool refuses any folder it did not make itself).
        extra = [] if "--dir" in rest or any(a.startswith("--dir=") for a in rest) else ["--overwrite"]
        return subprocess.run([str(python), "-m", "sdtool", "demo", *extra, *rest]).returncode
    if rest:  # `dev.py test -k name`: just those tests
        return subprocess.run([str(python), "-m", "pytest", *rest]).returncode
    failed = []
    for name, cmd in [
        ("ruff", [str(python), "-m", "ruff", "check", "."]),
        ("mypy", [str(python), "-m", "mypy", "sdtool"]),
        # -m "": every test, the `slow` ones too (pyproject's addopts leave them out of a plain `python -m pytest`)
        ("pytest", [str(python), "-m", "pytest", "-n", "2", "-m", "", "--durations=15"]),
    ]:
        say("$ " + shlex.join(cmd[1:]))
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
    if failed:
        say(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
