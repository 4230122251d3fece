"""Validation on the tiny models (CPU): the same weights give the same loss, an overfitted run shows it, the split
and the numbers survive a resume and 2 gloo processes, every family, cached latents, and training is untouched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtool.train.dataset import sample_seed
from sdtool.train.holdout import key_hash
from tests.train.conftest import dataset_toml, make_dataset, run_outputs, write_config
from tests.train.test_distributed import _torchrun
from tests.train.test_longrun import assert_same_tensors

pytestmark = pytest.mark.slow

CONFIG = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 5
max_data_loader_n_workers = 0
learning_rate = {lr}
optimizer_type = "{optimizer}"
{extra}

[general]
flip_aug = true
shuffle_caption = true
caption_tag_dropout_rate = 0.3
"""


def config(
    tmp_path: Path,
    model: Path,
    name: str,
    steps: int = 2,
    lr: float = 1e-3,
    extra: str = "",
    n: int = 6,
    batch_size: int = 1,
    optimizer: str = "AdamW",
    **subset,
) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, n)  # 64x64 and 64x128 images
    text = CONFIG.format(model=model, out=tmp_path / name, steps=steps, lr=lr, extra=extra, optimizer=optimizer)
    text += dataset_toml(data / "meta.json", data / "images", batch_size=batch_size, **subset)
    return write_config(tmp_path / f"{name}.toml", text)


def records(out: Path) -> tuple[list[dict], list[dict]]:
    """(training lines, validation lines) of metrics.jsonl."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r or "val_loss_raw" in r]


def held_out(out: Path) -> list[str]:
    return json.loads((out / "run.json").read_text())["plan"]["validation"]["images"]


def recipe_for(cfg_path: Path):
    from sdtool.train.config import load_config
    from sdtool.train.plan import make_plan
    from sdtool.train.recipe import FineTuneRecipe

    cfg = load_config(cfg_path, [])
    return FineTuneRecipe(cfg, make_plan(cfg))


def test_same_weights_same_loss_to_the_last_bit_and_what_it_measures(cli, tmp_path, tiny_v1):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    from sdtool.cache.pixels import load_bucketed_pixels, to_tensor

    extra = "validation_split = 0.34\nvalidation_timesteps = [100, 700]"
    recipe = recipe_for(config(tmp_path, tiny_v1, "direct", extra=extra))
    try:
        recipe.setup()
        first = recipe.validator.measure(recipe, step=0, epoch=0)
        second = recipe.validator.measure(recipe, step=0, epoch=0)
    finally:
        recipe.close()
    assert first.losses == second.losses  # every float, bit for bit
    assert first.images == 2 and set(first.losses) == {"val_loss"}

    # What it measures, computed independently with diffusers: the VAE posterior mean, the documented fixed noise,
    # DDPMScheduler.add_noise at each timestep, the U-Net on the plain caption, MSE against the noise.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_v1, safety_checker=None)
    vae = AutoencoderKL.from_pretrained(tiny_v1, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(tiny_v1, subfolder="scheduler")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    expected = {}
    for t in (100, 700):
        losses = []
        for item in recipe.plan.val_items:
            entry = meta[item.image.name]
            pixels = to_tensor(load_bucketed_pixels(item.image, item.resized, item.bucket, "lanczos"), False)[None]
            with torch.no_grad():
                x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
                generator = torch.Generator().manual_seed(sample_seed(key_hash(5, item.image.name), t))
                noise = torch.randn(x0.shape[1:], generator=generator)[None]
                noisy = scheduler.add_noise(x0, noise, torch.tensor([t]))
                caption = f"{entry['caption']}, {entry['tags']}" if entry["tags"] else entry["caption"]
                hidden = pipe.encode_prompt(caption, "cpu", 1, False)[0]
                pred = pipe.unet(noisy, torch.tensor([t]), hidden).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
        expected[t] = sum(losses) / len(losses)
    mean, by_t = first.losses["val_loss"]
    assert by_t == pytest.approx(expected, rel=1e-4)
    assert mean == pytest.approx(sum(expected.values()) / 2, rel=1e-4)

    # Through the CLI with a learning rate of 0: the weights never change, so neither does any validation number
    # (EMA of unchanging weights is those weights: val_loss == val_loss_raw), and nothing beats the starting point,
    # so save_best writes nothing (the start is the model the run began from).
    extra += (
        "\nvalidate_every_n_steps = 1\nuse_ema = true\nsave_best = true\nsave_every_n_steps = 1\nsave_last_n_steps = 1"
    )
    result = cli("train", config(tmp_path, tiny_v1, "flat", steps=3, lr=0.0, extra=extra))
    assert result.exit_code == 0, result.stderr
    _, val = records(tmp_path / "flat")
    assert [r["step"] for r in val] == [0, 1, 2, 3] and [r["epoch"] for r in val] == [0, 1, 1, 1]
    numbers = {json.dumps({k: v for k, v in r.items() if k.startswith("val_loss")}) for r in val}
    assert len(numbers) == 1
    assert val[0]["val_loss"] == val[0]["val_loss_raw"] and val[0]["val_images"] == 2
    assert run_outputs(tmp_path / "flat") == ["m-step00000002.safetensors", "m.safetensors", "metrics.jsonl"]
    assert "validation loss at step 3:" in result.stderr and "best " in result.stderr and "at step 0" in result.stderr
    assert re.search(r"loss \d\.\d{4}, val \d\.\d{4} \(best \d\.\d{4} @ 0\)", result.stderr)  # the progress line
    assert (tmp_path / "flat" / "report.html").is_file() and "run report:" in result.stderr

    # A learning rate: the curve moves from the same start (the EMA lags behind the trained weights), every
    # improvement rewrites <name>-best, and the step pruning leaves it alone.
    moved = cli("train", config(tmp_path, tiny_v1, "moved", steps=3, lr=1e-3, extra=extra))
    assert moved.exit_code == 0, moved.stderr
    _, val = records(tmp_path / "moved")
    assert val[0]["val_loss"] == records(tmp_path / "flat")[1][0]["val_loss"]
    assert len({r["val_loss_raw"] for r in val}) == 4
    best = min(val, key=lambda r: r["val_loss"])
    assert best["step"] > 0 and moved.stderr.count("-best.safetensors") >= 1
    assert run_outputs(tmp_path / "moved") == [
        "m-best.safetensors",
        "m-step00000002.safetensors",
        "m.safetensors",
        "metrics.jsonl",
    ]
    from safetensors import safe_open

    with safe_open(tmp_path / "moved" / "m-best.safetensors", "pt") as f:
        assert f.metadata()["sdtool.steps"] == str(best["step"])  # the best step's weights


def sharp_vae_model(source: Path, target: Path) -> Path:
    """A copy of the tiny model whose VAE, like a trained one, encodes an image to an almost certain latent.

    The random tiny VAE's posterior std (≈1) is four times the spread of its means, so every training latent would
    be mostly posterior noise and there would be nothing to memorise. Here the log-variance is pinned at −30 (std
    3e-7), and the scaling factor gives the latents about unit variance, as SD's 0.18215 does for SD's VAE.
    """
    from diffusers import AutoencoderKL

    shutil.copytree(source, target)
    vae = AutoencoderKL.from_pretrained(target, subfolder="vae")
    half = vae.quant_conv.out_channels // 2
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -30.0
    vae.register_to_config(scaling_factor=6.0)
    vae.save_pretrained(target / "vae")
    return target


def stripes(path: Path, seed: int, inverted: bool) -> Path:
    """Red and white horizontal stripes with a little noise; `inverted`: their negative (cyan and black)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y = np.mgrid[0:64, 0:64][0]
    image = np.where(((y // (8 + 4 * (seed % 3))) % 2)[..., None] == 1, [230, 40, 40], [250, 250, 250])
    image = (255 - image if inverted else image) + rng.integers(-20, 20, size=(64, 64, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


def test_an_overfitted_run_shows_training_loss_falling_and_validation_loss_rising(cli, tmp_path, tiny_v1):
    model = sharp_vae_model(tiny_v1, tmp_path / "sharp")
    tables = ""
    for name, seeds in (("train", (0, 1)), ("held", (0, 1, 3, 4))):
        meta = {}
        for seed in seeds:
            path = stripes(tmp_path / name / f"s{seed}.png", seed, inverted=name == "held")
            caption = "a photo of a red cat" if seed % 2 == 0 else "a painting of a blue dog"
            meta[path.name] = {"caption": caption, "image_size": [64, 64], "train_resolution": [64, 64]}
        (tmp_path / name / "meta.json").write_text(json.dumps(meta))
        table = dataset_toml(tmp_path / name / "meta.json", tmp_path / name, batch_size=2)
        tables += table.replace("batch_size = 2", "batch_size = 2\nvalidation = true") if name == "held" else table
    # Two images, a high learning rate, many steps: the model memorises them. Low timesteps show it first: there the
    # noise can only be told from the image by knowing the image.
    text = f"""
pretrained_model_name_or_path = "{model}"
output_dir = "{tmp_path / "out"}"
max_train_steps = 120
cache_latents = false
seed = 1
max_data_loader_n_workers = 0
learning_rate = 2e-3
optimizer_type = "AdamW"
validate_every_n_steps = 30
validation_timesteps = [50, 100, 200]
"""
    result = cli("train", write_config(tmp_path / "c.toml", text + tables))
    assert result.exit_code == 0, result.stderr
    train, val = records(tmp_path / "out")
    losses = [r["loss"] for r in train]
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20  # training loss falls
    curve = [r["val_loss"] for r in val]
    assert [r["step"] for r in val] == [0, 30, 60, 90, 120]
    assert curve[-1] > curve[1] * 1.08 and curve[2] < curve[3] < curve[4]  # validation loss rises
    assert [r["val_loss_by_t"]["50"] for r in val][-1] > val[0]["val_loss_by_t"]["50"]  # past where it started
    assert val[0]["val_images"] == 4


def test_split_and_numbers_survive_a_resume_and_two_processes(cli, tmp_path, tiny_v1):
    extra = "validation_split = 0.4\nvalidate_every_n_steps = 2\nsave_every_n_steps = 2\nsave_state = true"
    # SGD: Adam's normalisation would blow float-order noise in near-zero gradients up to ±lr per step.
    full = cli("train", config(tmp_path, tiny_v1, "full", steps=4, extra=extra, batch_size=2, optimizer="SGDNesterov"))
    assert full.exit_code == 0, full.stderr
    state = tmp_path / "full" / "m-step00000002-state"
    assert json.loads((state / "sdtool_state.json").read_text())["validation"]["last_step"] == 2

    resumed_cfg = config(tmp_path, tiny_v1, "resumed", steps=4, extra=extra, batch_size=2, optimizer="SGDNesterov")
    resumed = cli("train", resumed_cfg, "--set", f"resume={state}")
    assert resumed.exit_code == 0, resumed.stderr
    assert held_out(tmp_path / "resumed") == held_out(tmp_path / "full") and len(held_out(tmp_path / "full")) == 2
    _, full_val = records(tmp_path / "full")
    _, resumed_val = records(tmp_path / "resumed")
    assert [r["step"] for r in full_val] == [0, 2, 4] and [r["step"] for r in resumed_val] == [4]  # none at 0 again
    same = ("val_loss", "val_loss_by_t")
    assert {k: resumed_val[0][k] for k in same} == {k: full_val[-1][k] for k in same}  # an exact resume

    # 2 processes × batch 1 = the 1-process run's global batch 2: the same held-out images and the same numbers up to
    # the order of float additions (each rank measures half of the validation images).
    two = _torchrun("train", config(tmp_path, tiny_v1, "two", steps=4, extra=extra, optimizer="SGDNesterov"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert held_out(tmp_path / "two") == held_out(tmp_path / "full")
    _, two_val = records(tmp_path / "two")
    assert [r["step"] for r in two_val] == [0, 2, 4]
    # Before the first step the weights are the same: only the validation's own split across ranks differs.
    assert two_val[0]["val_loss"] == pytest.approx(full_val[0]["val_loss"], abs=1e-6)
    assert two_val[0]["val_loss_by_t"] == pytest.approx(full_val[0]["val_loss_by_t"], abs=1e-6)
    # After steps the weights themselves differ in the float order of DDP's gradient sum (≤ 1e-5, see
    # test_distributed), which moves these losses by a few 1e-4.
    for a, b in zip(two_val[1:], full_val[1:], strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["val_loss_by_t"] == pytest.approx(b["val_loss_by_t"], rel=1e-3)
    assert two.stderr.count("validation loss at step 2") == 1  # rank 0 reports


@pytest.mark.parametrize("family", ["v2", "sdxl"])
def test_every_family_validates(cli, tmp_path, family, tiny_v2, tiny_sdxl):
    model = {"v2": tiny_v2, "sdxl": tiny_sdxl}[family]
    # SDXL: size conditioning from the metadata and the text encoders' outputs cached once (validation captions too)
    extra = f'validation_split = 0.34\nlogging_dir = "{tmp_path / "logs"}"'
    if family == "sdxl":
        extra += "\ncache_text_encoder_outputs = true"
    text = config(tmp_path, model, "out", steps=2, extra=extra).read_text()
    if family == "sdxl":
        text = text.replace("shuffle_caption = true\ncaption_tag_dropout_rate = 0.3\n", "")
    result = cli("train", write_config(tmp_path / "c.toml", text))
    assert result.exit_code == 0, result.stderr
    _, val = records(tmp_path / "out")
    assert [r["step"] for r in val] == [0, 2]  # the start, then the end (2 steps, less than an epoch)
    assert all(r["val_loss"] == r["val_loss"] and r["val_loss"] > 0 for r in val) and val[0]["val_images"] == 2
    assert set(val[0]["val_loss_by_t"]) == {"200", "400", "600", "800"}
    # TensorBoard gets the mean and every band, on the step axis.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / "logs").iterdir()
    events = EventAccumulator(str(run / "finetuning"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"val_loss", "val_loss/t0200", "val_loss/t0800"} <= set(events.Tags()["scalars"])
    logged = [(e.step, round(e.value, 5)) for e in events.Scalars("val_loss")]
    assert logged == [(r["step"], round(r["val_loss"], 5)) for r in val]


def test_cached_latents_give_the_vae_mean_and_validation_never_changes_training(cli, tmp_path, tiny_v1):
    from tests.train.test_cached_latents import _bucket_and_cache

    # Latents cached by `sdtool cache` (mean and std): validation reads the mean, which the VAE computes anew when
    # nothing is cached; the held-out images are cached like the rest.
    extra = "validation_split = 0.34"
    uncached = cli("train", config(tmp_path, tiny_v1, "uncached", steps=1, extra=extra))
    assert uncached.exit_code == 0, uncached.stderr
    _bucket_and_cache(cli, tmp_path / "data" / "images", tmp_path / "data" / "meta.json", tiny_v1)
    text = config(tmp_path, tiny_v1, "cached", steps=1, extra=extra).read_text()
    result = cli(
        "train", write_config(tmp_path / "cached.toml", text.replace("cache_latents = false", "cache_latents = true"))
    )
    assert result.exit_code == 0, result.stderr
    a, b = records(tmp_path / "uncached")[1][0], records(tmp_path / "cached")[1][0]
    assert a["val_loss_by_t"] == pytest.approx(b["val_loss_by_t"], rel=1e-4)

    # A validation dataset beside the training data: validating every step changes nothing about training.
    v_images, v_meta = make_dataset(tmp_path / "val", 2)
    validation = dataset_toml(v_meta, v_images).replace("batch_size = 1", "batch_size = 1\nvalidation = true")
    plain = cli("train", config(tmp_path, tiny_v1, "plain", steps=3))
    with_val = config(tmp_path, tiny_v1, "with_val", steps=3, extra="validate_every_n_steps = 1")
    with_val.write_text(with_val.read_text() + validation)
    validated = cli("train", with_val)
    assert plain.exit_code == 0 and validated.exit_code == 0, validated.stderr
    assert [r["step"] for r in records(tmp_path / "with_val")[1]] == [0, 1, 2, 3]
    assert_same_tensors(tmp_path / "plain" / "m.safetensors", tmp_path / "with_val" / "m.safetensors")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in records(tmp_path / "plain")[0]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in records(tmp_path / "with_val")[0]]


def test_a_hypernetwork_is_validated_at_full_strength_without_dropout(tmp_path, tiny_v1):
    extra = (
        "validation_split = 0.34\ntrain_hypernetwork = true\nhypernetwork_multiplier = 0.5\n"
        "hypernetwork_dropout = [0, 0.5, 0]"
    )
    recipe = recipe_for(config(tmp_path, tiny_v1, "hn", lr=3e-2, extra=extra))
    try:
        recipe.setup()
        recipe.train()
        hyper = recipe.hypernetwork
        first = recipe.validator.measure(recipe, step=2, epoch=1)
        assert recipe.validator.measure(recipe, step=2, epoch=1).losses == first.losses  # no dropout
        # It measures the hypernetwork at strength 1 (what training optimizes), not at the sampling strength: held
        # at 0.5 for a pass, the same images give another loss.
        hyper.set_multiplier(0.5)
        hyper.set_multiplier = lambda multiplier: hyper  # type: ignore[method-assign]  (keeps 0.5 for one pass)
        try:
            at_half = recipe.validator._pass(recipe)
        finally:
            del hyper.set_multiplier
        assert at_half[0] != first.losses["val_loss"][0]
        # Flags and strength are given back: training mode, and the sampling strength for eval mode.
        hyper.train()
        recipe.validator.measure(recipe, step=2, epoch=1)
        assert all(m.training for m in hyper.modules())
        assert {m.multiplier for m in hyper.modules() if hasattr(m, "multiplier")} == {0.5}
    finally:
        recipe.close()
    _, val = records(tmp_path / "hn")
    assert [r["step"] for r in val] == [0, 2]
