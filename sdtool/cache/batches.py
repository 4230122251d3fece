"""The images of a cache job in bucket batches, decoded, resized and cropped by a thread pool (PIL and hashlib
release the GIL) a few batches ahead of the VAE.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sdtool.cache.fingerprint import source_fingerprint
from sdtool.cache.placement import CacheItem
from sdtool.errors import ImageError


@dataclass
class Loaded:
    item: CacheItem
    pixels: Any = None
    source: dict[str, Any] | None = None
    error: str | None = None


def _load(item: CacheItem, interpolation: str) -> Loaded:
    """Runs in a loader thread: fingerprint the file, then decode, resize and crop it."""
    from sdtool.cache.pixels import load_bucketed_pixels

    p = item.placement
    try:
        # Fingerprint before decoding: if the file changes meanwhile, the entry looks stale, never wrongly fresh.
        source = source_fingerprint(item.image_path)
        pixels = load_bucketed_pixels(item.image_path, p.resized, p.bucket, interpolation, p.original_size)
    except ImageError as exc:
        return Loaded(item, error=exc.reason)
    except OSError as exc:
        return Loaded(item, error=f"cannot read the file ({exc.strerror or exc})")
    return Loaded(item, pixels=pixels, source=source)


def bucket_batches(items: list[CacheItem], batch_size: int) -> list[list[CacheItem]]:
    """Batches of at most `batch_size` images that all share one bucket (metadata order within a bucket)."""
    by_bucket: dict[tuple[int, int], list[CacheItem]] = {}
    for item in items:
        by_bucket.setdefault(item.placement.bucket, []).append(item)
    batches = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def prefetch_batches(
    batches: list[list[CacheItem]], interpolation: str, workers: int, ahead: int
) -> Iterator[list[Loaded]]:
    """Yield loaded batches in order while a thread pool prepares up to `ahead` batches beyond the current one."""
    if workers <= 0:
        for batch in batches:
            yield [_load(item, interpolation) for item in batch]
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdtool-load")
    pending: deque[list[Future[Loaded]]] = deque()
    it = iter(batches)
    try:
        for batch in it:
            pending.append([pool.submit(_load, item, interpolation) for item in batch])
            if len(pending) > ahead:
                break
        while pending:
            futures = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append([pool.submit(_load, item, interpolation) for item in nxt])
            yield [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
