"""sdtool.cache: placement, naming, fingerprints, entries, kohya npz interop, load_latents checks."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdtool.bucket.algorithm import cover_resize
from sdtool.cache.entry import (
    LatentCacheError,
    MissingLatentsError,
    StaleLatentsError,
    default_cache_dir,
    make_record,
    native_entry_path,
    read_native_record,
    write_native_entry,
)
from sdtool.cache.fingerprint import source_change, source_fingerprint, vae_fingerprint
from sdtool.cache.kohya_npz import kohya_npz_path, write_kohya_npz
from sdtool.cache.placement import MissingBucketError, Placement, placement_from_entry, plan_items
from sdtool.cache.store import load_latents
from sdtool.errors import InputError, ModelError
from tests import imagegen
from tests.cache.conftest import entry

# --- placement -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((1920, 1080), (640, 384), (683, 384)),
        ((3000, 1000), (832, 256), (832, 277)),
        ((300, 200), (640, 384), (640, 427)),
        ((1024, 1536), (384, 640), (427, 640)),
    ],
)
def test_cover_resize_matches_the_contract_worked_cases(size, bucket, resized):
    assert cover_resize(size, bucket)[0] == resized


def test_placement_from_kohya_entry_computes_resize_and_centre_crop():
    p = placement_from_entry({"image_size": [1920, 1080], "train_resolution": [640, 384]})
    assert p == Placement((1920, 1080), (640, 384), (683, 384), (21, 0, 661, 384))
    assert p.latent_shape == (4, 48, 80)


def test_placement_uses_sdtool_fields_and_checks_the_crop():
    fields = {"image_size": [300, 200], "train_resolution": [256, 192], "resized_size": [300, 200]}
    assert placement_from_entry(fields).crop_ltrb == (22, 4, 278, 196)
    with pytest.raises(InputError, match="not the centre crop"):
        placement_from_entry({**fields, "crop_ltrb": [0, 0, 256, 192]})
    with pytest.raises(InputError, match="does not cover"):
        placement_from_entry({**fields, "resized_size": [200, 100]})
    with pytest.raises(InputError, match="multiple of 8"):
        placement_from_entry({"image_size": [300, 200], "train_resolution": [250, 192]})


def test_placement_reads_the_header_when_image_size_is_absent(tmp_path):
    path = imagegen.save_rgb(tmp_path / "a.png", 96, 64)
    assert placement_from_entry({"train_resolution": [64, 48]}, path).original_size == (96, 64)


def test_kohya_metadata_of_a_rotated_photo_gets_the_upright_bucket_with_a_warning(tmp_path, capsys):
    """kohya never applies EXIF orientation: its metadata (no image_size) buckets a 400x200 grid shown as 200x400
    into 704x320, which would keep 23 % of the upright picture. The bucket is turned, and the file named."""
    from sdtool.bucket.algorithm import BucketSettings, select_bucket

    path = imagegen.save_exif_rotated(tmp_path / "photo.jpg", 400, 200)  # stored 400x200, displayed 200x400
    kohya_bucket = select_bucket(400, 200, BucketSettings()).bucket  # what kohya computes from the stored size
    assert kohya_bucket == (704, 320)
    placement = placement_from_entry({"caption": "x", "train_resolution": list(kohya_bucket)}, path)
    assert placement.bucket == (320, 704) and placement.original_size == (200, 400)
    kept = placement.bucket[0] * placement.bucket[1] / (placement.resized[0] * placement.resized[1])
    assert kept > 0.9
    err = capsys.readouterr().err
    assert "photo.jpg" in err and "using the bucket 320x704" in err and "EXIF" in err
    # an upright photo, an image with image_size, and a bucket that already fits are left alone, silently
    upright = imagegen.save_rgb(tmp_path / "upright.png", 400, 200)
    assert placement_from_entry({"train_resolution": [704, 320]}, upright).bucket == (704, 320)
    assert placement_from_entry({"image_size": [200, 400], "train_resolution": [320, 704]}, path).bucket == (320, 704)
    assert placement_from_entry({"train_resolution": [320, 704]}, path).bucket == (320, 704)
    assert capsys.readouterr().err == ""


def test_missing_train_resolution_is_a_usage_error(tmp_path):
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"a.png": {"image_size": [64, 64]}, "b.png": entry(64, 64, 64, 64)}))
    with pytest.raises(MissingBucketError, match="1 of 2 entries have no train_resolution") as exc:
        plan_items(meta)
    assert exc.value.exit_code == 2
    assert "run sdtool bucket first" in exc.value.one_line()


# --- names --------------------------------------------------------------------------------------------------------


def test_names(tmp_path):
    meta = tmp_path / "data" / "meta.json"
    assert default_cache_dir(meta) == (tmp_path / "data" / "meta.latents").absolute()
    a = native_entry_path(tmp_path / "x" / "img.png", tmp_path / "c")
    b = native_entry_path(tmp_path / "y" / "img.png", tmp_path / "c")
    assert a != b and a.name.startswith("img-") and a.suffix == ".safetensors"
    assert a == native_entry_path(tmp_path / "x" / ".." / "x" / "img.png", tmp_path / "c")
    assert kohya_npz_path(tmp_path / "img.png", (1200, 800)).name == "img_1200x0800_sd.npz"
    assert kohya_npz_path(tmp_path / "img.png", (64, 48), "_sdxl.npz").name == "img_0064x0048_sdxl.npz"


# --- fingerprints ------------------------------------------------------------------------------------------------


def test_source_change_uses_size_then_mtime_then_content(tmp_path):
    path = imagegen.save_rgb(tmp_path / "a.png", 32, 32)
    fp = source_fingerprint(path)
    assert source_change(fp, path) is None
    os.utime(path, ns=(time.time_ns(), fp["mtime_ns"] + 10**9))  # touched, same bytes
    assert source_change(fp, path) is None
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    assert "content differs" in source_change(fp, path)
    imagegen.save_rgb(path, 40, 32)
    assert "bytes" in source_change(fp, path)
    path.unlink()
    assert source_change(fp, path) == "image file not found"


def _ldm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE state dict as an original LDM checkpoint stores it: prefixed, attention as 1×1 convs, and renamed."""
    out = {}
    for i, (name, t) in enumerate(sorted(state.items())):
        t = t.clone()
        if ".attentions." in name and t.ndim == 2:
            t = t[:, :, None, None]
        out[f"first_stage_model.{name.split('.')[0]}.renamed{i}"] = t.contiguous()
    out["model.diffusion_model.whatever.weight"] = torch.ones(3)
    return out


def test_vae_fingerprint_is_cheap_layout_independent_and_ignores_the_decoder(tiny_v1, other_vae_v1, tmp_path):
    from diffusers import AutoencoderKL

    fp = vae_fingerprint(tiny_v1)
    assert fp.startswith("enc-sha256:")
    assert vae_fingerprint(tiny_v1 / "vae") == fp  # VAE-only folder
    assert vae_fingerprint(str(tiny_v1)) == fp
    assert vae_fingerprint(other_vae_v1) != fp  # encoder changed

    vae = AutoencoderKL.from_pretrained(tiny_v1 / "vae")
    state = vae.state_dict()
    single = tmp_path / "model.safetensors"
    save_file(_ldm_layout(state), single)
    assert vae_fingerprint(single) == fp

    decoder_tuned = {k: (v + 1 if k.startswith("decoder.") else v) for k, v in state.items()}
    save_file(decoder_tuned, tmp_path / "vae-ft.safetensors")
    assert vae_fingerprint(tmp_path / "vae-ft.safetensors") == fp

    torch.save(state, tmp_path / "vae.pt")
    assert vae_fingerprint(tmp_path / "vae.pt").startswith("file-sha256:")


def test_vae_fingerprint_errors(tmp_path):
    with pytest.raises(ModelError, match="no VAE weights"):
        vae_fingerprint(tmp_path)
    with pytest.raises(ModelError, match="local Hugging Face cache"):
        vae_fingerprint("nobody/not-a-model")
    save_file({"unet.weight": torch.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ModelError, match="no VAE encoder weights"):
        vae_fingerprint(tmp_path / "x.safetensors")


def test_safetensors_header_that_is_not_an_object_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        vae_fingerprint(bogus)
    with pytest.raises(LatentCacheError, match="unreadable cache entry"):
        read_native_record(bogus)


# --- native entries and load_latents -------------------------------------------------------------------------------


def _native(tmp_path, bucket=(64, 48), flip=False, size=(96, 64)) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    image = imagegen.save_rgb(tmp_path / "img" / "a.png", *size)
    placement = placement_from_entry(entry(*size, *bucket))
    g = torch.Generator().manual_seed(0)
    shape = placement.latent_shape
    tensors = {"mean": torch.randn(shape, generator=g), "std": torch.rand(shape, generator=g) + 0.1}
    if flip:
        tensors["flipped_mean"] = torch.randn(shape, generator=g)
        tensors["flipped_std"] = torch.rand(shape, generator=g)
    record = make_record(
        image,
        placement,
        source_fingerprint(image),
        interpolation="lanczos",
        vae="enc-sha256:x",
        vae_source="m",
        dtype="fp32",
        flip=flip,
    )
    cache = tmp_path / "cache"
    write_native_entry(native_entry_path(image, cache), tensors, record)
    return image, cache, tensors


def test_native_round_trip_and_sampling(tmp_path):
    image, cache, t = _native(tmp_path, flip=True)
    got = load_latents(image, (64, 48), cache_dir=cache, expected_vae="enc-sha256:x", flip_aug=True)
    assert torch.equal(got.mean, t["mean"]) and torch.equal(got.std, t["std"])
    assert torch.equal(got.flipped_mean, t["flipped_mean"]) and got.has_flipped
    assert got.record["bucket"] == [64, 48] and got.source.parent == cache
    eps = torch.randn(t["mean"].shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got.sample(generator=torch.Generator().manual_seed(5)), t["mean"] + t["std"] * eps)
    flipped = got.sample(flip=True, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(flipped, t["flipped_mean"] + t["flipped_std"] * eps)
    a, b = got.sample(), got.sample()
    assert not torch.equal(a, b)  # a fresh draw each call
    assert got.mean.dtype == torch.float32


def test_native_staleness_is_refused_with_reasons(tmp_path):
    image, cache, _ = _native(tmp_path)
    with pytest.raises(StaleLatentsError, match="bucket changed") as exc:
        load_latents(image, (48, 64), cache_dir=cache)
    assert "sdtool cache" in exc.value.one_line()
    with pytest.raises(StaleLatentsError, match="VAE changed"):
        load_latents(image, (64, 48), cache_dir=cache, expected_vae="enc-sha256:other")
    with pytest.raises(MissingLatentsError, match="no flipped latents"):
        load_latents(image, (64, 48), cache_dir=cache, flip_aug=True)
    with pytest.raises(StaleLatentsError, match="resize/crop changed"):
        load_latents(image, (64, 48), cache_dir=cache, original_size=(96, 64), resized=(80, 48))
    assert load_latents(image, (64, 48), cache_dir=cache, original_size=(96, 64), resized=(72, 48)).std is not None
    imagegen.save_rgb(image, 96, 64, seed=9)
    with pytest.raises(StaleLatentsError, match="image changed"):
        load_latents(image, (64, 48), cache_dir=cache)
    assert load_latents(image, (64, 48), cache_dir=cache, allow_stale=True).mean.shape == (4, 6, 8)
    with pytest.raises(MissingLatentsError, match="no cached latents"):
        load_latents(tmp_path / "img" / "other.png", (64, 48), cache_dir=cache, original_size=(96, 64))


# --- kohya npz ---------------------------------------------------------------------------------------------------


def _kohya_npz(path: Path, latents: np.ndarray, flipped: np.ndarray | None = None, **extra) -> Path:
    """Write a file the way kohya's save_latents_to_disk does (np.savez, no sdtool record)."""
    kw = {"latents": latents, "original_size": np.array([96, 64]), "crop_ltrb": np.array([0.0, 5.0, 64.0, 43.0])}
    if flipped is not None:
        kw["latents_flipped"] = flipped
    kw.update(extra)
    np.savez(path, **kw)
    return path


@pytest.mark.parametrize("name", ["a_0096x0064_sd.npz", "a_0096x0064_sdxl.npz", "a.npz"])
def test_foreign_kohya_files_load_by_every_name(tmp_path, name):
    image = imagegen.save_rgb(tmp_path / "a.png", 96, 64)
    lat = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    time.sleep(0.01)
    _kohya_npz(tmp_path / name, lat, lat[:, :, ::-1].copy())
    got = load_latents(image, (64, 48), flip_aug=True)
    assert got.std is None and got.source.name == name
    assert np.array_equal(got.sample().numpy(), lat)
    assert np.array_equal(got.sample(flip=True).numpy(), lat[:, :, ::-1])
    with pytest.raises(StaleLatentsError, match="shape"):
        load_latents(image, (64, 64))
    with pytest.raises(StaleLatentsError, match="shape"):
        load_latents(image, (64, 64), allow_stale=True)  # a wrong shape is never usable


def test_kohya_legacy_flip_file_and_order(tmp_path):
    image = imagegen.save_rgb(tmp_path / "a.png", 96, 64)
    z = np.zeros((4, 6, 8), np.float32)
    _kohya_npz(tmp_path / "a.npz", z)
    np.savez(tmp_path / "a_flip.npz", latents=z + 1)
    assert float(load_latents(image, (64, 48), flip_aug=True).flipped_mean.mean()) == 1.0
    _kohya_npz(tmp_path / "a_0096x0064_sd.npz", z + 2)
    assert float(load_latents(image, (64, 48), fmt="kohya").mean.mean()) == 2.0  # _sd.npz first


def test_kohya_file_older_than_the_image_is_stale(tmp_path):
    image = imagegen.save_rgb(tmp_path / "a.png", 96, 64)
    npz = _kohya_npz(tmp_path / "a_0096x0064_sd.npz", np.zeros((4, 6, 8), np.float32))
    os.utime(npz, ns=(0, os.stat(image).st_mtime_ns - 10**9))
    with pytest.raises(StaleLatentsError, match="newer"):
        load_latents(image, (64, 48))
    with pytest.raises(MissingLatentsError, match="no flipped"):
        load_latents(image, (64, 48), flip_aug=True, allow_stale=True)


def test_sdtool_written_kohya_files_round_trip_with_their_record(tmp_path):
    image, _, _ = _native(tmp_path)
    placement = placement_from_entry(entry(96, 64, 64, 48))
    record = make_record(
        image,
        placement,
        source_fingerprint(image),
        interpolation="lanczos",
        vae="v1",
        vae_source="m",
        dtype="fp32",
        flip=False,
    )
    lat = np.ones((4, 6, 8), np.float32)
    path = write_kohya_npz(
        kohya_npz_path(image, (96, 64)),
        lat,
        original_size=(96, 64),
        crop_ltrb=placement.crop_ltrb,
        record=record,
    )
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"latents", "original_size", "crop_ltrb", "sdtool_record"}
        assert z["latents"].dtype == np.float32 and z["original_size"].tolist() == [96, 64]
        assert z["crop_ltrb"].tolist() == [4, 0, 68, 48]
    assert load_latents(image, (64, 48), fmt="kohya", expected_vae="v1").record["vae"] == "v1"
    with pytest.raises(StaleLatentsError, match="VAE changed"):
        load_latents(image, (64, 48), fmt="kohya", expected_vae="v2")


def test_corrupt_entries_are_named(tmp_path):
    image, cache, _ = _native(tmp_path)
    path = native_entry_path(image, cache)
    path.write_bytes(b"garbage")
    with pytest.raises(LatentCacheError, match="unreadable cache entry"):
        load_latents(image, (64, 48), cache_dir=cache)
    buf = io.BytesIO()
    np.savez(buf, something=np.zeros(3))
    (tmp_path / "img" / "a.npz").write_bytes(buf.getvalue())
    with pytest.raises(LatentCacheError, match="no 'latents'"):
        load_latents(image, (64, 48), fmt="kohya")


def test_vae_fingerprint_of_a_hub_model_in_the_local_cache(tiny_v1, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_v1 / "vae", snapshot / "vae")
    (tmp_path / "hub" / "models--someone--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert vae_fingerprint("someone/tiny") == vae_fingerprint(tiny_v1)
