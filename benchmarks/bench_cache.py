"""Benchmark `sdtool cache` against two references measured in the same run.

- sequential: a plain loop, one image at a time: load → resize/crop → VAE encode (batch 1), nothing written;
- VAE only: the same images already in memory as tensors, encoded in the same batches `sdtool cache` uses.

`sdtool cache` (run_cache with the VAE already loaded, `--overwrite`, fingerprints, checks and atomic writes
included) should be at least as fast as the sequential loop (ratio ≤ 1.0) and within 10% of the VAE alone
(ratio ≤ 1.10): loading is hidden behind the VAE. The VAE is SD-sized (SD 1.x/2.x config) with random weights,
so it costs what the real one costs; nothing is downloaded.

    python benchmarks/bench_cache.py [--images 8] [--size 768x512] [--bucket 448x320] [--batch-size 4] [--repeats 2]

`run(quick)` is what `benchmarks/run_all.py` calls; it returns the two ratios as `BenchResult` rows.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sdtool.cache.placement import plan_items

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchResult, sd15_config


def _pair(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def make_images(folder: Path, n: int, size: tuple[int, int], bucket: tuple[int, int]) -> Path:
    """n JPEGs (photo-like noise + gradients) and a bucketed metadata file, as `sdtool bucket` writes it."""
    import numpy as np
    from PIL import Image

    from sdtool.bucket.algorithm import cover_resize
    from sdtool.cache.pixels import crop_ltrb

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    resized, _ = cover_resize(size, bucket)
    meta = {}
    for i in range(n):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y + 40 * i) % 256], axis=-1).astype(np.int16)
        arr = np.clip(base + rng.integers(-30, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:03d}.jpg"
        Image.fromarray(arr).save(path, quality=92)
        meta[str(path)] = {
            "caption": "benchmark",
            "image_size": [w, h],
            "train_resolution": list(bucket),
            "resized_size": list(resized),
            "crop_ltrb": list(crop_ltrb(resized, bucket)),
        }
    meta_path = folder / "meta.json"
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta_path


def measure(
    images: int = 8,
    size: tuple[int, int] = (768, 512),
    bucket: tuple[int, int] = (448, 320),
    batch_size: int = 4,
    workers: int | None = None,
    device_name: str = "cpu",
    repeats: int = 2,
) -> dict[str, Any]:
    """Best seconds of the sequential loop, the VAE alone and `sdtool cache`, and each one's time inside the VAE."""
    from sdtool.runtime import quiet_third_party

    quiet_third_party()
    import torch
    from diffusers import AutoencoderKL

    from sdtool.cache.batches import bucket_batches
    from sdtool.cache.job import CacheOptions, run_cache
    from sdtool.cache.pixels import load_bucketed_pixels, to_tensor
    from sdtool.console import QUIET, Output, SkipReporter, set_verbosity

    device = torch.device(device_name)
    with tempfile.TemporaryDirectory(prefix="sdtool-bench-cache-") as tmp:
        root = Path(tmp)
        meta_path = make_images(root / "img", images, size, bucket)
        torch.manual_seed(0)
        vae = AutoencoderKL(**sd15_config("vae"))
        vae.save_pretrained(root / "vae", safe_serialization=True)
        vae = vae.to(device).eval().requires_grad_(False)
        items, problems = plan_items(meta_path)
        assert not problems, problems
        print(
            f"{len(items)} images {size[0]}x{size[1]} → bucket {bucket[0]}x{bucket[1]}, "
            f"SD-sized VAE on {device}, batch {batch_size}, {os.cpu_count()} CPU cores, "
            f"torch threads {torch.get_num_threads()}",
            file=sys.stderr,
        )

        # `sdtool cache` gets its own copy of the same weights: it may switch its VAE to a faster memory layout,
        # and the references must run the plain, unchanged VAE.
        cache_vae = copy.deepcopy(vae)

        # Time spent inside the VAE, per variant: what is left of a run's time is the overhead it did not hide,
        # a figure that load from other processes on the machine barely moves.
        vae_seconds = [0.0]

        def time_encode(module: Any) -> None:
            plain_encode = module.encode

            def timed_encode(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return plain_encode(*a, **kw)
                finally:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # the kernels' time, not just their launch
                    vae_seconds[0] += time.perf_counter() - t

            module.encode = timed_encode

        time_encode(vae)
        time_encode(cache_vae)

        def encode(x: torch.Tensor) -> None:
            dist = vae.encode(x.to(device)).latent_dist
            dist.mean.float().cpu(), dist.std.float().cpu()

        batches = bucket_batches(items, batch_size)
        options = CacheOptions(batch_size=batch_size, workers=workers, device=device_name, overwrite=True)

        def run_sequential() -> None:
            for item in items:
                p = item.placement
                pixels = load_bucketed_pixels(item.image_path, p.resized, p.bucket, "lanczos", p.original_size)
                encode(to_tensor(pixels)[None])

        tensors = {
            it.image_path: to_tensor(load_bucketed_pixels(it.image_path, it.placement.resized, it.placement.bucket))
            for it in items
        }

        def run_vae_only() -> None:
            for batch in batches:
                encode(torch.stack([tensors[it.image_path] for it in batch]))

        def run_sdtool_cache() -> None:
            summary = run_cache(
                meta_path,
                model=None,
                vae=str(root / "vae"),
                image_dir=None,
                options=options,
                output=Output(False, stream=io.StringIO()),
                skips=SkipReporter(),
                vae_module=cache_vae,
            )
            assert summary.written == len(items), summary

        set_verbosity(QUIET)
        runs = {"sequential": run_sequential, "vae_only": run_vae_only, "cache": run_sdtool_cache}
        best = {name: float("inf") for name in runs}
        inside = {name: 0.0 for name in runs}
        with torch.inference_mode():
            p = items[0].placement
            first = to_tensor(load_bucketed_pixels(items[0].image_path, p.resized, p.bucket))[None]
            encode(first)  # warm-up, for both VAEs
            cache_vae.encode(first.to(device=device))
        # Interleaved repeats, best of each: other load on the machine hits every variant alike.
        for _ in range(repeats):
            for name, fn in runs.items():
                vae_seconds[0] = 0.0
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn()
                took = time.perf_counter() - t0
                if took < best[name]:
                    best[name], inside[name] = took, vae_seconds[0]
        return {
            "images": len(items),
            "batch_size": batch_size,
            "device": device.type,
            **{f"{name}_s": best[name] for name in runs},
            **{f"{name}_vae_s": inside[name] for name in runs},
        }


def to_results(m: dict[str, Any], size: tuple[int, int], bucket: tuple[int, int]) -> list[BenchResult]:
    """Three rows: cache time / sequential time (target ≤ 1.00), cache time / VAE-only time (target ≤ 1.10), and
    the share of `sdtool cache`'s time spent inside the VAE (target ≥ 0.90: the VAE kept busy)."""
    note = (
        f"{int(m['images'])} images {size[0]}x{size[1]} → {bucket[0]}x{bucket[1]}, SD-sized VAE on "
        f"{m.get('device', 'cpu')}, batch {int(m['batch_size'])}, {os.cpu_count()} CPUs"
    )
    rows = []
    for name, reference, bound in (("sequential batch-1 loop", "sequential", 1.0), ("VAE only", "vae_only", 1.10)):
        ratio = m["cache_s"] / m[f"{reference}_s"]
        rows.append(
            BenchResult(
                name=f"cache: vs {name}",
                ours=m["cache_s"],
                reference=m[f"{reference}_s"],
                ratio=ratio,
                target=f"time ratio ≤ {bound:.2f}",
                met=ratio <= bound,
                note=note,
                extra={k: v for k, v in m.items() if k.endswith("_s")},
            )
        )
    busy = m["cache_vae_s"] / m["cache_s"]
    rows.append(
        BenchResult(
            name="cache: VAE busy",
            ours=busy,
            reference=None,
            ratio=busy,
            target="share of time ≥ 0.90",
            met=busy >= 0.90,
            unit="share",
            note=note,
            extra={k: v for k, v in m.items() if k.endswith("_s")},
        )
    )
    return rows


FULL_IMAGES = 8
QUICK_IMAGES = 4


def run(quick: bool = False) -> list[BenchResult]:
    """The cache comparison at full size (8 images, best of 2) or quick size (4 images, one run each)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = QUICK_IMAGES if quick else FULL_IMAGES
    m = measure(images=images, repeats=1 if quick else 2, device_name=device)
    return to_results(m, (768, 512), (448, 320))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=_pair, default=(768, 512), help="source image size WxH")
    parser.add_argument("--bucket", type=_pair, default=(448, 320), help="bucket WxH")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best time of each counts")
    args = parser.parse_args()

    m = measure(args.images, args.size, args.bucket, args.batch_size, args.workers, args.device, args.repeats)
    sequential, vae_only, cached = m["sequential_s"], m["vae_only_s"], m["cache_s"]

    print(f"sequential load→resize→encode (batch 1): {sequential:8.2f} s")
    print(f"VAE only (batch {args.batch_size}, tensors in memory):   {vae_only:8.2f} s")
    print(f"sdtool cache (batch {args.batch_size}):                  {cached:8.2f} s")
    print(f"ratio cache / sequential: {cached / sequential:.3f}  (target ≤ 1.00)")
    print(f"ratio cache / VAE only:   {cached / vae_only:.3f}  (target ≤ 1.10)")
    print(f"VAE busy during sdtool cache: {m['cache_vae_s'] / cached:.1%}  (target ≥ 90%)")
    for name, label in (("sequential", "sequential"), ("cache", "sdtool cache")):
        outside = m[f"{name}_s"] - m[f"{name}_vae_s"]
        print(f"{label}: {outside:.2f} s outside the VAE ({outside / m[f'{name}_vae_s']:.1%} of its VAE time)")


if __name__ == "__main__":
    main()
