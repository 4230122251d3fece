"""Items from metadata, the resumable bucket sampler and the per-sample determinism."""

from __future__ import annotations

import json

from sdtool.bucket.algorithm import cover_resize
from sdtool.train.config import load_config
from sdtool.train.dataset import BucketBatchSampler, TrainDataset, load_items
from tests.train.conftest import dataset_toml, make_dataset, write_config


def config_for(tmp_path, tiny_v1, meta, images, extra=""):
    text = f"""
pretrained_model_name_or_path = "{tiny_v1}"
output_dir = "out"
save_model_as = "diffusers"
cache_latents = false
{extra}
"""
    text += dataset_toml(meta, images, batch_size=2, num_repeats=2)
    return load_config(write_config(tmp_path / "c.toml", text))


def test_items_buckets_and_captions(tmp_path, tiny_v1):
    images, meta = make_dataset(tmp_path / "d", 6)
    cfg = config_for(tmp_path, tiny_v1, meta, images)
    items, subsets = load_items(cfg.datasets)
    assert len(items) == 6 and subsets[0].num_repeats == 2
    tall = [i for i in items if i.bucket == (64, 128)]
    assert len(tall) == 2 and tall[0].resized == cover_resize((80, 150), (64, 128))[0] == (68, 128)
    assert items[0].caption == "a photo of a red cat, 1girl, solo, smile"
    assert cover_resize((1920, 1080), (640, 384))[0] == (683, 384)  # CONTRACT §E worked case


def test_missing_image_is_skipped_and_named(tmp_path, tiny_v1, capsys):
    images, meta = make_dataset(tmp_path / "d", 3)
    (images / "img1.png").unlink()
    cfg = config_for(tmp_path, tiny_v1, meta, images)
    items, _ = load_items(cfg.datasets)
    assert len(items) == 2
    assert "img1.png: image file not found" in capsys.readouterr().err


def test_entries_without_train_resolution_are_bucketed_like_sdtool_bucket(tmp_path, tiny_v1):
    from sdtool.bucket.algorithm import BucketSettings, select_bucket

    images, meta = make_dataset(tmp_path / "d", 3)
    data = json.loads(meta.read_text())
    sizes = {}
    for key, entry in data.items():
        sizes[key] = tuple(entry["image_size"])
        for field in ("train_resolution", "resized_size", "crop_ltrb"):
            entry.pop(field, None)
    meta.write_text(json.dumps(data))
    cfg = config_for(tmp_path, tiny_v1, meta, images)
    items, _ = load_items(cfg.datasets)
    spec = cfg.datasets[0]
    settings = BucketSettings(
        spec.resolution, spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps, spec.bucket_no_upscale
    )
    for item in items:
        expected = select_bucket(*item.image_size, settings)
        assert (item.bucket, item.resized, item.crop) == (expected.bucket, expected.resized, expected.crop)
    # Without bucketing every image goes to the fixed resolution.
    cfg = config_for(tmp_path, tiny_v1, meta, images, "enable_bucket = false")
    items, _ = load_items(cfg.datasets)
    assert {i.bucket for i in items} == {(64, 64)}


def make_sampler(tmp_path, tiny_v1, seed=5):
    images, meta = make_dataset(tmp_path / "d", 6)
    cfg = config_for(tmp_path, tiny_v1, meta, images)
    items, subsets = load_items(cfg.datasets)
    return items, subsets, BucketBatchSampler(items, subsets, [2], seed)


def test_sampler_covers_every_repeat_once_per_epoch_in_one_bucket_per_batch(tmp_path, tiny_v1):
    items, _, sampler = make_sampler(tmp_path, tiny_v1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6  # 8 square (with repeats) / 2 + 4 tall / 2
    seen = sorted(key[0] for batch in batches for key in batch)
    assert seen == sorted(list(range(6)) * 2)
    for batch in batches:
        assert len({items[k[0]].bucket for k in batch}) == 1


def test_sampler_is_seeded_per_epoch_and_resumes_exactly(tmp_path, tiny_v1):
    _, _, sampler = make_sampler(tmp_path, tiny_v1)
    assert sampler.batches(0) == sampler.batches(0)
    assert sampler.batches(0) != sampler.batches(1)
    sampler.set_position(1, 0)
    full = list(sampler)
    sampler.set_position(1, 4)
    state = sampler.state_dict()
    other = BucketBatchSampler([], [], [], seed=0)
    other.groups = sampler.groups
    other.load_state_dict(state)
    assert list(other) == full[4:]


def test_samples_depend_on_position_not_on_order(tmp_path, tiny_v1):
    items, subsets, sampler = make_sampler(tmp_path, tiny_v1)
    subsets = [s.__class__(**{**s.__dict__, "flip_aug": True}) for s in subsets]
    ds = TrainDataset(items, subsets, seed=5, cached=False)
    keys = [k for batch in sampler for k in batch]
    first = [ds[k] for k in keys]
    again = [ds[k] for k in reversed(keys)][::-1]
    for a, b in zip(first, again, strict=True):
        assert a["caption"] == b["caption"] and a["pixels"].equal(b["pixels"])
    assert first[0]["pixels"].shape[0] == 3 and first[0]["pixels"].abs().max() <= 1


def test_sdxl_size_conditioning_is_original_crop_and_target_with_the_crop_mirrored_on_flip(tmp_path):
    """(orig h, orig w, crop top, crop left, target h, target w), SGM's order; the crop is where the bucket sits in
    the resized image, and a flipped image's left edge is resized_w - crop_right (as kohya mirrors it)."""
    from sdtool.bucket.algorithm import BucketSettings, select_bucket
    from sdtool.train.dataset import TrainItem, size_conditioning

    a = select_bucket(1920, 1080, BucketSettings(resolution=(512, 512)))  # §E: (640, 384), resized 683x384
    item = TrainItem(tmp_path / "a.png", "", a.bucket, a.resized, a.crop, (1920, 1080), 0, 0)
    assert a.crop == (21, 0, 661, 384)
    assert size_conditioning(item, flipped=False) == [1080, 1920, 0, 21, 384, 640]
    assert size_conditioning(item, flipped=True) == [1080, 1920, 0, 683 - 661, 384, 640]


def test_kohya_metadata_of_a_rotated_photo_trains_on_the_upright_bucket(tmp_path, tiny_v1, capsys):
    """Training reads kohya's metadata as the cache does (cache/placement.displayed_bucket): a bucket made from the
    stored grid of an EXIF-rotated photo is turned upright, and the file is named."""
    from tests import imagegen

    images = tmp_path / "d"
    images.mkdir()
    imagegen.save_exif_rotated(images / "photo.jpg", 400, 200)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"photo.jpg": {"caption": "a photo", "train_resolution": [704, 320]}}))
    cfg = config_for(tmp_path, tiny_v1, meta, images)
    (item,), _ = load_items(cfg.datasets)
    assert item.bucket == (320, 704) and item.image_size == (200, 400)
    assert item.resized == cover_resize((200, 400), (320, 704))[0]
    assert "photo.jpg" in capsys.readouterr().err
