"""SDXL training on the tiny SDXL model (CPU): kohya's sdxl_train keys, both text encoders, size conditioning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import dataset_toml, make_dataset, write_config
from tests.train.test_distributed import _torchrun

CONFIG = """
[model_arguments]
pretrained_model_name_or_path = "{model}"

[training_arguments]
output_dir = "{out}"
output_name = "xl"
max_train_steps = {steps}
max_token_length = 150
cache_latents = false
seed = 3
max_data_loader_n_workers = 0
{extra}

[optimizer_arguments]
optimizer_type = "{optimizer}"
learning_rate = 2e-3

[general]
flip_aug = true
"""

G = "conditioner.embedders.1.model."
L = "conditioner.embedders.0.transformer.text_model."
U = "model.diffusion_model."


def sdxl_config(tmp_path: Path, model: Path, name: str, steps: int = 4, extra: str = "", optimizer="AdamW", **kw):
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, 3)
    text = CONFIG.format(model=model, out=tmp_path / name, steps=steps, extra=extra, optimizer=optimizer)
    return write_config(tmp_path / f"{name}.toml", text + dataset_toml(data / "meta.json", data / "images", **kw))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def changed(a: dict, b: dict, prefix: str) -> list[str]:
    return [k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def base_file(tiny_sdxl, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tiny SDXL model's own weights as an SGM file, to compare trained files with."""
    from sdtool.models.families.sdxl import SDXL
    from sdtool.models.loading import load_model
    from sdtool.models.saving import save_single_file

    model = load_model(tiny_sdxl, components=("unet", "vae", "text_encoder", "scheduler"))
    path = tmp_path_factory.mktemp("xl") / "base.safetensors"
    return weights(save_single_file(model, path, family=SDXL, v_prediction=False))


@pytest.mark.slow
def test_sdxl_trains_the_unet_only_and_diffusers_reads_the_result(cli, tmp_path, tiny_sdxl, base_file):
    from diffusers import StableDiffusionXLPipeline

    result = cli("train", sdxl_config(tmp_path, tiny_sdxl, "run", steps=6))
    assert result.exit_code == 0, result.stderr
    assert "SDXL, epsilon prediction" in result.stderr
    out = tmp_path / "run" / "xl.safetensors"
    trained = weights(out)
    assert trained.keys() == base_file.keys()
    assert len(changed(base_file, trained, U)) > 100
    assert changed(base_file, trained, "first_stage_model.") == []
    assert changed(base_file, trained, "conditioner.") == []  # neither text encoder trains by default
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl))
    assert torch.equal(pipe.unet.state_dict()["add_embedding.linear_1.weight"], trained[U + "label_emb.0.0.weight"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(loss == loss for loss in losses)


@pytest.mark.slow
def test_each_text_encoder_trains_at_its_own_rate_and_zero_freezes_it(cli, tmp_path, tiny_sdxl, base_file):
    extra = "train_text_encoder = true\nlearning_rate_te1 = 0\nlearning_rate_te2 = 1e-3"
    result = cli("train", sdxl_config(tmp_path, tiny_sdxl, "te", extra=extra))
    assert result.exit_code == 0, result.stderr
    trained = weights(tmp_path / "te" / "xl.safetensors")
    assert changed(base_file, trained, L) == []  # learning_rate_te1 = 0: frozen, as in kohya
    assert len(changed(base_file, trained, G)) > 10
    metrics = [json.loads(line) for line in (tmp_path / "te" / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]["lr"]) == {"unet", "text_encoder_2"}

    both = cli("train", sdxl_config(tmp_path, tiny_sdxl, "both", extra="train_text_encoder = true"))
    assert both.exit_code == 0, both.stderr
    trained = weights(tmp_path / "both" / "xl.safetensors")
    te1 = changed(base_file, trained, L)
    assert te1 and not any(".final_layer_norm." in k or "encoder.layers.3." in k for k in te1)  # unused: frozen


@pytest.mark.slow
def test_block_lr_freezes_blocks_at_zero_and_names_the_groups(cli, tmp_path, tiny_sdxl, base_file):
    rates = ["0"] + ["1e-3"] * 21 + ["0"]  # time/label embedding and the output layer stay
    result = cli("train", sdxl_config(tmp_path, tiny_sdxl, "blocks", extra=f'block_lr = "{",".join(rates)}"'))
    assert result.exit_code == 0, result.stderr
    trained = weights(tmp_path / "blocks" / "xl.safetensors")
    frozen = [k for k in base_file if k.startswith((U + "time_embed.", U + "label_emb.", U + "out."))]
    assert frozen and changed(base_file, trained, U + "time_embed.") == []
    assert changed(base_file, trained, U + "label_emb.") == [] and changed(base_file, trained, U + "out.") == []
    assert changed(base_file, trained, U + "input_blocks.")
    lrs = json.loads((tmp_path / "blocks" / "metrics.jsonl").read_text().splitlines()[0])["lr"]
    assert "block0" not in lrs and "block22" not in lrs and "block11" in lrs


@pytest.mark.slow
def test_fused_backward_pass_equals_the_plain_adafactor_step(cli, tmp_path, tiny_sdxl):
    extra = 'max_grad_norm = 0\noptimizer_args = ["relative_step=False", "scale_parameter=False"]'
    plain = cli("train", sdxl_config(tmp_path, tiny_sdxl, "plain", extra=extra, optimizer="Adafactor"))
    assert plain.exit_code == 0, plain.stderr
    fused_extra = extra + "\nfused_backward_pass = true"
    fused = cli("train", sdxl_config(tmp_path, tiny_sdxl, "fused", extra=fused_extra, optimizer="Adafactor"))
    assert fused.exit_code == 0, fused.stderr
    a, b = weights(tmp_path / "plain" / "xl.safetensors"), weights(tmp_path / "fused" / "xl.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_interrupted_sdxl_run_resumes_bit_identically(cli, tmp_path, tiny_sdxl):
    extra = "save_every_n_steps = 2\nsave_state = true"
    full = cli("train", sdxl_config(tmp_path, tiny_sdxl, "full", steps=4, extra=extra))
    assert full.exit_code == 0, full.stderr
    half = cli("train", sdxl_config(tmp_path, tiny_sdxl, "half", steps=4, extra=extra), "--set", "max_train_steps=2")
    assert half.exit_code == 0, half.stderr
    state = tmp_path / "half" / "xl-state"
    again = cli(
        "train",
        sdxl_config(tmp_path, tiny_sdxl, "half", steps=4, extra=extra + "\noverwrite = true"),
        "--set",
        f"resume={state}",
    )
    assert again.exit_code == 0, again.stderr
    a, b = weights(tmp_path / "full" / "xl.safetensors"), weights(tmp_path / "half" / "xl.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_for_sdxl(cli, tmp_path, tiny_sdxl):
    # SGD keeps float summation-order differences at their size (Adam's first steps magnify them, as for SD1).
    two_cfg = sdxl_config(tmp_path, tiny_sdxl, "two", steps=2, optimizer="SGDNesterov")
    two = _torchrun("train", two_cfg)
    assert two.returncode == 0, two.stderr[-3000:]
    one_cfg = sdxl_config(tmp_path, tiny_sdxl, "one", steps=2, optimizer="SGDNesterov")
    one_cfg = one_cfg.read_text().replace("batch_size = 1", "batch_size = 2")
    one = cli("train", write_config(tmp_path / "one.toml", one_cfg))
    assert one.exit_code == 0, one.stderr
    a, b = weights(tmp_path / "two" / "xl.safetensors"), weights(tmp_path / "one" / "xl.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


@pytest.fixture(scope="module")
def junk_sdxl(tiny_sdxl, tmp_path_factory) -> Path:
    """The tiny SDXL folder with junk weight files: what a config check reads (configs) is intact."""
    from tests.hardening.test_train_config import junk_weights

    return junk_weights(tiny_sdxl, tmp_path_factory.mktemp("junk") / "sdxl")


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("clip_skip = 3", "clip_skip", "penultimate layer"),
        ("v2 = true", "v2", "which is SDXL"),
        ("train_text_encoder = true\nlearning_rate_te = 1e-5", "learning_rate_te", "learning_rate_te1"),
        ('block_lr = "1e-6,2e-6"', "block_lr", "expected 23"),
        ("fused_backward_pass = true", "fused_backward_pass", "Adafactor"),
        ("cache_text_encoder_outputs = true\ntrain_text_encoder = true", "cache_text_encoder_outputs", "train_text"),
    ],
)
def test_bad_sdxl_keys_are_refused_before_the_model_loads(cli, tmp_path, junk_sdxl, extra, key, words):
    result = cli("train", sdxl_config(tmp_path, junk_sdxl, "bad", extra=extra))
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert any(line.startswith(f"error: {key}:") and words in line for line in errors), result.stderr


def test_sdxl_keys_on_an_sd1_model_are_refused_by_name(cli, tmp_path, tiny_v1):
    from tests.hardening.test_train_config import junk_weights

    junk = junk_weights(tiny_v1, tmp_path / "junk-v1")
    extra = 'train_text_encoder = true\nlearning_rate_te1 = 1e-5\nblock_lr = "1"'
    result = cli("train", sdxl_config(tmp_path, junk, "bad", extra=extra))
    assert result.exit_code == 2, result.stderr
    assert "error: learning_rate_te1: not a key for SD v1" in result.stderr
    assert "error: block_lr: kohya's per-block rates are for SDXL U-Nets; the model is SD v1" in result.stderr


def test_sdxl_metadata_without_image_size_is_refused_with_the_fix(cli, tmp_path, junk_sdxl):
    cfg = sdxl_config(tmp_path, junk_sdxl, "nosize")
    meta = tmp_path / "data" / "meta.json"
    entries = json.loads(meta.read_text())
    for entry in entries.values():
        entry.pop("image_size")
        entry["resized_size"] = [64, 64] if entry["train_resolution"] == [64, 64] else [64, 128]
    meta.write_text(json.dumps(entries))
    result = cli("train", cfg)
    assert result.exit_code == 2, result.stderr
    assert "no image_size" in result.stderr and "sdtool bucket" in result.stderr and "--update" in result.stderr


@pytest.mark.slow
def test_cached_text_encoder_outputs_train_like_encoding_every_step(cli, tmp_path, tiny_sdxl):
    from sdtool.cache.text_outputs import text_cache_dir

    # SGD: batching the captions differently moves outputs by float rounding, which Adam's first steps magnify.
    def config(name, extra=""):
        return sdxl_config(tmp_path, tiny_sdxl, name, extra=extra, optimizer="SGDNesterov")

    plain = cli("train", config("plain"))
    assert plain.exit_code == 0, plain.stderr
    memory = cli("train", config("memory", "cache_text_encoder_outputs = true"))
    assert memory.exit_code == 0, memory.stderr
    assert "text-encoder outputs:" in memory.stderr and "encoded" in memory.stderr
    folder = text_cache_dir(tmp_path / "data" / "meta.json")
    assert not folder.exists()  # in memory only
    a, b = weights(tmp_path / "plain" / "xl.safetensors"), weights(tmp_path / "memory" / "xl.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6

    disk_extra = "cache_text_encoder_outputs_to_disk = true"
    disk = cli("train", config("disk", disk_extra))
    assert disk.exit_code == 0, disk.stderr
    entries = sorted(folder.glob("*.safetensors"))
    assert len(entries) == 3  # one per distinct caption of the three images
    entries[0].write_bytes(b"damaged")
    again = cli("train", config("again", disk_extra))
    assert again.exit_code == 0, again.stderr
    assert "3 captions, 1 encoded to disk" in again.stderr  # the damaged entry, and only it, is encoded again
    c = weights(tmp_path / "again" / "xl.safetensors")
    assert max((a[k].float() - c[k].float()).abs().max().item() for k in a) < 1e-6


def test_caption_changing_options_refuse_text_encoder_output_caching(cli, tmp_path, junk_sdxl):
    cfg = sdxl_config(tmp_path, junk_sdxl, "bad", extra="cache_text_encoder_outputs = true", shuffle_caption=True)
    result = cli("train", cfg)
    assert result.exit_code == 2, result.stderr
    assert "shuffle_caption: changes the caption from step to step" in result.stderr


@pytest.mark.slow
def test_sdxl_chain_bucket_cache_train_convert_sample(cli, tmp_path, tiny_sdxl):
    """The workflow on SDXL: bucket → cache (latents and text-encoder outputs, checked with --status) → train on
    both caches → convert to a diffusers folder → a sample from the converted model."""
    from PIL import Image

    from tests.imagegen import save_rgb

    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(96, 96), (128, 64), (64, 128), (100, 90)]):
        save_rgb(images / f"i{i}.png", w, h, seed=i)
        (images / f"i{i}.caption").write_text(f"a photo of a red cat {i}")
    meta = tmp_path / "meta.json"
    bucket = cli(
        "bucket",
        images,
        "-o",
        meta,
        "--resolution",
        "64",
        "--min-bucket-reso",
        "64",
        "--max-bucket-reso",
        "128",
        "--bucket-reso-steps",
        "64",
    )
    assert bucket.exit_code == 0, bucket.stderr
    cache = cli(
        "cache",
        meta,
        "--model",
        tiny_sdxl,
        "--device",
        "cpu",
        "--text-encoder-outputs",
        "--max-token-length",
        "150",
        "--flip-aug",
    )
    assert cache.exit_code == 0, cache.stderr
    assert "text-encoder outputs: 4 captions, 4 encoded, 0 missing" in cache.stderr
    status = cli(
        "cache",
        meta,
        "--model",
        tiny_sdxl,
        "--status",
        "--text-encoder-outputs",
        "--max-token-length",
        "150",
        "--json",
        "--strict",
    )
    assert status.exit_code == 0, status.stderr
    rows = [json.loads(line) for line in status.stdout.splitlines()]
    assert sum(r.get("kind") == "text_encoder_outputs" and r["status"] == "ok" for r in rows) == 4
    assert sum("kind" not in r and r["status"] == "ok" for r in rows) == 4

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat --w 64 --h 64 --d 1 --s 2\n")
    text = f"""
pretrained_model_name_or_path = "{tiny_sdxl}"
output_dir = "{tmp_path / "out"}"
output_name = "xl"
max_train_steps = 3
max_token_length = 150
cache_latents = true
cache_text_encoder_outputs_to_disk = true
max_data_loader_n_workers = 0
sample_prompts = "{prompts}"
sample_every_n_steps = 3
learning_rate = 1e-3

[general]
flip_aug = true

[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{meta}"
"""
    train = cli("train", write_config(tmp_path / "xl.toml", text))
    assert train.exit_code == 0, train.stderr
    assert "4 captions, 0 encoded" in train.stderr  # every caption came from the cache
    convert = cli("convert", tmp_path / "out" / "xl.safetensors", tmp_path / "xl-diffusers", "--config", tiny_sdxl)
    assert convert.exit_code == 0, convert.stderr
    assert (tmp_path / "xl-diffusers" / "model_index.json").read_text().count("StableDiffusionXLPipeline") == 1
    grids = list((tmp_path / "out" / "sample").glob("*_grid.png"))
    assert grids and Image.open(grids[0]).size == (64, 64)


@pytest.mark.slow
def test_v_prediction_sdxl_with_ztsnr_min_snr_noise_offset_and_ema(cli, tmp_path, tiny_sdxl):
    """The loss options and EMA are the family's business of nobody: they run on SDXL as they do on SD1/2."""
    import shutil

    from safetensors import safe_open

    vpred = tmp_path / "vpred-sdxl"
    shutil.copytree(tiny_sdxl, vpred)
    scheduler = vpred / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace('"epsilon"', '"v_prediction"'))
    extra = "zero_terminal_snr = true\nmin_snr_gamma = 5.0\nnoise_offset = 0.05\nuse_ema = true\nema_decay = 0.9"
    result = cli("train", sdxl_config(tmp_path, vpred, "v", extra=extra))
    assert result.exit_code == 0, result.stderr
    assert "SDXL, v_prediction prediction" in result.stderr
    out = tmp_path / "v" / "xl.safetensors"
    with safe_open(out, "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v"
        keys = set(f.keys())
        assert "v_pred" in keys and "ztsnr" in keys  # ComfyUI's markers for v-prediction and ZTSNR
