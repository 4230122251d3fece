"""End to end on the tiny models (CPU): a kohya-style config trains, saves, and the result loads with diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import dataset_toml, make_dataset, write_config

CONFIG = """
[model_arguments]
pretrained_model_name_or_path = "{model}"

[saving_arguments]
save_precision = "{precision}"

[training_arguments]
output_dir = "{out}"
output_name = "tuned"
max_train_steps = {steps}
max_token_length = 225
clip_skip = 2
gradient_checkpointing = true
cache_latents = false
seed = 42
max_data_loader_n_workers = {workers}
min_timestep = 700

[optimizer_arguments]
optimizer_type = "AdamW8bit"
learning_rate = 2e-3
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 1

[general]
shuffle_caption = true
keep_tokens = 1
flip_aug = true
"""


def config_text(model, out, steps, images, meta, precision, workers) -> str:
    text = CONFIG.format(model=model, out=out, steps=steps, precision=precision, workers=workers)
    return text + dataset_toml(meta, images, batch_size=2)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def train(cli, tmp_path, model, steps=10, precision="fp16", workers=0, extra=()):
    images, meta = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    text = config_text(model, out, steps, images, meta, precision, workers)
    result = cli("train", write_config(tmp_path / "config.toml", text), *extra)
    assert result.exit_code == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_kohya_config_trains_and_saves_a_single_file_diffusers_loads(cli, tmp_path, tiny_v1):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out, result = train(cli, tmp_path, tiny_v1, steps=12)
    saved = out / "tuned.safetensors"  # safetensors in the LDM layout is the default
    assert result.stdout.strip() == str(saved)
    assert "SD v1, epsilon prediction" in result.stderr

    assert {t.dtype for t in load_file(saved).values()} == {torch.float16}  # save_precision honoured
    before = StableDiffusionPipeline.from_pretrained(tiny_v1, safety_checker=None)
    after = StableDiffusionPipeline.from_single_file(str(saved), config=str(tiny_v1), safety_checker=None)
    unet0, unet1 = state(before.unet), state(after.unet)
    changed = [k for k in unet0 if not torch.allclose(unet0[k].half().float(), unet1[k])]
    assert len(changed) > len(unet0) // 2
    for frozen in ("vae", "text_encoder"):
        a, b = state(getattr(before, frozen)), state(getattr(after, frozen))
        assert all(torch.equal(a[k].half().float(), b[k]) for k in a), frozen

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert set(lines[0]) == {"step", "epoch", "loss", "lr", "timestep_mean", "seconds"}
    assert lines[0]["lr"] == {"unet": 0.0} and lines[-1]["lr"] == {"unet": 2e-3}  # warmup of one step
    assert all(700 <= r["timestep_mean"] < 1000 for r in lines)
    assert lines[-1]["epoch"] == 12  # one batch per epoch
    first = sum(r["loss"] for r in lines[:3]) / 3
    last = sum(r["loss"] for r in lines[-3:]) / 3
    assert last < 0.7 * first, (first, last)

    with safe_open(saved, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.encoder_layer"] == "2"
    assert "clip_skip = 2" in meta["sdtool.config"] and meta["sdtool.seed"] == "42"

    # Run again: the run is finished, so nothing is retrained and the model is left as it is.
    before = saved.read_bytes()
    again = cli("train", tmp_path / "config.toml")
    assert again.exit_code == 0, again.stderr
    assert "this run is finished" in again.stderr and again.stdout.strip() == str(saved)
    assert saved.read_bytes() == before and len((out / "metrics.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_diffusers_output_honours_save_precision(cli, tmp_path, tiny_v1):
    from diffusers import StableDiffusionPipeline

    out, _ = train(cli, tmp_path, tiny_v1, steps=1, extra=("--set", "save_model_as=diffusers_safetensors"))
    saved = out / "tuned"
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (saved / part).glob("*.safetensors")
        assert {t.dtype for t in load_file(weights).values()} == {torch.float16}, part
    StableDiffusionPipeline.from_pretrained(saved, safety_checker=None)
    meta = json.loads((saved / "sdtool_training.json").read_text())
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"


@pytest.mark.slow
def test_v2_trains_as_v_prediction_without_being_told(cli, tmp_path, tiny_v2):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    out, result = train(cli, tmp_path, tiny_v2, steps=2, precision="float", extra=("--set", "train_text_encoder=true"))
    assert "SD v2, v_prediction prediction" in result.stderr
    saved = out / "tuned.safetensors"
    with safe_open(saved, "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v" and meta["modelspec.prediction_type"] == "v"
    pipe = StableDiffusionPipeline.from_single_file(str(saved), config=str(tiny_v2), safety_checker=None)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[0]["lr"]) == {"unet", "text_encoder"}


@pytest.mark.slow
def test_explicit_contradiction_of_the_model_is_an_error(cli, tmp_path, tiny_v2):
    images, meta = make_dataset(tmp_path / "data", 2)
    text = config_text(tiny_v2, tmp_path / "o", 1, images, meta, "float", 0)
    result = cli("train", write_config(tmp_path / "c.toml", text), "--set", "v_parameterization=false")
    assert result.exit_code == 2 and "v_parameterization" in result.stderr


@pytest.mark.slow
def test_same_seed_same_run_with_and_without_workers(cli, tmp_path, tiny_v1):
    a, _ = train(cli, tmp_path / "a", tiny_v1, steps=3, workers=0)
    b, _ = train(cli, tmp_path / "b", tiny_v1, steps=3, workers=2)
    losses = [[json.loads(x)["loss"] for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (a, b)]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_trains_nothing(cli, tmp_path, tiny_v1):
    images, meta = make_dataset(tmp_path / "data", 3)
    text = config_text(tiny_v1, tmp_path / "o", 5, images, meta, "float", 0)
    result = cli("train", write_config(tmp_path / "c.toml", text), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "64x128" in result.stderr and "steps per epoch" in result.stderr and "memory estimate" in result.stderr
    assert not (tmp_path / "o").exists()
