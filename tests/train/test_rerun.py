"""Running `sdtool train CONFIG` again (CONTRACT §B: rerunning continues where it stopped): an interrupted run
continues from its newest state, a finished run is left as it is, a stopped run prints a command that works when
pasted, and progress reaches a log file line by line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtool.errors import ConfigError
from sdtool.train.checkpoints import config_record, model_identity
from sdtool.train.config import load_config
from sdtool.train.outputs import STATE_FILE
from sdtool.train.rerun import decide_start, rerun_command, state_folders
from tests.conftest import REPO_ROOT
from tests.train.conftest import write_train_config

CONFIG = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 5
max_data_loader_n_workers = 0
learning_rate = 1e-3
optimizer_type = "AdamW"
{extra}
"""
# A title with both quote kinds and a space: the printed command must quote it for the shell.
TITLE = """it's a "quoted" title"""


def config(tmp_path: Path, model: Path, name: str, steps: int = 4, extra: str = "") -> Path:
    return write_train_config(tmp_path, name, CONFIG, 3, model=model, steps=steps, extra=extra)


# ------------------------------------------------------------------------------------------- deciding, no training
def fake_state(cfg, name: str, step: int, **changes) -> Path:
    """A state folder whose record says it was saved by `cfg` (with `changes`) at `step`."""
    folder = Path(cfg.train.output_dir) / name
    folder.mkdir(parents=True)
    record = config_record(cfg)
    record.update(changes)
    state = {"format": 1, "train_state": {"global_step": step}, "config": record, "ema": False}
    state["model"] = model_identity(cfg.train.pretrained_model_name_or_path)
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def test_a_fresh_run_starts_and_a_finished_one_is_left_alone(tmp_path, tiny_v1):
    cfg = load_config(config(tmp_path, tiny_v1, "out"))
    assert decide_start(cfg).action == "start"
    Path(cfg.train.output_dir).mkdir()
    (Path(cfg.train.output_dir) / "m.safetensors").write_bytes(b"done")
    start = decide_start(cfg)
    assert start.action == "finished" and "this run is finished" in start.reason and "--overwrite" in start.reason
    cfg.train.overwrite = True
    assert decide_start(cfg).action == "start"


def test_an_interrupted_run_continues_from_its_newest_state(tmp_path, tiny_v1):
    cfg = load_config(config(tmp_path, tiny_v1, "out"))
    old = fake_state(cfg, "m-step00000008-state", 8)
    new = fake_state(cfg, "m-step00000002-state", 2)  # written later, e.g. by an overwrite run: newest wins
    hour_ago = time.time() - 3600  # set, not slept: file systems keep mtimes at different resolutions
    os.utime(old / STATE_FILE, (hour_ago, hour_ago))
    fake_state(cfg, "other-step00000009-state", 9)  # another output name: not this run's
    (Path(cfg.train.output_dir) / ".m-step00000003-state.partial").mkdir()  # a save cut short: never a state
    assert state_folders(cfg.train) == [new, old]
    start = decide_start(cfg)
    assert start.action == "resume" and start.state == new and str(new) in start.reason


def test_a_state_saved_with_another_config_or_model_is_not_continued_by_itself(tmp_path, tiny_v1):
    cfg = load_config(config(tmp_path, tiny_v1, "out"))
    state = fake_state(cfg, "m-step00000002-state", 2, learning_rate=5e-4)
    with pytest.raises(ConfigError) as info:
        decide_start(cfg)
    assert "learning_rate: 0.0005 in the state, 0.001 now" in str(info.value)
    assert "--overwrite" in str(info.value.hint) and f"--set resume={state}" in str(info.value.hint)
    # Named explicitly, the same state continues (with a warning, from the recipe).
    cfg.train.resume = str(state)
    assert decide_start(cfg).action == "resume"

    record = json.loads((state / STATE_FILE).read_text())
    record["config"]["learning_rate"] = 1e-3
    record["model"] = {"unet/diffusion_pytorch_model.safetensors": "0" * 32}
    (state / STATE_FILE).write_text(json.dumps(record))
    cfg.train.resume = None
    with pytest.raises(ConfigError, match="the model's weights changed"):
        decide_start(cfg)


def test_metrics_without_a_state_start_again_and_latest_asks_for_the_newest_state(tmp_path, tiny_v1):
    cfg = load_config(config(tmp_path, tiny_v1, "out", extra='resume = "latest"'))
    assert cfg.train.resume == "latest"
    start = decide_start(cfg)
    assert start.action == "start" and "no state folder yet" in start.reason
    Path(cfg.train.output_dir).mkdir()
    (Path(cfg.train.output_dir) / "metrics.jsonl").write_text('{"step": 1}\n')
    start = decide_start(cfg)
    assert start.action == "start" and start.warning and "replacing" in start.reason
    state = fake_state(cfg, "m-state", 4)
    assert decide_start(cfg).state == state


def test_a_named_state_does_not_replace_a_finished_model_without_overwrite(tmp_path, tiny_v1):
    cfg = load_config(config(tmp_path, tiny_v1, "out"))
    state = fake_state(cfg, "m-state", 4)
    (Path(cfg.train.output_dir) / "m.safetensors").write_bytes(b"done")
    cfg.train.resume = str(state)
    with pytest.raises(ConfigError, match="already exists"):
        decide_start(cfg)
    cfg.train.overwrite = True
    assert decide_start(cfg).action == "resume"


def test_the_rerun_command_keeps_everything_but_resume():
    argv = ["sdtool", "train", "c.toml", "--set", "lr=1", "--set", "resume=old", "--set=resume=x", "--overwrite"]
    assert rerun_command(argv) == ["sdtool", "train", "c.toml", "--set", "lr=1", "--overwrite"]


# ----------------------------------------------------------------------------------------------- real runs
def sdtool_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_train(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """`sdtool train …` as a shell starts it, with stderr to a log file (not a terminal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sdtool", "train", *args],
        cwd=cwd,
        env=sdtool_env(),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )


def steps_done(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def interrupt_after(proc: subprocess.Popen, out: Path, steps: int, times: int = 1) -> None:
    """Ctrl-C (SIGINT) once `steps` metrics lines are written; `times` signals in a row."""
    deadline = time.monotonic() + 300
    while steps_done(out) < steps:
        assert proc.poll() is None, f"training ended (exit {proc.returncode}) before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    for _ in range(times):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
    proc.wait(120)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:5]


STEPS = 40  # long enough that a Ctrl-C lands mid-run on a fast machine, short on a slow one


@pytest.mark.slow
def test_ctrl_c_then_the_same_command_resumes_and_ends_equal_to_an_uninterrupted_run(cli, tmp_path, tiny_v1):
    reference = cli("train", config(tmp_path, tiny_v1, "full", STEPS), "--set", f"metadata_title={TITLE}")
    assert reference.exit_code == 0, reference.stderr

    cfg = config(tmp_path, tiny_v1, "run", STEPS)
    args = [cfg.name, "--set", f"metadata_title={TITLE}"]  # relative, as a person types it in the config's folder
    out = tmp_path / "run"

    # 1. Ctrl-C: the step finishes, a state is saved, exit 130 and the command that continues the run.
    proc = start_train(args, tmp_path, tmp_path / "first.log")
    interrupt_after(proc, out, 3)
    first = (tmp_path / "first.log").read_text()
    assert proc.returncode == 130, first
    (state,) = state_folders(load_config(cfg).train)
    stopped_at = int(re.search(r"after step (\d+)", first)[1])
    assert state.name == f"m-step{stopped_at:08d}-state" and stopped_at < STEPS
    assert "Traceback" not in first

    # 2. The same command again: it continues from that state (and is stopped once more, to test the paste below).
    proc = start_train(args, tmp_path, tmp_path / "second.log")
    interrupt_after(proc, out, stopped_at + 3)
    second = (tmp_path / "second.log").read_text()
    assert proc.returncode == 130, second
    assert f"this run was interrupted: continuing from {state}" in second
    assert f"resumed from {state} at step {stopped_at} of {STEPS}" in second

    # 3. The command it printed, pasted into a shell as it is (only `sdtool` spelt as this interpreter's module).
    printed = " ".join(second.split()).split("continue with: ", 1)[1].rsplit(")", 1)[0]
    assert printed.startswith("sdtool train run.toml --set ")
    assert f"--set {shlex.quote(f'metadata_title={TITLE}')}" in printed  # the run's own --set, quoted
    pasted = f"{shlex.quote(sys.executable)} -m {printed}"
    done = subprocess.run(["bash", "-c", pasted], cwd=tmp_path, env=sdtool_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out / "m.safetensors")

    # Equal to the run that was never stopped, bit for bit, with one metrics line per step.
    assert_same_weights(tmp_path / "full" / "m.safetensors", out / "m.safetensors")
    drop = {"seconds", "save_seconds", "sample_seconds"}
    clean = [[{k: v for k, v in r.items() if k not in drop} for r in metrics(o)] for o in (tmp_path / "full", out)]
    assert [r["step"] for r in clean[1]] == list(range(1, STEPS + 1))
    assert clean[0] == clean[1]

    # 4. Once more: the run is finished; nothing is retrained.
    before = (out / "m.safetensors").read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "sdtool", "train", *args], cwd=tmp_path, env=sdtool_env(), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "this run is finished" in again.stderr and (out / "m.safetensors").read_bytes() == before


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, tiny_v1):
    cfg = config(tmp_path, tiny_v1, "run", 400)
    proc = start_train([cfg.name], tmp_path, tmp_path / "log")
    interrupt_after(proc, tmp_path / "run", 2, times=2)
    log = (tmp_path / "log").read_text()
    assert proc.returncode == 130, log
    assert "Traceback" not in log and "error: interrupted" in log


@pytest.mark.slow
def test_progress_reaches_a_log_file_as_lines_and_metrics_time_the_step_alone(tmp_path, tiny_v1):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat --w 64 --h 64 --s 2 --d 1\n")
    extra = f'sample_prompts = "{prompts}"\nsample_every_n_steps = 2\nsave_every_n_steps = 2\nsave_state = true'
    cfg = config(tmp_path, tiny_v1, "run", 4, extra)
    log = tmp_path / "log"
    # `sdtool train cfg.toml 2> log`: stderr is a file, not a terminal.
    done = subprocess.run(
        ["bash", "-c", f"{shlex.quote(sys.executable)} -m sdtool train {cfg.name} 2> log"],
        cwd=tmp_path,
        env=sdtool_env(),
        capture_output=True,
        text=True,
    )
    text = log.read_text()
    assert done.returncode == 0, text
    step_lines = [line for line in text.splitlines() if re.match(r"train: \d+/4 steps, loss \d", line)]
    assert step_lines and step_lines[-1].startswith("train: 4/4 steps"), text
    assert all("steps/s" in line or "s per step" in line for line in step_lines)
    # No bar drawn for a terminal that is not there (tables may use box characters; a bar's line is "train ━━━…").
    assert b"\r" not in log.read_bytes() and not re.search(r"train\s+━", text)

    records = metrics(tmp_path / "run")
    assert all(r["seconds"] > 0 for r in records)
    # Step 2 saved and sampled; its own time excludes both, which have fields of their own.
    assert records[1]["save_seconds"] > 0 and records[1]["sample_seconds"] > 0
    assert "save_seconds" not in records[0] and "sample_seconds" not in records[0]
