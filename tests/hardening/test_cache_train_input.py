"""The bad-input corpus through `sdtool cache` and uncached `sdtool train` (CONTRACT §B, §F, §H).

`bucket` reads headers only, so its metadata holds the truncated JPEG and the PNGs with broken pixel data. `cache`
must name each of them and encode the rest; training without a cache must name and drop them before the first step
(found mid-run they would stop it hours in; decoded as garbage they would train on noise).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from sdtool.cache.entry import MissingLatentsError, default_cache_dir
from sdtool.cache.placement import latent_shape
from sdtool.cache.store import load_latents
from sdtool.fsutil import leftover_temp_files
from sdtool.metadata import read_metadata
from tests.hardening.conftest import check_skips, check_tree, skip_lines
from tests.hardening.corpus import Corpus
from tests.train.conftest import dataset_toml, write_config

pytestmark = pytest.mark.slow

BUCKET_ARGS = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128", "--bucket-reso-steps", "16"]


def bucket(corpus: Corpus, sdtool_proc, out: Path) -> dict:
    result = sdtool_proc("bucket", corpus.root, "-r", "-o", out, *BUCKET_ARGS)
    assert result.returncode == 0, result.stderr
    return read_metadata(out)


def test_cache_over_the_bucketed_corpus(corpus, sdtool_proc, tiny_v1, tmp_path):
    meta_path = tmp_path / "meta.json"
    meta = bucket(corpus, sdtool_proc, meta_path)
    before = corpus.snapshot()
    result = sdtool_proc("cache", meta_path, "-m", tiny_v1, "--workers", "1", "--json")
    assert result.returncode == 0, result.stderr

    # Bucket kept the images whose headers read; of those, exactly the ones whose pixels do not decode are named.
    expected = corpus.expect("pixels")
    expected.bad = {p: words for p, words in expected.bad.items() if str(p) in meta}
    assert {p.name for p in expected.bad} == {"truncated.jpg", "corrupt.png", "badcrc.png"}
    check_skips(result.stderr, expected)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["path"] for r in records if r.get("status") == "skipped"} == {str(p) for p in expected.bad}

    cache_dir = default_cache_dir(meta_path)
    for path in expected.good:  # every good image has a whole, finite entry of its bucket's shape
        fields = meta[str(path)]
        latents = load_latents(path, tuple(fields["train_resolution"]), cache_dir=cache_dir)
        sample = latents.sample()
        assert sample.shape == latent_shape(tuple(fields["train_resolution"])), path
        assert torch.isfinite(sample).all(), path
    for path in expected.bad:
        with pytest.raises(MissingLatentsError):
            load_latents(path, tuple(meta[str(path)]["train_resolution"]), cache_dir=cache_dir)
    assert leftover_temp_files(cache_dir) == []
    check_tree(corpus, before, allowed_new=set())  # the sdtool format writes beside the metadata, not the images

    # --strict: the same skips, the same entries (kept), exit 1.
    strict = sdtool_proc("cache", meta_path, "-m", tiny_v1, "--workers", "1", "--strict")
    assert strict.returncode == 1, strict.stderr
    check_skips(strict.stderr, expected, strict=True)
    assert leftover_temp_files(cache_dir) == []


def test_kohya_cache_over_the_bucketed_corpus_writes_beside_good_images_only(corpus, sdtool_proc, tiny_v1, tmp_path):
    meta_path = tmp_path / "meta.json"
    meta = bucket(corpus, sdtool_proc, meta_path)
    before = corpus.snapshot()
    result = sdtool_proc("cache", meta_path, "-m", tiny_v1, "--workers", "1", "--format", "kohya")
    assert result.returncode == 0, result.stderr
    named = skip_lines(result.stderr)
    decode_bad = {str(p) for p in corpus.expect("pixels").bad if str(p) in meta}
    assert decode_bad <= set(named), result.stderr
    # Two images that would share one kohya npz name (twin.jpg / twin.png, plain.png / link.png) are refused by name.
    assert set(named) - decode_bad <= {str(corpus.path(r)) for r in ("twin.png", "twin.jpg", "link.png", "plain.png")}
    written = {rel for rel in set(corpus.snapshot()) - set(before)}
    assert written and all(rel.endswith(".npz") for rel in written), written
    assert not any(Path(rel).stem.split("_")[0] in ("truncated", "corrupt", "badcrc") for rel in written), written
    check_tree(corpus, before, allowed_new=written)


TRAIN_CONFIG = """
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "m"
max_train_steps = {steps}
cache_latents = false
seed = 3
max_data_loader_n_workers = {workers}
learning_rate = 1e-4
optimizer_type = "AdamW"
{extra}
"""


def train_config(tmp_path: Path, model: Path, meta: Path, steps: int, workers: int = 0, extra: str = "") -> Path:
    text = TRAIN_CONFIG.format(model=model, out=tmp_path / "out", steps=steps, workers=workers, extra=extra)
    return write_config(tmp_path / "train.toml", text + dataset_toml(meta, batch_size=2, caption_extension=".caption"))


def test_uncached_training_names_and_drops_undecodable_images_before_the_first_step(
    corpus, sdtool_proc, tiny_v1, tmp_path
):
    meta_path = tmp_path / "meta.json"
    meta = bucket(corpus, sdtool_proc, meta_path)
    # The metadata also names an image that has gone since bucketing.
    gone = corpus.root / "gone.png"
    meta[str(gone)] = dict(meta[str(corpus.path("plain.png"))])
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    before = corpus.snapshot()

    # One full epoch (every image is loaded at least once) with a DataLoader worker, as a real run would.
    result = sdtool_proc("train", train_config(tmp_path, tiny_v1, meta_path, steps=11, workers=1))
    assert result.returncode == 0, result.stderr
    expected = corpus.expect("pixels")
    bad = {p: w for p, w in expected.bad.items() if str(p) in meta}
    bad[gone] = ("not found",)
    # latin1.caption is not UTF-8: named, and its image trains without that text.
    bad[corpus.path("latin1.caption")] = ("not UTF-8",)
    named = skip_lines(result.stderr)
    assert set(named) == {str(p) for p in bad}, result.stderr
    for path, words in bad.items():
        assert any(w.lower() in named[str(path)].lower() for w in words), named[str(path)]
    assert "Traceback" not in result.stderr
    good = sum(1 for key in meta if Path(key) in expected.good)
    assert re.search(rf"^{good} images, ", result.stderr, re.M), result.stderr  # the plan counts only good images
    assert result.stdout.strip() == str(tmp_path / "out" / "m.safetensors")
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 12))
    check_tree(corpus, before, allowed_new=set())


def test_uncached_training_refuses_a_dataset_with_no_decodable_image(sdtool_proc, tiny_v1, tmp_path, cli):
    from tests.imagegen import save_corrupt_png, save_truncated_jpeg

    folder = tmp_path / "bad"
    folder.mkdir()
    save_truncated_jpeg(folder / "a.jpg", 64, 64)
    save_corrupt_png(folder / "b.png", 64, 64)
    meta_path = tmp_path / "meta.json"
    assert cli("bucket", folder, "-o", meta_path, *BUCKET_ARGS).exit_code == 0
    result = sdtool_proc("train", train_config(tmp_path, tiny_v1, meta_path, steps=2))
    assert result.returncode == 1, result.stderr
    assert set(skip_lines(result.stderr)) == {str(folder / "a.jpg"), str(folder / "b.png")}
    assert "error: the dataset has no usable images" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "m.safetensors").exists()
