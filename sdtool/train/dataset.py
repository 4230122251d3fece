"""Training data: metadata entries → items with buckets, a resumable bucketed batch sampler, and the Dataset.

Determinism: the batch order of epoch e depends only on (seed, e); every per-sample random choice (caption
shuffle and dropout, flip, the latent sample) depends only on (seed, epoch, batch, slot). So a run is the same
with any number of DataLoader workers, and the sampler can restart at any (epoch, batch) for an exact resume.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.bucket import algorithm as buckets
from sdtool.captions import CaptionRules, assemble_caption, fixed_caption, process_caption
from sdtool.console import err, warn
from sdtool.errors import ImageError, InputError, SdtoolError
from sdtool.metadata import ImageResolver, read_metadata
from sdtool.runtime import usable_cpus
from sdtool.train.config.schema import DatasetSpec

Size = tuple[int, int]


@dataclass(frozen=True)
class TrainItem:
    """One image as training sees it: caption text (before per-step processing), bucket, resize and crop."""

    image: Path
    caption: str
    bucket: Size
    resized: Size
    crop: tuple[int, int, int, int]
    image_size: Size | None
    subset: int
    dataset: int


@dataclass(frozen=True)
class SubsetRuntime:
    """Per-subset settings the Dataset needs at train time."""

    rules: CaptionRules
    flip_aug: bool
    interpolation: str
    metadata_file: Path
    num_repeats: int


def sample_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the run seed and a position (epoch, batch, slot …)."""
    digest = hashlib.blake2b(":".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def skipped(path: str | Path, reason: str) -> None:
    """`skipped <path>: <reason>` on stderr, the line every command uses for an input it passes over (rank 0 only)."""
    from sdtool.launch import process_rank

    if process_rank() == 0:  # every rank reads the same dataset: one line per file, not one per process
        err.print(f"skipped {path}: {reason}", markup=False, highlight=False)


def _assign_bucket(spec: DatasetSpec, image_size: Size) -> buckets.BucketAssignment:
    """Bucket, resize and crop for an entry without `train_resolution`, as `sdtool bucket` would assign them."""
    settings = buckets.BucketSettings(
        resolution=spec.resolution,
        min_bucket_reso=spec.min_bucket_reso,
        max_bucket_reso=spec.max_bucket_reso,
        bucket_reso_steps=spec.bucket_reso_steps,
        no_upscale=spec.bucket_no_upscale,
    )
    return buckets.select_bucket(image_size[0], image_size[1], settings)


def _pair(value: Any) -> Size | None:
    from sdtool.metadata import whole_numbers

    pair = whole_numbers(value, 2) if value is not None else None
    return (pair[0], pair[1]) if pair is not None else None


def load_items(specs: list[DatasetSpec]) -> tuple[list[TrainItem], list[SubsetRuntime]]:
    """Read every subset's metadata into items; unusable entries are skipped and named (never silently dropped):
    missing images, malformed fields (`metadata.entry_problem`) and placements `cache` would refuse as well
    (`placement_problem`)."""
    from sdtool.cache.placement import displayed_bucket, image_file_problem, placement_problem
    from sdtool.fsutil import read_sidecar_text
    from sdtool.images import read_size
    from sdtool.metadata import entry_problem

    items: list[TrainItem] = []
    subsets: list[SubsetRuntime] = []
    for d, spec in enumerate(specs):
        for sub in spec.subsets:
            opts = sub.options
            s = len(subsets)
            subsets.append(
                SubsetRuntime(
                    rules=CaptionRules.from_options(opts),
                    flip_aug=bool(opts["flip_aug"]),
                    interpolation=opts["resize_interpolation"] or "lanczos",
                    metadata_file=sub.metadata_file,
                    num_repeats=int(opts["num_repeats"]),
                )
            )
            resolver = ImageResolver(sub.image_dir or sub.metadata_file.parent)
            for key, entry in read_metadata(sub.metadata_file).items():
                try:
                    path = resolver.resolve(key)
                except InputError as exc:
                    skipped(key, exc.reason)
                    continue
                problem = image_file_problem(path) or entry_problem(entry)
                if problem is not None:
                    skipped(path, problem)
                    continue
                caption = assemble_caption(entry.get("caption"), entry.get("tags"), opts["caption_separator"])
                if not caption and opts["caption_extension"]:
                    side = path.with_suffix(opts["caption_extension"])
                    try:
                        caption = read_sidecar_text(side) or ""
                    except InputError as exc:
                        # Like bucket: the image trains without that text, and the user is told why.
                        skipped(side, f"cannot read the caption file ({exc.reason})")
                image_size = _pair(entry.get("image_size"))
                bucket = _pair(entry.get("train_resolution")) if spec.enable_bucket else spec.resolution
                if image_size is None and (bucket is None or entry.get("resized_size") is None):
                    try:
                        if bucket is not None and spec.enable_bucket:  # kohya's metadata: check the orientation
                            bucket, image_size = displayed_bucket(path, bucket)
                        else:
                            image_size = read_size(path)
                    except ImageError as exc:
                        skipped(path, exc.reason)
                        continue
                resized = _pair(entry.get("resized_size")) if spec.enable_bucket else None
                crop = _crop(entry.get("crop_ltrb")) if spec.enable_bucket else None
                if bucket is None:
                    assert image_size is not None
                    assignment = _assign_bucket(spec, image_size)
                    bucket, resized = assignment.bucket, assignment.resized
                problem = placement_problem(image_size, bucket, None)  # the sizes, before a resize is computed
                if problem is None and resized is None:
                    assert image_size is not None
                    resized, _ = buckets.cover_resize(image_size, bucket)
                if problem is None:
                    problem = placement_problem(image_size, bucket, resized, crop)
                if problem is not None:
                    skipped(path, problem)
                    continue
                assert resized is not None
                crop_box = buckets.crop_ltrb(resized, bucket)
                items.append(TrainItem(path, caption, bucket, resized, crop_box, image_size, s, d))
    if not items:
        raise SdtoolError("the dataset has no usable images", hint="check metadata_file and image_dir")
    return items, subsets


def missing_original_sizes(items: list[TrainItem], subsets: list[SubsetRuntime]) -> list[str]:
    """One problem per metadata file whose entries lack `image_size`, the original size SDXL is conditioned on."""
    missing: dict[Path, list[Path]] = {}
    for item in items:
        if item.image_size is None:
            missing.setdefault(subsets[item.subset].metadata_file, []).append(item.image)
    return [
        f"{meta}: {len(images)} image(s) have no image_size (the original size the model is conditioned on), e.g. "
        f"{images[0]}; add it with sdtool bucket DIR -o {meta} --update"
        for meta, images in missing.items()
    ]


def _crop(value: Any) -> tuple[int, int, int, int] | None:
    from sdtool.metadata import whole_numbers

    box = whole_numbers(value, 4) if value is not None else None
    return (box[0], box[1], box[2], box[3]) if box is not None else None


def drop_undecodable(
    items: list[TrainItem], workers: int | None = None, only: set[Path] | None = None
) -> list[TrainItem]:
    """Decode every image once and drop (naming each) those that cannot be decoded or no longer fit their placement,
    before training starts.

    Bucketing reads headers only, so a truncated JPEG or a PNG with broken pixel data gets into the metadata; found
    at its first batch it would stop a run hours in. The decoded size is checked against the metadata's
    `image_size` (an image replaced since `bucket` would be cropped wrongly) and the placement against it
    (`placement_problem`), with the same words the pixel pipeline would use. Decoding up front costs one read per
    image (in threads: Pillow releases the GIL while decoding) and keeps the plan (steps per epoch) true. `only` limits
    the check to those images (the ones whose latents are still to be encoded).
    """
    from concurrent.futures import ThreadPoolExecutor

    from sdtool.cache.placement import placement_problem
    from sdtool.images import open_image

    def decoded_size(path: Path) -> Size | str:
        try:
            with open_image(path) as image:
                return image.size
        except ImageError as exc:
            return exc.reason

    def problem(item: TrainItem, size: Size | str) -> str | None:
        if isinstance(size, str):
            return size
        if item.image_size is not None and tuple(item.image_size) != tuple(size):
            return (
                f"image is {size[0]}x{size[1]} but the metadata says {item.image_size[0]}x{item.image_size[1]} "
                "(it changed since sdtool bucket); run sdtool bucket again"
            )
        return placement_problem(size, item.bucket, item.resized, item.crop)

    paths = sorted({item.image for item in items if only is None or item.image in only})
    with ThreadPoolExecutor(max_workers=workers or min(8, usable_cpus())) as pool:
        sizes = dict(zip(paths, pool.map(decoded_size, paths), strict=True))
    kept = []
    named: set[tuple[Path, str]] = set()
    for item in items:
        reason = problem(item, sizes[item.image]) if item.image in sizes else None
        if reason is None:
            kept.append(item)
        elif (item.image, reason) not in named:  # an image in two subsets is named once per reason
            named.add((item.image, reason))
            skipped(item.image, reason)
    if not kept:
        raise SdtoolError("the dataset has no usable images", hint="every image failed its check (named above)")
    return kept


class BucketBatchSampler:
    """Batches of one bucket each, reshuffled every epoch from (seed, epoch); restartable at any batch.

    Yields lists of `(item, epoch, batch, slot)` keys, so the Dataset can seed each sample from its position.
    """

    def __init__(self, items: list[TrainItem], subsets: list[SubsetRuntime], batch_sizes: list[int], seed: int):
        self.seed = seed
        groups: dict[tuple[int, Size], list[int]] = {}
        for i, item in enumerate(items):
            for _ in range(subsets[item.subset].num_repeats):
                groups.setdefault((item.dataset, item.bucket), []).append(i)
        self.groups = [(indices, batch_sizes[key[0]]) for key, indices in sorted(groups.items())]
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return sum(math.ceil(len(indices) / bs) for indices, bs in self.groups)

    def batches(self, epoch: int) -> list[list[int]]:
        """The item indices of every batch of `epoch`, in order (a short last batch per bucket, like kohya)."""
        rng = random.Random(sample_seed(self.seed, epoch))
        batches = []
        for indices, bs in self.groups:
            order = indices[:]
            rng.shuffle(order)
            batches += [order[i : i + bs] for i in range(0, len(order), bs)]
        rng.shuffle(batches)
        return batches

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Start the next iteration at batch `start` of `epoch` (0-based)."""
        self.epoch, self.start = epoch, start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]
        self.set_position(state["epoch"], state["start"])

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        return self.keys(self.epoch, self.start)

    def keys(self, epoch: int, start: int = 0) -> Iterator[list[tuple[int, int, int, int]]]:
        """The sample keys of every batch of `epoch` from batch `start` on."""
        for b, batch in enumerate(self.batches(epoch)[start:], start):
            yield [(item, epoch, b, slot) for slot, item in enumerate(batch)]


LatentMemory = dict[tuple[int, Path], Any]
"""Latents encoded for this run only (cache_latents without cache_latents_to_disk): (subset, image) → CachedLatents."""


class TrainDataset:
    """Samples for keys from BucketBatchSampler: processed caption plus cached latents or bucketed pixels, and the
    caption's text-encoder outputs when they are cached (`text_outputs`)."""

    def __init__(
        self,
        items: list[TrainItem],
        subsets: list[SubsetRuntime],
        seed: int,
        cached: bool,
        memory: LatentMemory | None = None,
        text_outputs: TextOutputs | None = None,
    ):
        self.items = items
        self.subsets = subsets
        self.seed = seed
        self.cached = cached
        self.text_outputs = text_outputs
        self.memory = memory or {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int, int]) -> dict[str, Any]:
        import torch

        index, epoch, batch, slot = key
        item = self.items[index]
        sub = self.subsets[item.subset]
        seed = sample_seed(self.seed, epoch, batch, slot)
        rng = random.Random(seed)
        caption = process_caption(item.caption, sub.rules, rng, epoch + 1)
        flip = sub.flip_aug and rng.random() < 0.5
        sample: dict[str, Any] = {"caption": caption, "time_ids": size_conditioning(item, flip)}
        if self.text_outputs is not None:
            sample.update(self.text_outputs.get(caption, sub.metadata_file))
        if self.cached:
            entry = self.memory.get((item.subset, item.image)) or load_cached(item, sub)
            latents = entry.sample(flip, torch.Generator().manual_seed(seed))
            return {**sample, "latents": latents.float()}
        from sdtool.cache.pixels import load_bucketed_pixels, to_tensor

        pixels = load_bucketed_pixels(item.image, item.resized, item.bucket, sub.interpolation, item.image_size)
        return {**sample, "pixels": to_tensor(pixels, flip)}


@dataclass
class TextOutputs:
    """Cached text-encoder outputs by caption: held in `store` (in memory), or read from each subset's
    `<META stem>.text/` folder (on disk) when `on_disk`."""

    settings: Any  # sdtool.cache.text_outputs.TextSettings
    store: dict[str, dict[str, Any]]
    on_disk: bool

    def get(self, caption: str, metadata_file: Path) -> dict[str, Any]:
        from sdtool.cache.text_outputs import entry_path, read_entry, text_cache_dir

        key = self.settings.key(caption)
        found = self.store.get(key)
        if found is None and self.on_disk:
            found = read_entry(entry_path(text_cache_dir(metadata_file), key))
        if found is None:
            raise SdtoolError(f"no cached text-encoder outputs for the caption {caption!r}")
        return found


def item_caption(item: TrainItem, sub: SubsetRuntime) -> str:
    """The caption an item always gets when nothing random applies (what text-encoder outputs are cached for)."""
    return fixed_caption(item.caption, sub.rules)


def size_conditioning(item: TrainItem, flipped: bool) -> list[int]:
    """SDXL's six size numbers for an image: original (h, w), crop top-left (top, left), target (h, w).

    The crop is where the bucket sits in the resized image (SGM's meaning); a flipped image's left edge is mirrored,
    `resized_w - crop_right` (kohya mirrors it the same way, in its own coordinates). kohya computes a letterbox
    offset instead (`BucketManager.get_crop_ltrb`, sd-scripts issue 1443), which sdtool does not copy. Families
    without size conditioning ignore them.
    """
    left, top, right, _bottom = item.crop
    if flipped:
        left = item.resized[0] - right
    original = item.image_size or item.resized
    return [original[1], original[0], top, left, item.bucket[1], item.bucket[0]]


def load_cached(item: TrainItem, sub: SubsetRuntime, expected_vae: str | None = None) -> Any:
    """The cache entry of an item (native or kohya npz), checked against its image, placement and flip_aug.

    `expected_vae` (a `vae_fingerprint`) also refuses entries another VAE made; raises when missing or stale.
    """
    from sdtool.cache.entry import default_cache_dir
    from sdtool.cache.store import load_latents

    return load_latents(
        item.image,
        item.bucket,
        cache_dir=default_cache_dir(sub.metadata_file),
        expected_vae=expected_vae,
        flip_aug=sub.flip_aug,
        original_size=item.image_size,
        resized=item.resized,
    )


def unusable_latents(
    items: list[TrainItem], subsets: list[SubsetRuntime], expected_vae: str | None
) -> list[tuple[TrainItem, Any]]:
    """Items whose cached latents cannot be used, each with the LatentCacheError saying why (reads headers only)."""
    from sdtool.cache.entry import LatentCacheError

    unusable = []
    for item in items:
        try:
            load_cached(item, subsets[item.subset], expected_vae)
        except LatentCacheError as exc:
            unusable.append((item, exc))
    return unusable


def cache_problems(
    items: list[TrainItem], subsets: list[SubsetRuntime], expected_vae: str | None
) -> tuple[list[str], list[str]]:
    """(missing, stale): one line per image whose cached latents cannot be used (each entry is read, as training
    reads it)."""
    from sdtool.cache.entry import MissingLatentsError

    missing: list[str] = []
    stale: list[str] = []
    for _, exc in unusable_latents(items, subsets, expected_vae):
        (missing if isinstance(exc, MissingLatentsError) else stale).append(exc.one_line())
    return missing, stale


def training_vae_fingerprint(vae: str | None, model: str) -> str | None:
    """The fingerprint of the VAE training would encode with (`vae` or the model's), None when it cannot be read."""
    from sdtool.cache.fingerprint import vae_fingerprint

    try:
        return vae_fingerprint(vae or model)
    except SdtoolError as exc:
        warn(f"cached latents are not checked against the VAE: {exc.one_line()}")
        return None


def check_cache(
    items: list[TrainItem],
    subsets: list[SubsetRuntime],
    expected_vae: str | None = None,
    memory: LatentMemory | None = None,
) -> None:
    """Refuse to start when any latent is missing or stale: every such image is named, then one error (exit 1).

    The last check before the first step, after `cache_latents` encoded what was missing (`memory` holds what it
    kept in memory): anything still unusable here could not be encoded.
    """
    from sdtool.console import error_line

    on_disk = [item for item in items if (item.subset, item.image) not in (memory or {})]
    missing, stale = cache_problems(on_disk, subsets, expected_vae)
    if missing or stale:
        for line in missing + stale:
            error_line(line)
        metas = " ".join(sorted({str(s.metadata_file) for s in subsets}))
        flip = " --flip-aug" if any(s.flip_aug for s in subsets) else ""
        raise SdtoolError(
            f"{len(missing) + len(stale)} of {len(items)} images have no usable cached latents "
            f"({len(missing)} missing, {len(stale)} stale), named above",
            hint=f"run sdtool cache {metas} --model MODEL{flip}, or set cache_latents = false",
        )


class Collate:
    """Stacks a batch and tokenizes its captions for every text encoder of the model's family (in the DataLoader
    worker, off the training process)."""

    def __init__(self, family: Any, tokenizers: list[Any], max_token_length: int | None):
        self.family = family
        self.tokenizers = tokenizers
        self.max_token_length = max_token_length

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        captions = [s["caption"] for s in samples]
        ids, lengths = self.family.tokenize(self.tokenizers, captions, self.max_token_length)
        key = "latents" if "latents" in samples[0] else "pixels"
        batch = {
            key: torch.stack([s[key] for s in samples]),
            "input_ids": ids,
            "lengths": lengths,
            "captions": captions,
            "time_ids": torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32),
        }
        for cached in ("hidden", "pooled"):  # text-encoder outputs computed once (cache_text_encoder_outputs)
            if cached in samples[0]:
                batch[cached] = torch.stack([s[cached] for s in samples])
        return batch
