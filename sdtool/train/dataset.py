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
from sdtool.console import err, warn
from sdtool.errors import ImageError, InputError, SdtoolError
from sdtool.metadata import ImageResolver, read_metadata
from sdtool.runtime import usable_cpus
from sdtool.train.captions import CaptionRules, assemble_caption, process_caption
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
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def load_items(specs: list[DatasetSpec]) -> tuple[list[TrainItem], list[SubsetRuntime]]:
    """Read every subset's metadata into items; missing images are skipped and named (never silently dropped)."""
    from sdtool.images import read_size

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
                if not path.is_file():
                    skipped(path, "image not found")
                    continue
                caption = assemble_caption(entry.get("caption"), entry.get("tags"), opts["caption_separator"])
                if not caption and opts["caption_extension"]:
                    side = path.with_suffix(opts["caption_extension"])
                    if side.is_file():
                        try:
                            caption = side.read_text(encoding="utf-8").strip()
                        except (OSError, UnicodeDecodeError) as exc:
                            # Like bucket: the image trains without that text, and the user is told why.
                            reason = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
                            skipped(side, f"cannot read the caption file ({reason})")
                image_size = _pair(entry.get("image_size"))
                bucket = _pair(entry.get("train_resolution")) if spec.enable_bucket else spec.resolution
                if image_size is None and (bucket is None or entry.get("resized_size") is None):
                    try:
                        image_size = read_size(path)
                    except ImageError as exc:
                        skipped(path, exc.reason)
                        continue
                resized = _pair(entry.get("resized_size")) if spec.enable_bucket else None
                if bucket is None:
                    assert image_size is not None
                    assignment = _assign_bucket(spec, image_size)
                    bucket, resized = assignment.bucket, assignment.resized
                if resized is None:
                    assert image_size is not None
                    resized, _ = buckets.cover_resize(image_size, bucket)
                crop = entry.get("crop_ltrb") if spec.enable_bucket else None
                crop_box = (
                    tuple(crop) if isinstance(crop, list) and len(crop) == 4 else buckets.crop_ltrb(resized, bucket)
                )
                items.append(TrainItem(path, caption, bucket, resized, crop_box, image_size, s, d))  # type: ignore[arg-type]
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


def drop_undecodable(items: list[TrainItem], workers: int | None = None) -> list[TrainItem]:
    """Decode every image once and drop (naming each) those that cannot be decoded, before training starts.

    Bucketing reads headers only, so a truncated JPEG or a PNG with broken pixel data gets into the metadata; found
    at its first batch it would stop a run hours in. Decoding up front costs one read per image (in threads: Pillow
    releases the GIL while decoding) and keeps the plan (steps per epoch) true from the start.
    """
    from concurrent.futures import ThreadPoolExecutor

    from sdtool.images import open_image

    def problem(path: Path) -> str | None:
        try:
            open_image(path).close()
        except ImageError as exc:
            return exc.reason
        return None

    paths = sorted({item.image for item in items})
    with ThreadPoolExecutor(max_workers=workers or min(8, usable_cpus())) as pool:
        problems = dict(zip(paths, pool.map(problem, paths), strict=True))
    for path, reason in problems.items():
        if reason is not None:
            skipped(path, reason)
    kept = [item for item in items if problems[item.image] is None]
    if not kept:
        raise SdtoolError("the dataset has no usable images", hint="every image failed to decode (named above)")
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


class TrainDataset:
    """Samples for keys from BucketBatchSampler: processed caption plus cached latents or bucketed pixels."""

    def __init__(self, items: list[TrainItem], subsets: list[SubsetRuntime], seed: int, cached: bool):
        self.items = items
        self.subsets = subsets
        self.seed = seed
        self.cached = cached

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
        if self.cached:
            latents = load_cached(item, sub).sample(flip, torch.Generator().manual_seed(seed))
            return {**sample, "latents": latents.float()}
        from sdtool.cache.pixels import load_bucketed_pixels, to_tensor

        pixels = load_bucketed_pixels(item.image, item.resized, item.bucket, sub.interpolation, item.image_size)
        return {**sample, "pixels": to_tensor(pixels, flip)}


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


def cache_problems(
    items: list[TrainItem], subsets: list[SubsetRuntime], expected_vae: str | None
) -> tuple[list[str], list[str]]:
    """(missing, stale): one line per image whose cached latents cannot be used (reads entry headers only)."""
    from sdtool.cache.entry import MissingLatentsError

    missing, stale = [], []
    for item in items:
        try:
            load_cached(item, subsets[item.subset], expected_vae)
        except MissingLatentsError as exc:
            missing.append(exc.one_line())
        except SdtoolError as exc:
            stale.append(exc.one_line())
    return missing, stale


def training_vae_fingerprint(vae: str | None, model: str) -> str | None:
    """The fingerprint of the VAE training would encode with (`vae` or the model's), None when it cannot be read."""
    from sdtool.cache.fingerprint import vae_fingerprint

    try:
        return vae_fingerprint(vae or model)
    except SdtoolError as exc:
        warn(f"cached latents are not checked against the VAE: {exc.one_line()}")
        return None


def check_cache(items: list[TrainItem], subsets: list[SubsetRuntime], expected_vae: str | None = None) -> None:
    """Refuse to start when any latent is missing or stale: every such image is named, then one error (exit 1)."""
    from sdtool.console import error_line

    missing, stale = cache_problems(items, subsets, expected_vae)
    if missing or stale:
        for line in missing + stale:
            error_line(line)
        metas = " ".join(sorted({str(s.metadata_file) for s in subsets}))
        flip = " --flip-aug" if any(s.flip_aug for s in subsets) else ""
        raise SdtoolError(
            f"{len(missing) + len(stale)} of {len(items)} images have no usable cached latents "
            f"({len(missing)} missing, {len(stale)} stale), named above",
            hint=f"run sdtool cache {metas} --model MODEL{flip} (or set cache_latents = false)",
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
        return {
            key: torch.stack([s[key] for s in samples]),
            "input_ids": ids,
            "lengths": lengths,
            "captions": captions,
            "time_ids": torch.tensor([s["time_ids"] for s in samples], dtype=torch.float32),
        }
