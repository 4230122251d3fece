"""Signals from schedulers and from people (CONTRACT §I; docs/promises.md).

systemd, Slurm's `scancel` and `kill -TERM -PGID` signal every process of the job, DataLoader workers included; a
person presses Ctrl-C (SIGINT to the terminal's process group). Whatever the moment, the run stops after a whole
step with a state saved and exit 130, or, when the signal lands during the final save, finishes that save first.
A state resumed from such a stop ends with the uninterrupted run's weights, bit for bit.

Each run starts in its own process group, as a job under a scheduler does, and the signal goes to the whole group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtool.fsutil import leftover_temp_files
from sdtool.runtime import usable_cpus
from tests.conftest import REPO_ROOT
from tests.train.conftest import write_train_config

pytestmark = pytest.mark.slow

TRAIN = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 5
learning_rate = 1e-3
optimizer_type = "AdamW"
{extra}
"""


def config(tmp_path: Path, model: Path, name: str, steps: int, extra: str = "", images: int = 6) -> Path:
    return write_train_config(tmp_path, name, TRAIN, images, model=model, steps=steps, extra=extra)


def start(config_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sdtool", "train", str(config_path), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a job of its own: the signal goes to the main process and its workers alike
    )


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120, poll: float = 0.005) -> bool:
    """Wait for `condition`; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)
    return True


def finish(proc: subprocess.Popen) -> str:
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return stderr


def worker_pids(pid: int) -> list[int]:
    """The DataLoader workers: the training process's children (psutil comes with accelerate)."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def metric_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def states(out: Path) -> list[Path]:
    return sorted(out.glob("m-step*-state"))


def assert_same(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:3]


def check_stopped(proc_stderr: str, code: int) -> None:
    assert code == 130, proc_stderr
    assert "unexpected" not in proc_stderr and "Traceback" not in proc_stderr, proc_stderr


@pytest.mark.parametrize("persistent", [True, False])
def test_sigterm_to_the_whole_process_group_saves_a_state_and_exits_130(tmp_path, tiny_v1, persistent):
    """Before: the workers died of the SIGTERM and the run ended with `unexpected ConnectionResetError`/RuntimeError,
    exit 1, no state."""
    extra = f"max_data_loader_n_workers = 2\npersistent_data_loader_workers = {str(persistent).lower()}"
    cfg = config(tmp_path, tiny_v1, "out", 400, extra)
    out = tmp_path / "out"
    proc = start(cfg)
    workers = min(2, usable_cpus())  # training starts no more workers than the cores it may use (as kohya)
    assert wait_until(lambda: metric_lines(out) >= 2 and len(worker_pids(proc.pid)) == workers, proc), finish(proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stderr = finish(proc)
    check_stopped(stderr, proc.returncode)
    (state,) = states(out)
    step = json.loads((state / "sdtool_state.json").read_text())["train_state"]["global_step"]
    assert f"stopped by SIGTERM after step {step}" in stderr
    assert f"--set resume={state}" in " ".join(stderr.split())  # the command to resume
    assert leftover_temp_files(out) == []
    assert not (out / "m.safetensors").exists()


def test_a_worker_killed_after_the_stop_request_is_the_stop_and_the_resume_is_exact(tmp_path, tiny_v1):
    """A scheduler's grace period ends and the workers are killed while the main process still needs batches for
    the step it is finishing (gradient accumulation over the whole epoch): the run goes back to its last whole
    step, saves a state there and exits 130; resuming from it gives the uninterrupted run's weights exactly."""
    extra = "max_data_loader_n_workers = 2\npersistent_data_loader_workers = true\ngradient_accumulation_steps = 24"
    full = start(config(tmp_path, tiny_v1, "full", 4, extra, images=24))
    assert full.wait(timeout=300) == 0, finish(full)

    cfg = config(tmp_path, tiny_v1, "out", 4, extra, images=24)
    out = tmp_path / "out"
    proc = start(cfg)
    # metrics.jsonl gets step 1's line when step 2 ends: then the run is in step 3, which needs 24 batches.
    assert wait_until(lambda: metric_lines(out) >= 1, proc), finish(proc)
    time.sleep(0.3)
    workers = worker_pids(proc.pid)
    assert workers
    os.killpg(proc.pid, signal.SIGTERM)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    stderr = finish(proc)
    check_stopped(stderr, proc.returncode)
    latest = states(out)[-1]
    saved = json.loads((latest / "sdtool_state.json").read_text())["train_state"]
    assert saved["batch_in_epoch"] == 0, saved  # a whole step: the half-accumulated one was dropped
    assert f"state saved to {latest}" in " ".join(stderr.split())

    resumed = start(cfg, "--set", f"resume={latest}")
    stderr = finish(resumed)
    assert resumed.returncode == 0, stderr
    assert_same(out / "m.safetensors", tmp_path / "full" / "m.safetensors")


def _temps(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")] if out.exists() else []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_final_save_lets_it_finish_then_exits_130(tmp_path, tiny_v1, signum):
    """Before: no model, no state and a stray `.tmp` (SIGTERM killed the process mid-write; SIGINT raised inside
    it). The final model (a diffusers folder, the slowest kind of save) is being written when the signal comes."""
    extra = 'max_data_loader_n_workers = 0\nsave_model_as = "diffusers"\nsave_state_on_train_end = true'
    out = tmp_path / "out"
    for attempt in range(5):
        cfg = config(tmp_path, tiny_v1, f"out{attempt}", 2, extra)
        out = tmp_path / f"out{attempt}"
        proc = start(cfg)
        landed = wait_until(lambda out=out: any(p.name.startswith(".m.") for p in _temps(out)), proc, poll=0.001)
        if landed:
            os.killpg(proc.pid, signum)
        stderr = finish(proc)
        if landed and proc.returncode != 0:
            break
    else:
        pytest.skip("the signal never landed during the final save (the machine was too fast)")
    check_stopped(stderr, proc.returncode)
    assert "after the final save" in stderr, stderr
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(out / "m", subfolder="unet")  # whole and loadable
    assert json.loads((out / "m-state" / "sdtool_state.json").read_text())["train_state"]["global_step"] == 2
    assert leftover_temp_files(out) == []
