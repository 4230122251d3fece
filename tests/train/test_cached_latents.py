"""Training on cached latents: bucket → cache → train, native and kohya npz; with cache_latents, what is missing or
stale (another VAE, an edited image) is encoded before the first step, to disk or in memory (kohya's meaning)."""

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

    if fmt == "kohya":
        pytest.importorskip("cv2")  # kohya's resize rule uses OpenCV (a dependency; a venv older than it lacks it)
    config, images, meta = _config(tmp_path, tiny_v1)
    _bucket_and_cache(cli, images, meta, tiny_v1, "--format", fmt)
    if fmt == "kohya":
        assert len(list(images.glob("*_sd.npz"))) == 4

    dry = cli("train", config, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "cached latents: 4 ok, 0 to encode in memory before the first step" in dry.stderr

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


def _entries(meta):
    from safetensors.torch import load_file

    from sdtool.cache.entry import read_native_record

    return {
        p.name: (read_native_record(p), load_file(p))
        for p in sorted((meta.parent / "meta.latents").glob("*.safetensors"))
    }


def test_missing_and_stale_entries_are_encoded_to_disk_before_the_first_step(cli, tmp_path, tiny_v1):
    """cache_latents_to_disk: what is missing or stale is encoded into the cache folder, exactly as sdtool cache
    writes it, then training reads every latent from there."""
    import torch

    config, images, meta = _config(tmp_path, tiny_v1, extra="cache_latents_to_disk = true")
    _bucket_and_cache(cli, images, meta, tiny_v1)
    # One entry gone, one image edited after caching: both named at --dry-run, both re-encoded by training.
    entries = sorted((meta.parent / "meta.latents").glob("img0-*.safetensors"))
    entries[0].unlink()
    (images / "img1.png").write_bytes((images / "img1.png").read_bytes() + b"\0")
    dry = cli("-v", "train", config, "--dry-run")
    assert "cached latents: 2 ok, 2 to encode to the cache folder before the first step" in dry.stderr
    assert "to encode: " in dry.stderr and "img0.png (no cached latents" in dry.stderr and "img1.png (" in dry.stderr
    result = cli("train", config)
    assert result.exit_code == 0, result.stderr
    assert "encoding them into the cache folder" in result.stderr and "encoding 2 images" in result.stderr
    status = cli("cache", meta, "--model", tiny_v1, "--image-dir", images, "--flip-aug", "--status")
    assert "4 images: 4 ok, 0 missing, 0 stale" in status.stderr
    by_training = _entries(meta)
    # The same job as `sdtool cache`: re-encoding everything there gives the same records and latents.
    _bucket_and_cache(cli, images, meta, tiny_v1, "--overwrite")
    by_cache = _entries(meta)
    assert by_training.keys() == by_cache.keys()
    for name, (record, tensors) in by_training.items():
        again_record, again = by_cache[name]
        assert record == again_record, name
        assert all(torch.allclose(tensors[k], again[k], atol=1e-5) for k in tensors), name
    assert (tmp_path / "out" / "tuned.safetensors").exists()


def test_without_cache_latents_to_disk_missing_latents_stay_in_memory(cli, tmp_path, tiny_v1):
    """kohya's in-memory caching: every image is encoded once before the first step and nothing is written."""
    config, _images, _meta = _config(tmp_path, tiny_v1)  # bucketed metadata, no cache
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = cli("train", config)
    assert result.exit_code == 0, result.stderr
    assert "4 images have no usable cached latents; encoding them into memory, for this run" in result.stderr
    after = sorted(p.name for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts[:1])
    assert after == before  # no cache file, no temporary file
    assert len(_losses(tmp_path / "out")) == 8


@pytest.fixture(scope="module")
def other_vae(tiny_v1, tmp_path_factory):
    def nudge(vae):
        vae.encoder.conv_out.bias += 0.01

    return _copy_with_vae(tiny_v1, tmp_path_factory.mktemp("vae") / "other", nudge)


def test_latents_from_another_vae_are_encoded_again(cli, tmp_path, tiny_v1, other_vae):
    config, images, meta = _config(tmp_path, tiny_v1, extra="cache_latents_to_disk = true")
    _bucket_and_cache(cli, images, meta, other_vae)
    dry = cli("train", config, "--dry-run")
    assert "cached latents: 0 ok, 4 to encode" in dry.stderr
    result = cli("train", config)
    assert result.exit_code == 0, result.stderr
    status = cli("cache", meta, "--model", tiny_v1, "--image-dir", images, "--flip-aug", "--status")
    assert "4 images: 4 ok, 0 missing, 0 stale" in status.stderr  # now made by the model's own VAE
