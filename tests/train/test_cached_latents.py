"""Training on latents `sdtool cache` wrote: bucket → cache → train, native and kohya npz, refusing stale entries."""

from __future__ import annotations

import json

import pytest

from tests.cache.conftest import _copy_with_vae
from tests.train.conftest import make_dataset, write_config
from tests.train.test_train import config_text

pytestmark = pytest.mark.slow


def _config(tmp_path, model, steps=8, extra=""):
    images, meta = make_dataset(tmp_path / "data", 4)
    text = config_text(
        model=model, out=tmp_path / "out", steps=steps, images=images, meta=meta, precision="fp16", workers=0
    )
    text = text.replace("cache_latents = false", "cache_latents = true")
    text = text.replace("min_timestep = 700", "min_timestep = 700\n" + extra)
    return write_config(tmp_path / "config.toml", text), images, meta


def _bucket_and_cache(cli, images, meta, model, *extra):
    args = ["--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128", "--update", "--relative"]
    bucketed = cli("bucket", images, "-o", meta, *args)
    assert bucketed.exit_code == 0, bucketed.stderr
    cached = cli(
        "cache",
        meta,
        "--model",
        model,
        "--image-dir",
        images,
        "--flip-aug",
        "--device",
        "cpu",
        "--workers",
        "0",
        *extra,
    )
    assert cached.exit_code == 0, cached.stderr
    return cached


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["sdtool", "kohya"])
def test_bucket_cache_train_on_cached_latents(cli, tmp_path, tiny_v1, fmt):
    from diffusers import StableDiffusionPipeline

    config, images, meta = _config(tmp_path, tiny_v1)
    _bucket_and_cache(cli, images, meta, tiny_v1, "--format", fmt)
    if fmt == "kohya":
        assert len(list(images.glob("*_sd.npz"))) == 4

    dry = cli("train", config, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "cached latents: 4 ok, 0 missing, 0 stale" in dry.stderr

    result = cli("train", config)
    assert result.exit_code == 0, result.stderr
    saved = tmp_path / "out" / "tuned.safetensors"
    assert result.stdout.strip() == str(saved)
    pipe = StableDiffusionPipeline.from_single_file(
        str(saved), config=str(tiny_v1), local_files_only=True, safety_checker=None
    )
    assert pipe.unet is not None


def test_loss_falls_on_cached_latents_and_sampling_loads_the_vae(cli, tmp_path, tiny_v1):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red cat --w 64 --h 64 --s 2 --d 1\n")
    extra = f'sample_every_n_steps = 20\nsample_prompts = "{prompts}"\nsample_sampler = "ddim"\n'
    config, images, meta = _config(tmp_path, tiny_v1, steps=40, extra=extra)
    _bucket_and_cache(cli, images, meta, tiny_v1)
    result = cli("train", config, "--set", "learning_rate=5e-3", "--set", "min_timestep=0")
    assert result.exit_code == 0, result.stderr
    losses = _losses(tmp_path / "out")
    assert len(losses) == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, (first, last)
    samples = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert samples == [f"tuned_{step:06d}_{name}" for step in (20, 40) for name in ("00_1.png", "grid.png")]


def test_missing_and_stale_entries_are_all_named_before_the_first_step(cli, tmp_path, tiny_v1):
    config, images, meta = _config(tmp_path, tiny_v1)
    _bucket_and_cache(cli, images, meta, tiny_v1)
    # One entry gone, one image edited after caching: both named, nothing trained.
    entries = sorted((meta.parent / "meta.latents").glob("img0-*.safetensors"))
    entries[0].unlink()
    (images / "img1.png").write_bytes((images / "img1.png").read_bytes() + b"\0")
    dry = cli("train", config, "--dry-run")
    assert "cached latents: 2 ok, 1 missing, 1 stale" in dry.stderr
    result = cli("train", config)
    assert result.exit_code == 1
    assert "img0.png" in result.stderr and "img1.png" in result.stderr
    assert "2 of 4 images have no usable cached latents (1 missing, 1 stale)" in result.stderr
    assert "sdtool cache" in result.stderr and "--flip-aug" in result.stderr
    assert not (tmp_path / "out" / "tuned.safetensors").exists()


@pytest.fixture(scope="module")
def other_vae(tiny_v1, tmp_path_factory):
    def nudge(vae):
        vae.encoder.conv_out.bias += 0.01

    return _copy_with_vae(tiny_v1, tmp_path_factory.mktemp("vae") / "other", nudge)


def test_latents_from_another_vae_are_refused(cli, tmp_path, tiny_v1, other_vae):
    config, images, meta = _config(tmp_path, tiny_v1)
    _bucket_and_cache(cli, images, meta, other_vae)
    result = cli("train", config)
    assert result.exit_code == 1
    assert "4 of 4 images have no usable cached latents (0 missing, 4 stale)" in result.stderr
    assert "VAE" in result.stderr or "vae" in result.stderr
