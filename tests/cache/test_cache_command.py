"""`sdtool cache` end to end on tiny SD-shaped VAEs: the latents equal an independent encoding of the §F pixels,
staleness is detected per cause, bad inputs are skipped, NaN is caught, and an interrupted run resumes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdtool.cache.entry import default_cache_dir, native_entry_path
from sdtool.cache.fingerprint import file_sha256, vae_fingerprint
from sdtool.cache.store import load_latents
from sdtool.fsutil import leftover_temp_files
from tests import imagegen
from tests.cache.conftest import DEFAULT_IMAGES, entry, make_dataset
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _oracle_pixels(path: Path, fields: dict, flip: bool = False) -> torch.Tensor:
    """The §F pipeline written out by hand with PIL: resize (LANCZOS), centre crop, x/127.5 − 1, CHW."""
    img = Image.open(path).convert("RGB").resize(tuple(fields["resized_size"]), Image.Resampling.LANCZOS)
    arr = np.asarray(img.crop(tuple(fields["crop_ltrb"])), dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1) / 127.5 - 1.0


@functools.cache
def _oracle_vae(vae_dir: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir).eval()


def _oracle_posterior(vae_dir: Path, path: Path, fields: dict, flip: bool = False):
    vae = _oracle_vae(vae_dir)
    with torch.no_grad():
        dist = vae.encode(_oracle_pixels(path, fields, flip)[None]).latent_dist
    return dist.mean[0], dist.std[0]


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _by_status(records: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(r["status"], set()).add(Path(r["path"]).name)
    return out


def test_native_entries_hold_the_vae_posterior_of_the_pixels(cli, tiny_v1, dataset):
    result = cli("cache", dataset, "--model", tiny_v1, "--flip-aug", "--batch-size", "3")
    assert result.exit_code == 0, result.stderr
    written = [Path(line) for line in result.stdout.splitlines()]
    assert len(written) == 4 and all(p.parent == default_cache_dir(dataset) for p in written)
    meta = json.loads(dataset.read_text())
    for key, fields in meta.items():
        path = native_entry_path(key, default_cache_dir(dataset))
        tensors = load_file(path)
        bw, bh = fields["train_resolution"]
        assert tensors["mean"].shape == (4, bh // 8, bw // 8) and tensors["mean"].dtype == torch.float32
        mean, std = _oracle_posterior(tiny_v1 / "vae", Path(key), fields)
        torch.testing.assert_close(tensors["mean"], mean, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(tensors["std"], std, atol=2e-5, rtol=1e-4)
        fmean, fstd = _oracle_posterior(tiny_v1 / "vae", Path(key), fields, flip=True)
        torch.testing.assert_close(tensors["flipped_mean"], fmean, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(tensors["flipped_std"], fstd, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(tensors["flipped_mean"], tensors["mean"])
        with safe_open(path, "pt") as f:
            record = json.loads(f.metadata()["record"])
        assert record["bucket"] == fields["train_resolution"]
        assert record["crop_ltrb"] == fields["crop_ltrb"]
        assert record["vae"] == vae_fingerprint(tiny_v1) and record["dtype"] == "fp32"
        assert record["source"]["sha256"] == file_sha256(key)
        got = load_latents(
            key,
            (bw, bh),
            cache_dir=default_cache_dir(dataset),
            flip_aug=True,
            expected_vae=vae_fingerprint(tiny_v1),
        )
        assert torch.equal(got.mean, tensors["mean"])


def _kohya_posterior(vae_dir: Path, image: Path, bucket, resized, flip: bool = False):
    """kohya's own cache pipeline (tests/cache/kohya_oracle.py): load, resize by kohya's rule, trim, transform."""
    from tests.cache import kohya_oracle

    pixels, original_size, crop = kohya_oracle.trim_and_resize_if_required(
        False, kohya_oracle.load_image(image), tuple(bucket), tuple(resized)
    )
    if flip:
        pixels = pixels[:, ::-1]
    with torch.no_grad():
        dist = _oracle_vae(vae_dir).encode(kohya_oracle.image_transforms(pixels)[None]).latent_dist
    return dist.mean[0], dist.std[0], original_size, crop


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_kohya_format_holds_kohyas_latents_fields_and_names(cli, sharp_v1, tmp_path, name):
    """The files are what kohya's own cache writer makes of the same images and VAE, under the name the chosen
    kohya scripts look for, with kohya's crop_ltrb (float64) and the displayed original_size."""
    pytest.importorskip("cv2")  # kohya's area filter is OpenCV's (opencv-python-headless is a dependency)
    from tests.cache import kohya_oracle

    meta_path = make_dataset(tmp_path, relative=True)
    args = ["cache", meta_path, "--model", sharp_v1, "--image-dir", tmp_path / "img", "--format", "kohya"]
    args += ["--flip-aug", "--json", "--kohya-name", name]
    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert _by_status(_json_lines(result.stdout)) == {"written": {n for n, _, _ in DEFAULT_IMAGES}}
    assert not (tmp_path / "meta.latents").exists()
    meta = json.loads(meta_path.read_text())
    for image_name, (w, h), (bw, bh) in DEFAULT_IMAGES:
        image = tmp_path / "img" / image_name
        npz = image.with_name(f"{image.stem}_{w:04d}x{h:04d}_{name}.npz")
        for script, sd in kohya_oracle.SCRIPTS_SD.items():  # kohya's own lookup finds the file, or does not
            found = kohya_oracle.get_latents_npz_path(str(image), (w, h), sd)
            expected = kohya_oracle.is_disk_cached_latents_expected(found, flip_aug=True)
            assert expected is ((name == "sd") == sd), script
        resized = meta[image_name]["resized_size"]
        mean, std, original_size, crop = _kohya_posterior(sharp_v1 / "vae", image, (bw, bh), resized)
        with np.load(npz, allow_pickle=False) as z:
            assert z["latents"].shape == (4, bh // 8, bw // 8) and z["latents"].dtype == np.float32
            assert z["original_size"].tolist() == [w, h] == list(original_size)
            assert z["crop_ltrb"].dtype == np.float64 and z["crop_ltrb"].tolist() == list(crop)
            assert float(std.max()) < 1e-6
            np.testing.assert_allclose(z["latents"], mean.numpy(), atol=1e-4)
            fmean, *_ = _kohya_posterior(sharp_v1 / "vae", image, (bw, bh), resized, flip=True)
            np.testing.assert_allclose(z["latents_flipped"], fmean.numpy(), atol=1e-4)
            assert json.loads(str(z["sdtool_record"]))["crop_ltrb"] == meta[image_name]["crop_ltrb"]  # sdtool's own
        got = load_latents(image, (bw, bh), flip_aug=True, expected_vae=vae_fingerprint(sharp_v1))
        assert got.source == npz and got.std is None
    again = cli(*args)
    assert _by_status(_json_lines(again.stdout)) == {"kept": {n for n, _, _ in DEFAULT_IMAGES}}
    status = cli(*args[:-3], "--kohya-name", name, "--status", "--flip-aug")
    assert "4 images: 4 ok, 0 missing, 0 stale" in status.stderr


def test_kohya_reads_an_old_npz_first_and_the_cache_says_so(cli, tiny_v1, tmp_path):
    pytest.importorskip("cv2")
    meta_path = make_dataset(tmp_path, relative=True)
    (tmp_path / "img" / "wide.npz").write_bytes(b"old")
    result = cli("cache", meta_path, "--model", tiny_v1, "--image-dir", tmp_path / "img", "--format", "kohya")
    assert result.exit_code == 0, result.stderr
    assert "wide.npz" in result.stderr and "read that file instead" in result.stderr


def test_kohya_name_needs_the_kohya_format(cli, tiny_v1, dataset):
    result = cli("cache", dataset, "--model", tiny_v1, "--kohya-name", "sdxl")
    assert result.exit_code == 2 and "--format kohya" in result.stderr


def test_status_names_each_kind_of_staleness_and_a_rerun_encodes_only_those(cli, tiny_v1, other_vae_v1, dataset):
    assert cli("cache", dataset, "--model", tiny_v1).exit_code == 0
    status = cli("cache", dataset, "--model", tiny_v1, "--status", "--json")
    assert status.exit_code == 0
    assert {r["status"] for r in _json_lines(status.stdout)} == {"ok"}
    assert "4 ok" in status.stderr

    img = dataset.parent / "img"
    imagegen.save_rgb(img / "wide.png", 96, 64, seed=42)  # image changed
    meta = json.loads(dataset.read_text())
    meta[str(img / "tall.jpg")] = entry(50, 90, 48, 64)  # bucket changed
    dataset.write_text(json.dumps(meta))
    native_entry_path(img / "square.png", default_cache_dir(dataset)).unlink()  # missing

    result = cli("cache", dataset, "--model", tiny_v1, "--status", "--json")
    rows = {Path(r["path"]).name: r for r in _json_lines(result.stdout)}
    assert set(rows["wide.png"]) >= {"path", "status", "reason"}
    assert (rows["wide.png"]["status"], rows["tall.jpg"]["status"]) == ("stale", "stale")
    assert "image changed" in rows["wide.png"]["reason"]
    assert "bucket changed" in rows["tall.jpg"]["reason"]
    assert rows["square.png"]["status"] == "missing"
    assert rows["wide2.webp"]["status"] == "ok"
    table = cli("cache", dataset, "--model", tiny_v1, "--status")
    assert table.stdout == "" and "bucket changed" in table.stderr and "1 ok, 1 missing, 2 stale" in table.stderr
    assert cli("cache", dataset, "--model", tiny_v1, "--status", "--strict").exit_code == 1

    other = cli("cache", dataset, "--model", other_vae_v1, "--status", "--json")
    assert "VAE changed" in {Path(r["path"]).name: r for r in _json_lines(other.stdout)}["wide2.webp"]["reason"]
    no_model = cli("cache", dataset, "--status", "--json")
    assert "VAE is not compared" in no_model.stderr

    rerun = cli("cache", dataset, "--model", tiny_v1, "--json")
    assert rerun.exit_code == 0, rerun.stderr
    assert _by_status(_json_lines(rerun.stdout)) == {
        "written": {"wide.png", "tall.jpg", "square.png"},
        "kept": {"wide2.webp"},
    }
    swapped = cli("cache", dataset, "--model", other_vae_v1, "--json")
    assert _by_status(_json_lines(swapped.stdout)) == {"written": {n for n, _, _ in DEFAULT_IMAGES}}
    overwrite = cli("cache", dataset, "--model", other_vae_v1, "--json", "--overwrite")
    assert _by_status(_json_lines(overwrite.stdout)) == {"written": {n for n, _, _ in DEFAULT_IMAGES}}


def test_a_touched_but_unchanged_image_stays_cached(cli, tiny_v1, dataset):
    assert cli("cache", dataset, "--model", tiny_v1).exit_code == 0
    image = dataset.parent / "img" / "wide.png"
    os.utime(image, ns=(time.time_ns(), os.stat(image).st_mtime_ns + 5 * 10**9))
    rows = _json_lines(cli("cache", dataset, "--model", tiny_v1, "--status", "--json").stdout)
    assert {r["status"] for r in rows} == {"ok"}


def test_nan_latents_are_named_and_not_written(cli, nan_v1, dataset):
    result = cli("cache", dataset, "--model", nan_v1)
    assert result.exit_code == 1
    for name, _, _ in DEFAULT_IMAGES:
        assert f"{name}: the VAE produced NaN/inf latents" in result.stderr
    assert "error: the VAE produced NaN/inf latents for 4 image(s)" in result.stderr
    assert result.stdout == ""
    assert list(default_cache_dir(dataset).iterdir()) == []


def test_bad_images_are_skipped_and_named(cli, tiny_v1, tmp_path):
    meta_path = make_dataset(tmp_path, relative=True)
    img = tmp_path / "img"
    imagegen.save_corrupt_png(img / "corrupt.png")
    imagegen.save_truncated_jpeg(img / "cut.jpg")
    meta = json.loads(meta_path.read_text())
    meta["corrupt.png"] = entry(32, 32, 32, 32)
    meta["cut.jpg"] = entry(64, 48, 64, 48)
    meta["gone.png"] = entry(64, 64, 64, 64)
    meta["resized.png"] = entry(96, 64, 64, 48)
    imagegen.save_rgb(img / "resized.png", 90, 64)  # the image changed size since bucketing
    meta_path.write_text(json.dumps(meta))
    result = cli("cache", meta_path, "--model", tiny_v1, "--image-dir", img)
    assert result.exit_code == 0, result.stderr
    for name in ("corrupt.png", "cut.jpg", "gone.png", "resized.png"):
        assert f"skipped {img / name}:" in result.stderr
    assert "metadata says 96x64" in result.stderr
    assert "cached 4 images, skipped 4" in result.stderr
    assert len(result.stdout.splitlines()) == 4
    strict = cli("cache", meta_path, "--model", tiny_v1, "--image-dir", img, "--strict")
    assert strict.exit_code == 1 and "skipped with --strict" in strict.stderr


def test_relative_keys_resolve_beside_the_metadata_and_kohya_metadata_works(cli, tiny_v1, tmp_path):
    img = tmp_path / "img"
    meta_path = make_dataset(tmp_path, relative=True, sdtool_fields=False)
    meta_path = meta_path.rename(img / "meta.json")
    result = cli("cache", meta_path, "--model", tiny_v1, "--json")
    assert result.exit_code == 0, result.stderr
    assert _by_status(_json_lines(result.stdout)) == {"written": {n for n, _, _ in DEFAULT_IMAGES}}
    assert (img / "meta.latents").is_dir()
    latents = load_latents(img / "tall.jpg", (40, 64), cache_dir=img / "meta.latents")
    assert latents.record["resized"] == [40, 72] and latents.record["crop_ltrb"] == [0, 4, 40, 68]


def test_refuses_unbucketed_metadata_and_missing_model(cli, tiny_v1, tmp_path):
    imagegen.save_rgb(tmp_path / "a.png", 64, 64)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a.png": {"caption": "x", "image_size": [64, 64]}}))
    result = cli("cache", meta, "--model", tiny_v1)
    assert result.exit_code == 2
    assert "no train_resolution" in result.stderr and "run sdtool bucket first" in result.stderr
    assert cli("cache", meta, "--status").exit_code == 2
    meta.write_text(json.dumps({"a.png": entry(64, 64, 64, 64)}))
    no_model = cli("cache", meta)
    assert no_model.exit_code == 2 and "--model" in no_model.stderr
    both = cli("cache", meta, "--status", "--overwrite")
    assert both.exit_code == 2 and "cannot be combined" in both.stderr


def test_precision_is_recorded_and_compared_only_when_asked(cli, tiny_v1, dataset):
    assert cli("cache", dataset, "--model", tiny_v1, "--precision", "bf16").exit_code == 0
    rows = _json_lines(cli("cache", dataset, "--model", tiny_v1, "--status", "--json").stdout)
    assert {r["status"] for r in rows} == {"ok"}
    rows = _json_lines(cli("cache", dataset, "--model", tiny_v1, "--status", "--json", "--precision", "fp32").stdout)
    assert {r["status"] for r in rows} == {"stale"} and "precision changed" in rows[0]["reason"]


def test_an_interrupted_run_resumes(cli, tiny_v1, tmp_path):
    images = [(f"im{i:02d}.png", (80, 64), (64, 64)) for i in range(16)]
    meta_path = make_dataset(tmp_path, images=images, relative=True)
    cache_dir = tmp_path / "cache"
    args = [
        sys.executable,
        "-m",
        "sdtool",
        "cache",
        str(meta_path),
        "--model",
        str(tiny_v1),
        "--image-dir",
        str(tmp_path / "img"),
        "--cache-dir",
        str(cache_dir),
        "--batch-size",
        "1",
        "--flip-aug",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if cache_dir.is_dir() and len(list(cache_dir.glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(cache_dir.glob("*.safetensors"))
    assert 2 <= len(done) < len(images)
    for path in done:  # every file under a final name is whole
        assert load_file(path)["flipped_std"].shape == (4, 8, 8)
    rerun = cli(*args[3:], "--json")  # the same command line, in-process
    assert rerun.exit_code == 0, rerun.stderr
    counts = _by_status(_json_lines(rerun.stdout))
    assert len(counts["written"]) == len(images) - len(done) and len(counts["kept"]) == len(done)
    assert leftover_temp_files(cache_dir) == []
    assert len(list(cache_dir.glob("*.safetensors"))) == len(images)


def test_kohya_names_that_collide_are_skipped_not_overwritten(cli, tiny_v1, tmp_path):
    pytest.importorskip("cv2")  # kohya's resize rule uses OpenCV (a dependency; a venv older than it lacks it)
    images = [("a.png", (64, 64), (64, 64)), ("a.jpg", (64, 64), (64, 64))]
    meta_path = make_dataset(tmp_path, images=images, relative=False)
    args = ("cache", meta_path, "--model", tiny_v1, "--format", "kohya", "--json")
    rows = _json_lines(cli(*args).stdout)
    assert _by_status(rows) == {"written": {"a.png"}, "skipped": {"a.jpg"}}
    assert "taken by a.png" in next(r["reason"] for r in rows if r["status"] == "skipped")
    assert _by_status(_json_lines(cli(*args).stdout)) == {"kept": {"a.png"}, "skipped": {"a.jpg"}}


def test_a_flat_image_encodes_as_the_default_layout_does(cli, tiny_v1, tmp_path):
    """No channels-last VAE on CPU: its GroupNorm moved a flat image's latents by up to 0.6 on this VAE (0.02 on an
    SD-sized one, benchmarks/vae_layout.py), where the default layout matches a float64 encoding to rounding."""
    path = tmp_path / "img" / "grey.png"
    path.parent.mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(path)
    fields = entry(64, 64, 64, 64)
    (tmp_path / "meta.json").write_text(json.dumps({str(path): fields}))
    result = cli("cache", tmp_path / "meta.json", "--model", tiny_v1, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    tensors = load_file(native_entry_path(path, default_cache_dir(tmp_path / "meta.json")))
    vae = _oracle_vae(tiny_v1 / "vae").double()
    try:
        with torch.no_grad():
            exact = vae.encode(_oracle_pixels(path, fields)[None].double()).latent_dist.mean[0]
    finally:
        vae.float()
    torch.testing.assert_close(tensors["mean"].double(), exact, atol=1e-4, rtol=1e-4)
