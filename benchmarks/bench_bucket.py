"""How much faster `sdtool bucket` reads a big folder than decoding every image (kohya's preparation path).

Generates N images of varied sizes and formats (JPEG, PNG, WebP, BMP, some EXIF-rotated JPEGs) in a temp folder,
then measures in the same run:
- reference: for each image `Image.open(p).convert("RGB")` and its size, one after another, as kohya's
  `prepare_buckets_latents.py` does;
- sdtool: list the folder, read every displayed size from the header in a thread pool, assign buckets, read the
  sidecars and write the metadata JSON (everything `sdtool bucket` does except printing).
Both run with the files in the page cache (written just before), which is the worst case for sdtool: on a cold
disk both wait for I/O and header reads win more. Prints the times and the ratio.

    python benchmarks/bench_bucket.py [--count 2000] [--max-side 1600] [--workers N] [--keep DIR]

`run(quick)` is what `benchmarks/run_all.py` calls; it returns the same comparison as a `BenchResult`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchResult, speedup
from sdtool.bucket.algorithm import BucketSettings
from sdtool.bucket.scan import bucket_images, metadata_fields
from sdtool.images import list_images
from sdtool.metadata import metadata_key, write_metadata

FORMATS = [("jpg", 0.5), ("png", 0.25), ("webp", 0.15), ("bmp", 0.1)]
# Reading headers must beat decoding every image; on 2 cores it is typically 20-30x (see docs/benchmarks.md).
TARGET_SPEEDUP = 20.0  # issue 4: at least 20x faster than decoding every image
QUICK_COUNT, QUICK_MAX_SIDE = 300, 1024


def _make(args: tuple[Path, int, int, str, int, int]) -> None:
    path, w, h, fmt, seed, orientation = args
    # Gradients with a little texture: quick to encode, and Pillow decodes them at its usual speed.
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    r = np.broadcast_to(x, (h, w))
    g = np.broadcast_to(y, (h, w))
    b = (np.sin(x / 7 + seed) * np.cos(y / 5) * 60 + 128).astype(np.float32)
    img = Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8))
    if fmt == "jpg":
        kwargs = {"quality": 90}
        if orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kwargs["exif"] = exif.tobytes()
        img.save(path, **kwargs)
    elif fmt == "webp":
        img.save(path, quality=80, method=0)
    elif fmt == "png":
        img.save(path, compress_level=1)
    else:
        img.save(path)
    if seed % 3 == 0:
        path.with_suffix(".caption").write_text(f"image number {seed}\n", encoding="utf-8")


def generate(folder: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    names, weights = zip(*FORMATS, strict=True)
    jobs = []
    for i in range(count):
        fmt = rng.choices(names, weights)[0]
        w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        orientation = rng.choice([1, 1, 1, 6, 8]) if fmt == "jpg" else 1
        jobs.append((folder / f"img_{i:05d}.{fmt}", w, h, fmt, i, orientation))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_make, jobs, chunksize=16))


def reference(paths: list[Path]) -> list[tuple[int, int]]:
    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.convert("RGB").size)
    return sizes


def sdtool_bucket(folder: Path, out: Path, workers: int | None) -> int:
    settings = BucketSettings()
    paths = list_images([folder])
    scan = bucket_images(paths, settings, workers=workers)
    write_metadata(out, {metadata_key(i.path, None, False): metadata_fields(i, settings) for i in scan.images})
    return len(scan.images)


def measure(
    count: int = 2000, min_side: int = 256, max_side: int = 1600, workers: int | None = None, keep: Path | None = None
) -> dict[str, float]:
    """Generate (or reuse) the images, then time sdtool's bucketing and the decode-everything reference."""
    with tempfile.TemporaryDirectory(prefix="bench_bucket_") as tmp:
        folder = keep or Path(tmp) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if len(list_images([folder])) < count:
            t = time.perf_counter()
            generate(folder, count, min_side, max_side)
            print(f"generated {count} images in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        paths = list_images([folder])

        # Load Pillow's plugins once so that neither side pays for it, then take the median of three sdtool runs
        # (the reference is long enough to be stable in one run).
        with Image.open(paths[0]) as img:
            img.convert("RGB")
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            n = sdtool_bucket(folder, Path(tmp) / "meta.json", workers)
            runs.append(time.perf_counter() - t)
        ours = statistics.median(runs)

        t = time.perf_counter()
        ref_sizes = reference(paths)
        ref = time.perf_counter() - t
    return {"images": len(ref_sizes), "bucketed": n, "reference_s": ref, "sdtool_s": ours}


def to_result(m: dict[str, float]) -> BenchResult:
    """The measurement as a table row: sdtool's time against the decode-everything reference."""
    result = speedup(
        "bucket: headers vs decode",
        m["sdtool_s"],
        m["reference_s"],
        at_least=TARGET_SPEEDUP,
        note=f"{int(m['images'])} mixed images, files warm, {os.cpu_count()} CPUs",
    )
    result.extra = {"images": int(m["images"]), "ms_per_image_sdtool": m["sdtool_s"] / m["images"] * 1e3}
    return result


def run(quick: bool = False) -> list[BenchResult]:
    """The bucket comparison at full size (2,000 images up to 1600 px) or quick size (300 up to 1024 px)."""
    return [to_result(measure(count=QUICK_COUNT, max_side=QUICK_MAX_SIDE) if quick else measure())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=1600)
    parser.add_argument("--workers", type=int, default=None, help="sdtool's header readers (default: its default)")
    parser.add_argument("--keep", type=Path, default=None, help="generate into (or reuse) this folder")
    args = parser.parse_args()

    m = measure(args.count, args.min_side, args.max_side, args.workers, args.keep)
    images, n, ref, ours = int(m["images"]), int(m["bucketed"]), m["reference_s"], m["sdtool_s"]
    print(f"images: {images} ({n} bucketed), CPUs: {os.cpu_count()}")
    print(f"reference (decode each with Pillow, sequential): {ref:.3f} s  ({ref / images * 1e3:.2f} ms/image)")
    print(f"sdtool bucket (headers, threads, metadata written): {ours:.3f} s  ({ours / n * 1e3:.3f} ms/image)")
    print(f"speed-up: {ref / ours:.1f}x")


if __name__ == "__main__":
    main()
