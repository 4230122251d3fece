"""`cache_latents = true`, with kohya's meaning: latents that the cache lacks (or that are stale) are encoded before
the first step, then training reads latents instead of running the VAE.

The encoding is `sdtool cache`'s own job (`sdtool.cache.job.encode_items`: the same pixel pipeline, batches of one
bucket, NaN/inf checks, progress bar and skipped-image lines), run over the images the plan found without usable
latents (`Plan.to_encode`), per subset (its flip_aug and resize_interpolation), `vae_batch_size` images at a time:
- with `cache_latents_to_disk`, into each subset's sdtool cache folder (`<metadata stem>.latents/` beside the
  metadata file, the folder `sdtool cache` writes), so the next run, and `sdtool cache --status`, find them; under
  several processes each takes whole batches in turn, as `sdtool cache` does;
- without it, into memory for this run only, as kohya keeps them: nothing is written, and every process encodes
  what it trains on.
Entries that are already usable (sdtool's, or kohya npz files beside the images) are read as they are in both cases.
The VAE encodes in the dtype uncached training would use (fp32 with `no_half_vae` or without mixed precision).
"""

from __future__ import annotations

import io
from typing import Any

from sdtool.train.config.schema import ResolvedConfig
from sdtool.train.dataset import LatentMemory, TrainItem
from sdtool.train.plan import Plan


def vae_precision(mixed_precision: str, no_half_vae: bool) -> str:
    """The precision the VAE encodes in during training (cached or not): kohya's `vae_dtype`."""
    return "fp32" if no_half_vae or mixed_precision == "no" else mixed_precision


def encode_missing_latents(cfg: ResolvedConfig, plan: Plan) -> LatentMemory:
    """Encode the latents of `plan.to_encode`; returns those kept in memory (empty with cache_latents_to_disk)."""
    from sdtool.cache.entry import default_cache_dir
    from sdtool.cache.job import CacheOptions, encode_items, load_cache_vae
    from sdtool.cache.ranks import Ranks
    from sdtool.console import Output, SkipReporter, info
    from sdtool.errors import NonFiniteError
    from sdtool.launch import local_rank, process_rank, world_size
    from sdtool.runtime import resolve_device, torch_dtype

    t = cfg.train
    to_disk = t.cache_latents_to_disk
    precision = vae_precision(t.mixed_precision, t.no_half_vae)
    memory: LatentMemory = {}
    where = "the cache folder beside each metadata file" if to_disk else "memory, for this run"
    info(f"cache_latents: {len(plan.to_encode)} images have no usable cached latents; encoding them into {where}")
    # To disk, the processes share the work through accelerate's process group, which is up by now (a group of
    # their own, torn down before accelerate's, would leave stale rendezvous keys in the launcher's store); in
    # memory, each process encodes everything by itself and needs no collective.
    ranks = Ranks.start() if to_disk else Ranks(process_rank(), world_size(), local_rank())
    with ranks:
        device = resolve_device(ranks.device("auto"))
        vae_module = load_cache_vae(t.pretrained_model_name_or_path, t.vae, torch_dtype(precision), device)
        nonfinite = 0
        for s, sub in enumerate(plan.subsets):
            items = [_cache_item(item) for item, _ in plan.to_encode if item.subset == s]
            if not items:
                continue
            options = CacheOptions(
                fmt="sdtool",
                flip_aug=sub.flip_aug,
                batch_size=t.vae_batch_size,
                interpolation=sub.interpolation,
                precision=precision,
                device="auto",
                overwrite=True,  # the plan already chose what needs encoding
            )
            kept: dict[Any, Any] | None = None if to_disk else {}
            summary = encode_items(
                items,
                ranks=ranks,
                cache_dir=default_cache_dir(sub.metadata_file),
                model=t.pretrained_model_name_or_path,
                vae=t.vae,
                options=options,
                output=Output(False, stream=io.StringIO()),  # stdout carries only the trained model's path
                skips=SkipReporter(False),
                vae_module=vae_module,
                memory=kept,
            )
            nonfinite += summary.nonfinite
            memory.update({(s, path): latents for path, latents in (kept or {}).items()})
        del vae_module
        if to_disk:
            ranks.barrier()  # every rank's entries are on disk before any rank checks them
    if nonfinite and ranks.main:
        raise NonFiniteError(
            f"the VAE produced NaN/inf latents for {nonfinite} image(s), named above",
            hint="fp16 VAEs often overflow: set no_half_vae = true, use mixed_precision = 'bf16', or a fixed vae",
        )
    _free_device_memory()
    return memory


def _cache_item(item: TrainItem) -> Any:
    """The cache job's view of a training item: its image and where it lands in its bucket."""
    from sdtool.bucket.algorithm import crop_ltrb
    from sdtool.cache.placement import CacheItem, Placement
    from sdtool.images import read_size

    size = item.image_size if item.image_size is not None else read_size(item.image)
    placement = Placement(size, item.bucket, item.resized, crop_ltrb(item.resized, item.bucket))
    return CacheItem(str(item.image), item.image, placement)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
