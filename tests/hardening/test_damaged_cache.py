"""Damaged latent-cache entries (CONTRACT §F; docs/promises.md): every way an entry can be broken reads
as stale with its reason in `cache --status`, is re-encoded by `cache`, and stops no command.

The damage is done to real entries the tiny VAE wrote: cut files, a missing tensor, records that are not objects or
hold the wrong types, NaN, another dtype, and for kohya's npz files a cut archive, NaN, a malformed `sdtool_record`,
a 0-d `original_size` and integer latents.

Before: truncated and NaN entries were "ok", a mistyped record crashed `--status` and `cache` with
AttributeError/TypeError/KeyError, and training said "run sdtool cache" for entries `cache` called up to date.
Now training encodes what it finds unusable itself, for the same reasons `cache --status` gives.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save

from sdtool.cache.entry import native_entry_path
from sdtool.cache.kohya_npz import kohya_npz_path
from sdtool.metadata import read_metadata
from tests.imagegen import save_rgb
from tests.train.conftest import write_config

pytestmark = pytest.mark.slow

BUCKET = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "32"]


def rewrite_native(path: Path, *, tensors=None, record=None, meta=None) -> None:
    """Write an entry again with some of its tensors, record or header metadata replaced (a damaged writer)."""
    with safe_open(str(path), "pt") as f:
        old_tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        old_meta = f.metadata()
    new_meta = dict(old_meta)
    if record is not None:
        new_meta["record"] = json.dumps(record(json.loads(old_meta["record"])))
    if meta is not None:
        new_meta.update(meta)
    path.write_bytes(save(tensors(old_tensors) if tensors else old_tensors, metadata=new_meta))


def cut(path: Path, n: int = 64) -> None:
    path.write_bytes(path.read_bytes()[:-n])


NATIVE_DAMAGE = {
    "truncated": (lambda p: cut(p), ("truncated",)),
    "no mean": (lambda p: rewrite_native(p, tensors=lambda t: {"std": t["std"]}), ("no 'mean'",)),
    "record is a list": (lambda p: rewrite_native(p, meta={"record": "[1, 2]"}), ("record is not an object",)),
    "bucket is text": (lambda p: rewrite_native(p, record=lambda r: {**r, "bucket": "64x64"}), ("bucket",)),
    "source is a number": (lambda p: rewrite_native(p, record=lambda r: {**r, "source": 5}), ("source",)),
    "flip is text": (lambda p: rewrite_native(p, record=lambda r: {**r, "flip": "yes"}), ("flip",)),
    "no record key": (
        lambda p: rewrite_native(p, record=lambda r: {k: v for k, v in r.items() if k != "vae"}),
        ("vae",),
    ),
    "NaN": (
        lambda p: rewrite_native(p, tensors=lambda t: {**t, "mean": t["mean"] * float("nan")}),
        ("non-finite",),
    ),
    "float16": (lambda p: rewrite_native(p, tensors=lambda t: {k: v.half() for k, v in t.items()}), ("float32",)),
}


def save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def rewrite_npz(path: Path, change) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    save_npz(path, **change(arrays))


KOHYA_DAMAGE = {
    "truncated npz": (lambda p: cut(p, 200), ("unreadable",)),
    "NaN npz": (lambda p: rewrite_npz(p, lambda a: {**a, "latents": a["latents"] * np.nan}), ("non-finite",)),
    "record not an object": (
        lambda p: rewrite_npz(p, lambda a: {**a, "sdtool_record": np.asarray("[]")}),
        ("record",),
    ),
    "0-d original_size": (
        lambda p: rewrite_npz(p, lambda a: {**a, "original_size": np.asarray(64)}),
        ("unreadable",),
    ),
    "integer latents": (
        lambda p: rewrite_npz(p, lambda a: {**a, "latents": a["latents"].astype(np.int64)}),
        ("not floating-point",),
    ),
}


def make_images(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True)
    return [save_rgb(folder / f"{i:02d}.png", 64, 64, seed=i) for i, _ in enumerate(names)]


def status(cli, *args) -> dict[str, dict]:
    result = cli("cache", *args, "--status", "--json")
    assert result.exit_code == 0, result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    return {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}


@pytest.mark.parametrize(
    ("fmt", "damage"), [("sdtool", NATIVE_DAMAGE), ("kohya", KOHYA_DAMAGE)], ids=["native", "kohya"]
)
def test_damaged_entries_are_stale_with_a_reason_and_cache_reencodes_them(cli, tmp_path, tiny_v1, fmt, damage):
    images = make_images(tmp_path / "images", ["ok", *damage])
    meta = tmp_path / "meta.json"
    assert cli("bucket", tmp_path / "images", "-o", meta, *BUCKET).exit_code == 0
    args = [meta, "-m", tiny_v1, "--format", fmt, "--workers", "0"]
    first = cli("cache", *args)
    assert first.exit_code == 0, first.stderr

    size = tuple(read_metadata(meta)[str(images[0])]["image_size"])
    entries = [
        native_entry_path(p, tmp_path / "meta.latents") if fmt == "sdtool" else kohya_npz_path(p, size) for p in images
    ]
    for entry, (damage_it, _) in zip(entries[1:], damage.values(), strict=True):
        damage_it(entry)

    found = status(cli, *args)
    assert found[str(images[0])]["status"] == "ok"
    for image, (name, (_, words)) in zip(images[1:], damage.items(), strict=True):
        record = found[str(image)]
        assert record["status"] == "stale", (name, record)
        assert any(w in record["reason"] for w in words), (name, record["reason"])

    again = cli("cache", *args, "--json")
    assert again.exit_code == 0, again.stderr
    assert "unexpected" not in again.stderr and "Traceback" not in again.stderr, again.stderr
    written = {r["path"] for r in map(json.loads, again.stdout.splitlines()) if r["status"] == "written"}
    assert written == {str(p) for p in images[1:]}
    assert {r["status"] for r in status(cli, *args).values()} == {"ok"}


TRAIN = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
max_train_steps = 1
cache_latents = true
max_data_loader_n_workers = 0

[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{meta}"
"""


def test_training_and_cache_agree_on_a_damaged_entry_so_there_is_no_loop(cli, tmp_path, tiny_v1):
    """Training calls a damaged entry unusable for the same reason `cache --status` calls it stale, and encodes it
    itself (kohya's cache_latents semantics): in memory for the run, or to the cache folder with
    cache_latents_to_disk, after which `cache --status` is all ok. Never "run sdtool cache" for an entry `cache`
    calls up to date."""
    images = make_images(tmp_path / "images", ["a", "b"])
    meta = tmp_path / "meta.json"
    assert cli("bucket", tmp_path / "images", "-o", meta, *BUCKET).exit_code == 0
    assert cli("cache", meta, "-m", tiny_v1, "--workers", "0").exit_code == 0
    entry = native_entry_path(images[1], tmp_path / "meta.latents")
    cut(entry)
    reason = status(cli, meta, "-m", tiny_v1)[str(images[1])]
    assert reason["status"] == "stale" and "truncated" in reason["reason"], reason
    text = TRAIN.format(model=tiny_v1, out=tmp_path / "out", images=tmp_path / "images", meta=meta)

    planned = cli("-v", "train", write_config(tmp_path / "memory.toml", text), "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    assert "cached latents: 1 ok, 1 to encode in memory" in planned.stderr
    assert f"to encode: {images[1]} (" in planned.stderr and "truncated" in planned.stderr

    in_memory = cli("train", write_config(tmp_path / "memory.toml", text))
    assert in_memory.exit_code == 0, in_memory.stderr
    assert "1 images have no usable cached latents; encoding them into memory" in in_memory.stderr
    assert status(cli, meta, "-m", tiny_v1)[str(images[1])]["status"] == "stale"  # memory mode writes no cache

    to_disk = text.replace("cache_latents = true", "cache_latents = true\ncache_latents_to_disk = true")
    to_disk = to_disk.replace(str(tmp_path / "out"), str(tmp_path / "out2"))
    trained = cli("train", write_config(tmp_path / "disk.toml", to_disk))
    assert trained.exit_code == 0, trained.stderr
    assert "encoding them into the cache folder" in trained.stderr
    assert {r["status"] for r in status(cli, meta, "-m", tiny_v1).values()} == {"ok"}
    again = cli("cache", meta, "-m", tiny_v1, "--workers", "0")
    assert again.exit_code == 0 and "encoding" not in again.stderr, again.stderr  # nothing left for `cache` to do
