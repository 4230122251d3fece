"""The `sdtool cache` job: encode bucketed images with the VAE and write their latent cache entries (§F).

Images are decoded, resized and cropped by a thread pool (PIL and hashlib release the GIL) a few batches ahead of
the VAE, which encodes one bucket per batch (the flipped crops ride in the same batch). Each entry is checked for
NaN/inf and written atomically as soon as its batch is done, so an interrupted run keeps every finished entry and
a rerun encodes only what is missing or stale.

Under `torchrun` / `accelerate launch` every rank plans the same work, then takes whole bucket batches in turn
(`batches[rank::N]`), so each image is encoded once, in the batch it would have had in a one-process run; rank 0
alone reports, after gathering what the other ranks wrote and skipped.
"""

from __future__ import annotations

import io
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.cache.batches import Loaded, bucket_batches, prefetch_batches
from sdtool.cache.entry import (
    CachedLatents,
    CacheFormat,
    default_cache_dir,
    make_record,
    native_entry_path,
    write_native_entry,
)
from sdtool.cache.fingerprint import vae_fingerprint
from sdtool.cache.kohya_npz import KohyaSuffix, kohya_crop_ltrb, kohya_npz_path, write_kohya_npz
from sdtool.cache.placement import CacheItem, plan_items
from sdtool.cache.ranks import QuietSkips, Ranks
from sdtool.cache.store import entry_status
from sdtool.console import Output, SkipReporter, debug, info, plural, progress_bar
from sdtool.errors import NonFiniteError, SdtoolError, UsageError
from sdtool.fsutil import clean_stale_temps
from sdtool.runtime import usable_cpus


@dataclass
class CacheOptions:
    """What `sdtool cache` was asked to do (validated by the CLI)."""

    fmt: CacheFormat = "sdtool"
    kohya_suffix: KohyaSuffix = "_sd.npz"  # which kohya scripts find the files (see kohya_npz.KOHYA_READERS)
    cache_dir: Path | None = None
    flip_aug: bool = False
    batch_size: int = 4
    interpolation: str = "lanczos"
    precision: str | None = None  # None: fp32 for new entries, any precision accepted for existing ones
    device: str = "auto"
    workers: int | None = None
    overwrite: bool = False


@dataclass
class CacheSummary:
    written: int = 0
    kept: int = 0
    skipped: int = 0
    nonfinite: int = 0


def _image_seed(path: Path) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).digest()[:8], "big")


def _remove_temp_files(folder: Path, pattern: str) -> None:
    """Temp files of writes a killed run left behind (atomic writes never leave half files under final names); a
    write in flight in another live process (a second `cache` on the same folder) is left alone (sdtool.fsutil)."""
    for tmp in clean_stale_temps(folder, pattern):
        debug(f"removed leftover temp file {tmp}")


def load_cache_vae(model: str | None, vae: str | None, dtype: Any, device: Any) -> Any:
    """The VAE that encodes: `--vae` when given, else the model's `vae/`; eval mode, no grads."""
    from sdtool.models.loading import load_model
    from sdtool.models.vae import load_vae

    if vae is not None:
        module = load_vae(vae, dtype=dtype)
    else:
        assert model is not None
        module = load_model(model, dtype=dtype, components=("vae",)).vae
    module.requires_grad_(False)
    return module.to(device).eval()


def run_cache(
    metadata_path: str | Path,
    *,
    model: str | None,
    vae: str | None,
    image_dir: str | Path | None,
    options: CacheOptions,
    output: Output,
    skips: SkipReporter,
    vae_module: Any = None,
) -> CacheSummary:
    """Encode every missing or stale entry of a bucketed metadata file (all of them with `overwrite`).

    `vae_module` is an already loaded VAE for `vae`/`model` (callers that hold one, e.g. the benchmark).

    The VAE runs in PyTorch's default memory layout everywhere. The channels-last layout is about 20 % faster on
    CPU but not exact: its GroupNorm moves the latents of a flat image by up to 0.02 on an SD-sized VAE with
    realistic weights (0.6 on the tiny test VAE), where the default layout agrees with a float64 encoding to 3e-5
    (benchmarks/vae_layout.py, docs/benchmarks.md).
    """
    if model is None and vae is None:
        raise UsageError("sdtool cache needs --model (or --vae) to encode", hint="pass --model MODEL")
    with Ranks.start() as ranks:
        main_output, main_skips = output, skips
        if not ranks.main:
            # Every rank plans the same work; rank 0 alone reports the planning, so the others discard theirs.
            output, skips = Output(output.json_lines, stream=io.StringIO()), QuietSkips()
        metadata_path = Path(metadata_path)
        cache_dir = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir(metadata_path)
        items, problems = plan_items(metadata_path, image_dir)
        summary = CacheSummary()
        for path, reason in problems:
            skips.skip(path, reason)
            output.record({"path": path, "status": "skipped", "reason": reason})
        summary.skipped += len(problems)
        if options.fmt == "kohya":
            items = _drop_npz_collisions(items, options.kohya_suffix, output, summary, skips)
            _warn_about_legacy_npz(items)
        summary = encode_items(
            items,
            ranks=ranks,
            cache_dir=cache_dir,
            model=model,
            vae=vae,
            options=options,
            output=output,
            skips=skips,
            summary=summary,
            vae_module=vae_module,
            main_output=main_output,
            main_skips=main_skips,
        )
        main = ranks.main
    # Raised after every rank has left the process group together (see Ranks.close).
    if main and summary.nonfinite:
        raise NonFiniteError(
            f"the VAE produced NaN/inf latents for {summary.nonfinite} image(s), named above; they were not written",
            hint="fp16 VAEs often overflow: try --precision fp32 or bf16, or a fixed VAE (--vae)",
        )
    return summary


def encode_items(
    items: list[CacheItem],
    *,
    ranks: Ranks,
    cache_dir: Path,
    model: str | None,
    vae: str | None,
    options: CacheOptions,
    output: Output,
    skips: SkipReporter,
    summary: CacheSummary | None = None,
    vae_module: Any = None,
    main_output: Output | None = None,
    main_skips: SkipReporter | None = None,
    memory: dict[Path, CachedLatents] | None = None,
) -> CacheSummary:
    """Encode the missing or stale entries among `items` (all with `overwrite`): the work of `sdtool cache` once its
    images are planned, shared with `sdtool train`'s `cache_latents`.

    With several `ranks` each takes whole bucket batches in turn and rank 0 reports for all (`main_output` /
    `main_skips` are where; `output` / `skips` are this rank's own). With `memory`, nothing is written: each entry
    is kept there (image path → CachedLatents) for the caller, and every rank encodes every item it is given.
    """
    summary = summary if summary is not None else CacheSummary()
    main_output = main_output if main_output is not None else output
    main_skips = main_skips if main_skips is not None else skips
    vae_source = str(vae if vae is not None else model)
    try:
        fingerprint: str | None = vae_fingerprint(vae_source)
    except SdtoolError as exc:
        # A hub model that is not downloaded yet: it is fingerprinted after loading fetches it.
        debug(f"VAE fingerprint before loading failed: {exc.one_line()}")
        fingerprint = None

    todo = _select_work(items, cache_dir, fingerprint, options, output, summary)
    if not todo:
        entries = plural(summary.kept, "cache entry is", "cache entries are")
        info(f"all {entries} up to date" if summary.kept else "nothing to encode")
        return summary
    from sdtool.cache.pixels import check_interpolation

    check_interpolation(options.interpolation)

    if vae is None and model is not None and vae_module is None:
        from sdtool.models.loading import local_copy

        local_copy(model, ("vae",))  # a hub model not in the cache is fetched, or fails at once, before torch loads

    import torch

    from sdtool.runtime import resolve_device, torch_dtype

    device = resolve_device(ranks.device(options.device))
    precision = options.precision or "fp32"
    dtype = torch_dtype(precision)
    if vae_module is None:
        from sdtool.console import loading

        with loading(f"the VAE of {vae_source}"):
            vae_module = load_cache_vae(model, vae, dtype, device)
    if fingerprint is None:
        fingerprint = vae_fingerprint(vae_source)
        todo = _select_work(todo, cache_dir, fingerprint, options, output, summary)

    if memory is None:
        if options.fmt == "sdtool":
            cache_dir.mkdir(parents=True, exist_ok=True)
        if ranks.main:  # once, before any rank writes (other ranks' writes and other processes' are locked anyway)
            if options.fmt == "sdtool":
                _remove_temp_files(cache_dir, "*")
            else:
                for folder in {item.image_path.parent for item in todo}:
                    _remove_temp_files(folder, "*.npz")
        # No rank writes before every rank has chosen its work from the same, unchanged cache.
        ranks.barrier()

    workers = options.workers if options.workers is not None else usable_cpus()
    batches = bucket_batches(todo, options.batch_size)
    info(
        f"encoding {plural(len(todo), 'image')} in {plural(len(batches), 'batch', 'batches')} on {device} "
        f"({precision})"
        + (f", {ranks.size} processes" if ranks.size > 1 and memory is None else "")
        + (f", {summary.kept} up to date" if summary.kept else "")
        + (", kept in memory for this run" if memory is not None else "")
    )
    shared = ranks.size > 1 and memory is None
    mine = batches[ranks.rank :: ranks.size] if shared else batches
    if shared and not ranks.main:
        # What this rank writes and skips goes to rank 0 at the end (see Ranks.gather).
        output, skips = Output(output.json_lines, stream=io.StringIO()), QuietSkips()
        summary = CacheSummary()
    writer = _EntryWriter(cache_dir, fingerprint, vae_source, precision, options, output, skips, summary, memory)
    # Checks and atomic (fsynced) writes run on one writer thread, in order, while the VAE encodes the next batch;
    # at most a few batches of results wait there, so memory stays bounded.
    pending: deque[Future[None]] = deque()
    with (
        progress_bar("cache", sum(len(b) for b in mine)) as advance,
        torch.inference_mode(),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtool-write") as write_pool,
    ):
        for loaded in prefetch_batches(mine, options.interpolation, workers, ahead=max(2, workers)):
            for entry in loaded:
                if entry.error is not None:
                    pending.append(write_pool.submit(writer.skip, entry.item, entry.error))
            good = [entry for entry in loaded if entry.error is None]
            if good:
                mean, std = _encode(vae_module, good, options.flip_aug, device, dtype)
                for i, entry in enumerate(good):
                    pending.append(write_pool.submit(writer.write, entry, mean, std, i, len(good)))
            while len(pending) > 4 * options.batch_size:
                pending.popleft().result()  # re-raises a failed write here
            advance(len(loaded))
        while pending:
            pending.popleft().result()
    if shared:
        summary = ranks.gather(summary, output, skips, main_output, main_skips)
    return summary


def _select_work(
    items: list[CacheItem],
    cache_dir: Path,
    fingerprint: str | None,
    options: CacheOptions,
    output: Output,
    summary: CacheSummary,
) -> list[CacheItem]:
    """Items whose entry is missing or stale (all with --overwrite); up-to-date ones are reported as kept."""
    if options.overwrite:
        return list(items)
    todo = []
    for item in items:
        st = entry_status(
            item,
            fmt=options.fmt,
            cache_dir=cache_dir,
            vae=fingerprint,
            flip_aug=options.flip_aug,
            interpolation=options.interpolation,
            precision=options.precision,
            kohya_suffix=options.kohya_suffix,
        )
        if st.status == "ok" and fingerprint is not None:
            summary.kept += 1
            output.record({"path": str(item.image_path), "status": "kept", "latents": str(st.cache_path)})
        else:
            if st.status == "stale":
                debug(f"re-encoding {item.image_path}: {st.reason}")
            todo.append(item)
    return todo


def _drop_npz_collisions(
    items: list[CacheItem], suffix: KohyaSuffix, output: Output, summary: CacheSummary, skips: SkipReporter
) -> list[CacheItem]:
    """kohya names drop the extension: of two images that would share an npz file, the second is skipped."""
    owners: dict[Path, Path] = {}
    kept = []
    for item in items:
        npz = kohya_npz_path(item.image_path, item.placement.original_size, suffix)
        owner = owners.setdefault(npz, item.image_path)
        if owner != item.image_path:
            reason = f"its kohya cache name {npz.name} is taken by {owner.name} (use --format sdtool)"
            skips.skip(item.image_path, reason)
            output.record({"path": str(item.image_path), "status": "skipped", "reason": reason})
            summary.skipped += 1
            continue
        kept.append(item)
    return kept


def _warn_about_legacy_npz(items: list[CacheItem]) -> None:
    """kohya's scripts read an old `<stem>.npz` beside an image before any `_WxH_sd(xl).npz`: say so."""
    from sdtool.cache.kohya_npz import kohya_legacy_npz_path
    from sdtool.console import warn

    legacy = [path for path in (kohya_legacy_npz_path(item.image_path) for item in items) if path.is_file()]
    if legacy:
        more = f" and {len(legacy) - 1} more" if len(legacy) > 1 else ""
        warn(
            f"{legacy[0]}{more}: an old-style <stem>.npz beside the image; kohya's scripts read that file instead "
            "of the one written now (remove it to let them use the new one)"
        )


def _encode(vae: Any, batch: list[Loaded], flip: bool, device: Any, dtype: Any) -> tuple[Any, Any]:
    """Posterior mean and std (float32, CPU) of a one-bucket batch; with `flip` the mirrored crops follow."""
    import torch

    from sdtool.cache.pixels import to_tensor

    tensors = [to_tensor(e.pixels) for e in batch]
    if flip:
        tensors += [to_tensor(e.pixels, flip=True) for e in batch]
    x = torch.stack(tensors).to(device=device, dtype=dtype)
    dist = vae.encode(x).latent_dist
    return dist.mean.float().cpu().contiguous(), dist.std.float().cpu().contiguous()


class _EntryWriter:
    """Checks each encoded entry and writes it atomically in the chosen format; reports every outcome."""

    def __init__(
        self,
        cache_dir: Path,
        fingerprint: str,
        vae_source: str,
        precision: str,
        options: CacheOptions,
        output: Output,
        skips: SkipReporter,
        summary: CacheSummary,
        memory: dict[Path, CachedLatents] | None = None,
    ):
        self.memory = memory
        self.cache_dir = cache_dir
        self.fingerprint = fingerprint
        self.vae_source = vae_source
        self.precision = precision
        self.options = options
        self.output = output
        self.skips = skips
        self.summary = summary

    def skip(self, item: CacheItem, reason: str) -> None:
        self.skips.skip(item.image_path, reason)
        self.output.record({"path": str(item.image_path), "status": "skipped", "reason": reason})
        self.summary.skipped += 1

    def write(self, entry: Loaded, mean: Any, std: Any, i: int, n: int) -> None:
        import torch

        item = entry.item
        tensors = {"mean": mean[i], "std": std[i]}
        if self.options.flip_aug:
            tensors["flipped_mean"] = mean[n + i]
            tensors["flipped_std"] = std[n + i]
        bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
        if bad:
            self.summary.nonfinite += 1
            self.skip(item, f"the VAE produced NaN/inf latents ({', '.join(bad)}); not written")
            return
        assert entry.source is not None
        if self.memory is not None:
            self.memory[item.image_path] = CachedLatents(
                mean=tensors["mean"].clone(),
                std=tensors["std"].clone(),
                flipped_mean=tensors["flipped_mean"].clone() if "flipped_mean" in tensors else None,
                flipped_std=tensors["flipped_std"].clone() if "flipped_std" in tensors else None,
            )
            self.summary.written += 1
            self.skips.ok()
            return
        record = make_record(
            item.image_path,
            item.placement,
            entry.source,
            interpolation=self.options.interpolation,
            vae=self.fingerprint,
            vae_source=self.vae_source,
            dtype=self.precision,
            flip=self.options.flip_aug,
        )
        if self.options.fmt == "sdtool":
            path = write_native_entry(native_entry_path(item.image_path, self.cache_dir), tensors, record)
        else:
            path = self._write_kohya(item, tensors, record)
        self.summary.written += 1
        self.skips.ok()
        self.output.path(path)
        self.output.record({"path": str(item.image_path), "status": "written", "latents": str(path)})

    def _write_kohya(self, item: CacheItem, tensors: dict[str, Any], record: dict[str, Any]) -> Path:
        """kohya files hold one posterior sample, drawn with a per-image seed so reruns write the same file."""
        import torch

        gen = torch.Generator().manual_seed(_image_seed(item.image_path))

        def draw(mean: Any, std: Any) -> Any:
            return (mean + std * torch.randn(mean.shape, generator=gen, dtype=mean.dtype)).numpy()

        latents = draw(tensors["mean"], tensors["std"])
        flipped = draw(tensors["flipped_mean"], tensors["flipped_std"]) if "flipped_mean" in tensors else None
        p = item.placement
        return write_kohya_npz(
            kohya_npz_path(item.image_path, p.original_size, self.options.kohya_suffix),
            latents,
            original_size=p.original_size,
            # kohya's meaning of the field (its own readers, SDXL's micro-conditioning, expect it); sdtool's real
            # crop stays in the record.
            crop_ltrb=kohya_crop_ltrb(p.bucket, p.original_size),
            latents_flipped=flipped,
            record=record,
        )
