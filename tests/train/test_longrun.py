"""Long runs on the tiny model (CPU): periodic saves and pruning, exact resume after kill -9, samples, TensorBoard,
EMA, and the guards (non-finite loss, SIGTERM)."""

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

from tests.conftest import REPO_ROOT
from tests.train.conftest import run_outputs, write_train_config

CONFIG = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 7
max_data_loader_n_workers = 0
learning_rate = 1e-3
optimizer_type = "AdamW"
gradient_accumulation_steps = 2
{extra}

[general]
flip_aug = true
shuffle_caption = true
caption_tag_dropout_rate = 0.2
"""
# 3 images (two 64x64, one 64x128) at batch size 1 and accumulation 2: 3 batches, 2 optimizer steps per epoch
# (accelerate syncs on the epoch's last batch), so odd steps end mid-epoch.


def config(tmp_path: Path, model: Path, out: str, steps: int, extra: str = "") -> Path:
    return write_train_config(tmp_path, out, CONFIG, 3, model=model, steps=steps, extra=extra)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_seconds(records: list[dict]) -> list[dict]:
    """The records without their timings (`seconds`, `save_seconds`, `sample_seconds`), which differ run to run."""
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def popen_train(config_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sdtool", "train", str(config_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) too early:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.slow
def test_killed_run_resumed_from_its_state_equals_the_uninterrupted_run(cli, tmp_path, tiny_v1):
    extra = "save_every_n_steps = 3\nsave_state = true\nuse_ema = true\nema_decay = 0.9"
    full = cli("train", config(tmp_path, tiny_v1, "full", 6, extra))
    assert full.exit_code == 0, full.stderr

    # kill -9 right after the step-3 state (mid-epoch) is in place
    killed_cfg = config(tmp_path, tiny_v1, "killed", 6, extra)
    state = tmp_path / "killed" / "m-step00000003-state"
    proc = popen_train(killed_cfg)
    try:
        wait_for(state.exists, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "m.safetensors").exists()
    saved = json.loads((state / "sdtool_state.json").read_text())["train_state"]
    assert saved == {"seed": 7, "global_step": 3, "epoch": 1, "batch_in_epoch": 2}

    resumed = cli("train", killed_cfg, "--set", f"resume={state}")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr
    assert "changed config" not in resumed.stderr  # only resume differs, and it is free to

    full_out, killed_out = tmp_path / "full", tmp_path / "killed"
    assert_same_tensors(full_out / "m.safetensors", killed_out / "m.safetensors")  # EMA weights, bit for bit
    assert_same_tensors(full_out / "m-state" / "model.safetensors", killed_out / "m-state" / "model.safetensors")
    assert_same_tensors(full_out / "m-state" / "ema.safetensors", killed_out / "m-state" / "ema.safetensors")
    a, b = metrics(full_out), metrics(killed_out)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert without_seconds(a) == without_seconds(b)
    # what is saved is the EMA, not the trained weights
    trained = load_file(full_out / "m-state" / "model.safetensors")
    final = load_file(full_out / "m.safetensors")
    key = "conv_in.weight"
    assert not torch.equal(trained[key], final["model.diffusion_model.input_blocks.0.0.weight"])


@pytest.mark.slow
def test_periodic_saves_are_named_like_kohya_and_pruned(cli, tmp_path, tiny_v1):
    extra = (
        "save_every_n_steps = 8\nsave_last_n_steps = 8\nsave_state = true\n"
        "save_every_n_epochs = 4\nsave_last_n_epochs = 2\nsave_last_n_epochs_state = 1"
    )
    result = cli("train", config(tmp_path, tiny_v1, "out", 24, extra))
    assert result.exit_code == 0, result.stderr
    names = run_outputs(tmp_path / "out")
    # steps: 8 and 16 were saved (24 is the final save); keeping the last 8 steps drops step 8.
    # epochs (2 steps each, 12 in all): 4 and 8 were saved (12 is the final); keep the last 2 models, 1 state.
    assert names == [
        "m-000004.safetensors",
        "m-000008-state",
        "m-000008.safetensors",
        "m-state",
        "m-step00000016-state",
        "m-step00000016.safetensors",
        "m.safetensors",
        "metrics.jsonl",
    ]
    state = json.loads((tmp_path / "out" / "m-step00000016-state" / "sdtool_state.json").read_text())
    assert state["train_state"]["global_step"] == 16
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {
        p.name for p in (tmp_path / "out" / "m-state").iterdir()
    }
    assert not list((tmp_path / "out").glob(".*"))  # no temp folders left behind


@pytest.mark.slow
def test_samples_and_tensorboard_leave_the_trajectory_unchanged(cli, tmp_path, tiny_v1):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat --w 64 --h 64 --s 2 --d 3\n# a comment\na blue dog, 1girl --w 64 --h 64 --s 2\n")
    extra = (
        f'sample_prompts = "{prompts}"\nsample_every_n_steps = 2\nsample_at_first = true\n'
        f'sample_sampler = "euler_a"\nlogging_dir = "{tmp_path / "logs"}"\nlog_prefix = "run-"\n'
        "max_token_length = 150\nclip_skip = 2"
    )
    plain = cli("train", config(tmp_path, tiny_v1, "plain", 4, "max_token_length = 150\nclip_skip = 2"))
    sampled = cli("train", config(tmp_path, tiny_v1, "sampled", 4, extra))
    assert plain.exit_code == 0, plain.stderr
    assert sampled.exit_code == 0, sampled.stderr

    assert without_seconds(metrics(tmp_path / "plain")) == without_seconds(metrics(tmp_path / "sampled"))
    assert_same_tensors(tmp_path / "plain" / "m.safetensors", tmp_path / "sampled" / "m.safetensors")

    samples = sorted(p.name for p in (tmp_path / "sampled" / "sample").iterdir())
    assert samples == [f"m_{step:06d}_{name}" for step in (0, 2, 4) for name in ("00_3.png", "01_1.png", "grid.png")]
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.startswith("run-")
    events = EventAccumulator(str(run / "finetuning"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr/unet", "loss/epoch"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("loss/epoch")] == [1, 2]  # the epoch axis, not the step axis
    losses = [r["loss"] for r in metrics(tmp_path / "sampled")]
    assert events.Scalars("loss/epoch")[0].value == pytest.approx(sum(losses[:2]) / 2)
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]


@pytest.mark.slow
def test_exploding_learning_rate_stops_naming_the_step_and_saves_no_nan(cli, tmp_path, tiny_v1):
    cfg = config(tmp_path, tiny_v1, "out", 12, "save_every_n_steps = 1\nmax_grad_norm = 0.0")
    result = cli("train", cfg, "--set", "learning_rate=1e12", "--set", "optimizer_type=SGDNesterov")
    assert result.exit_code == 1, result.stderr
    assert "error: the " in result.stderr and " became " in result.stderr and " at step " in result.stderr
    bad_step = int(result.stderr.split(" at step ")[1].split()[0])
    assert 1 <= bad_step < 12
    out = tmp_path / "out"
    assert not (out / "m.safetensors").exists()
    saves = sorted(out.glob("m-step*.safetensors"))
    assert len(saves) == bad_step - 1  # every step before the bad one was saved, none after
    for save in saves:
        assert all(torch.isfinite(t).all() for t in load_file(save).values()), save
    # the bad step's line is never written (its weights may be fine while its loss is not, or the other way round)
    assert len(metrics(out)) in (bad_step - 1, bad_step)


@pytest.mark.slow
def test_sigterm_saves_a_state_and_exits_130_with_the_resume_command(tmp_path, tiny_v1):
    cfg = config(tmp_path, tiny_v1, "out", 400)
    out = tmp_path / "out"
    proc = popen_train(cfg)
    try:
        wait_for(
            lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2, proc
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    (state,) = out.glob("m-step*-state")
    step = json.loads((state / "sdtool_state.json").read_text())["train_state"]["global_step"]
    assert state.name == f"m-step{step:08d}-state"
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))
    assert f"--set resume={state}" in " ".join(stderr.split())
    assert not (out / "m.safetensors").exists()


@pytest.mark.slow
def test_resume_refuses_an_incompatible_config_and_names_what_changed(cli, tmp_path, tiny_v1):
    cfg = config(tmp_path, tiny_v1, "out", 2, "save_state_on_train_end = true")
    assert cli("train", cfg).exit_code == 0
    state = tmp_path / "out" / "m-state"

    refused = cli(
        "train", cfg, "--set", f"resume={state}", "--set", "optimizer_type=SGDNesterov", "--set", "overwrite=true"
    )
    assert refused.exit_code == 2
    assert 'resume: optimizer_type: "AdamW" in the state, "SGDNesterov" now' in refused.stderr

    more = cli(
        "train", cfg, "--set", f"resume={state}", "--set", "max_train_steps=3", "--set", "learning_rate=2e-3",
        "--set", "overwrite=true",
    )  # fmt: skip
    assert more.exit_code == 0, more.stderr
    warning = " ".join(more.stderr.split())
    assert "learning_rate: 0.001 in the state, 0.002 now" in warning and "max_train_steps: 2" in warning
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3]

    missing = cli("train", cfg, "--set", f"resume={tmp_path}", "--set", "overwrite=true")
    assert missing.exit_code == 2 and "is not an sdtool state folder" in missing.stderr
