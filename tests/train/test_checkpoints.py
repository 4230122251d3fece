"""Save names, pruning, state folders (RNG round trip) and the EMA, without training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sdtool.errors import ConfigError
from sdtool.train.checkpoints import check_resume_config, prune_after_save, read_state, write_state
from sdtool.train.config.schema import TrainConfig
from sdtool.train.ema import WeightEMA
from sdtool.train.outputs import STATE_FILE, model_path, save_stem, state_path


def train_config(tmp_path, **keys) -> TrainConfig:
    return TrainConfig(pretrained_model_name_or_path="m", output_dir=str(tmp_path), output_name="run", **keys)


def touch_saves(tmp_path, names):
    for name in names:
        path = tmp_path / name
        if name.endswith("-state") or "." not in name:
            path.mkdir()
        else:
            path.write_bytes(b"x")


def test_names_are_kohyas(tmp_path):
    cfg = train_config(tmp_path)
    assert save_stem("run", epoch=3) == "run-000003"
    assert save_stem("run", step=120) == "run-step00000120"
    assert model_path(cfg, "run-000003").name == "run-000003.safetensors"
    assert state_path(cfg, "run-step00000120").name == "run-step00000120-state"
    folder = train_config(tmp_path, save_model_as="diffusers")
    assert model_path(folder, "run-000003").name == "run-000003"


def test_step_pruning_keeps_the_last_n_steps(tmp_path):
    # a 24-step run saving every 8 steps, save_last_n_steps = 8: after the step-16 save, step 8 goes
    cfg = train_config(tmp_path, save_every_n_steps=8, save_last_n_steps=8, save_state=True)
    touch_saves(tmp_path, ["run-step00000008.safetensors", "run-step00000008-state"])
    touch_saves(tmp_path, ["run-step00000016.safetensors", "run-step00000016-state"])
    touch_saves(tmp_path, ["run-000001.safetensors", "run.safetensors", "run-state", "other-step00000008.safetensors"])
    prune_after_save(cfg, "step", 16, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other-step00000008.safetensors",
        "run-000001.safetensors",
        "run-state",
        "run-step00000016-state",
        "run-step00000016.safetensors",
        "run.safetensors",
    ]


def test_epoch_pruning_keeps_the_last_n_saves_and_state_variant_overrides(tmp_path):
    cfg = train_config(
        tmp_path, save_every_n_epochs=2, save_last_n_epochs=2, save_last_n_epochs_state=1, save_state=True
    )
    for epoch in (2, 4, 6):
        touch_saves(tmp_path, [f"run-{epoch:06d}.ckpt", f"run-{epoch:06d}.safetensors", f"run-{epoch:06d}-state"])
    prune_after_save(cfg, "epoch", 6, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "run-000002.ckpt",  # another format's files are not this run's saves
        "run-000004.ckpt",
        "run-000004.safetensors",
        "run-000006-state",
        "run-000006.ckpt",
        "run-000006.safetensors",
    ]


def test_state_folder_round_trips_every_rng_and_the_accumulation_counter(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    acc.step = 2
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = write_state(acc, tmp_path / "run-state", {"train_state": {"global_step": 5}}, None)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    acc.step = 0
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    acc.load_state(str(path))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    assert acc.step == 2
    assert read_state(path)["train_state"] == {"global_step": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]  # no partial folder left

    # writing the same state again replaces it whole
    write_state(acc, path, {"train_state": {"global_step": 6}}, None)
    assert read_state(path)["train_state"] == {"global_step": 6}
    (path / STATE_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(Exception, match="not a state this sdtool can read"):
        read_state(path)


def test_resume_check_blocks_what_the_state_cannot_continue_and_warns_about_the_rest(capsys):
    saved = {"optimizer_type": "AdamW", "learning_rate": 1e-3, "output_dir": "/a", "sample_prompts": "p.txt"}
    check_resume_config(saved, {**saved, "output_dir": "/b", "sample_prompts": None}, False, False)
    assert "warning" not in capsys.readouterr().err
    check_resume_config(saved, {**saved, "learning_rate": 2e-3}, False, False)
    assert "learning_rate: 0.001 in the state, 0.002 now" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="optimizer_type"):
        check_resume_config(saved, {**saved, "optimizer_type": "Lion"}, False, False)
    with pytest.raises(ConfigError, match="no EMA weights"):
        check_resume_config(saved, saved, True, False)


def test_ema_matches_the_formula_and_swaps_exactly(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    ema = WeightEMA(params, decay=0.5, device="cpu")
    expected = [p.detach().clone() for p in params]
    for n in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        decay = min(0.5, (1 + n) / (10 + n))  # diffusers EMAModel's default warm-up
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, params, strict=True)]
        ema.update()
    for e, s in zip(expected, ema.shadow, strict=True):
        torch.testing.assert_close(s, e, rtol=1e-6, atol=1e-6)

    trained = [p.detach().clone() for p in params]
    with ema.swapped_in():
        assert all(torch.equal(p, s) for p, s in zip(params, ema.shadow, strict=True))
    assert all(torch.equal(p, t) for p, t in zip(params, trained, strict=True))

    ema.save(tmp_path / "ema.safetensors")
    other = WeightEMA(params, decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert other.updates == 4 and all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match="averaged tensors"):
        WeightEMA(params[:1], decay=0.5).load(tmp_path / "ema.safetensors")


def test_resumed_metrics_keep_the_lines_up_to_the_saved_step(tmp_path):
    from sdtool.train.progress import truncate_metrics as _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the last line cut short by kill -9
    _truncate_metrics(path, 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"


def test_a_state_brings_back_its_own_metrics_line_when_the_kill_came_before_it_was_written(tmp_path):
    from sdtool.train.progress import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')  # the state is at step 3, whose line was not written yet
    truncate_metrics(path, 3, {"step": 3, "save_seconds": 0.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1},
        {"step": 2},
        {"step": 3, "save_seconds": 0.5},
    ]
    truncate_metrics(path, 3, {"step": 3, "loss": "the state's copy"})  # the file's own line wins when it is there
    assert path.read_text().count("step") == 3 and "copy" not in path.read_text()
