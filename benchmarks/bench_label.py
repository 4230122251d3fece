"""Labelling throughput: sdtool's batched, parallel-loading caption/tag pipeline vs a plain batch-1 loop.

Both sides use the same model, the same image decoding (`open_image`) and preprocessing and write the same sidecar
files; the reference does one image at a time in one process, as kohya's scripts do without a DataLoader.

    python benchmarks/bench_label.py [--images 192] [--batch-size 8] [--workers N]

Models are built offline: a small random BLIP (hidden 128, 128 px) and an ONNX tagger at WD14's 448 px input whose
convolution stack gives it real per-image compute.

`run(quick, parts)` is what `benchmarks/run_all.py` calls; it returns one `BenchResult` per part ("tag: …",
"caption: …") with images/s of sdtool against the batch-1 loop (target: ≥ 1.5×).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchResult
from sdtool.console import QUIET, Output, SkipReporter, set_verbosity
from sdtool.fsutil import atomic_write_text
from sdtool.images import list_images, open_image


def make_images(folder: Path, n: int) -> None:
    """JPEGs of a photo-like size with structure (decoding and resizing them costs what real data costs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (768, 512) if i % 2 else (512, 768)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // w, y * 255 // h, (x + y + i * 37) % 256], axis=-1).astype(np.uint8)
        noise = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(base + noise).save(folder / f"img{i:04d}.jpg", quality=92)


def best_times(reference, candidate, repeats: int) -> tuple[float, float]:
    """Warm both up once (imports, page cache, worker start-up), then the best of `repeats` alternating runs."""
    reference()
    candidate()
    ref, new = [], []
    for _ in range(repeats):
        for fn, times in ((reference, ref), (candidate, new)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(ref), min(new)


def bench_tag(
    root: Path, images: Path, batch_size: int, workers: int | None, repeats: int, conv: int
) -> tuple[float, float]:
    from sdtool.label.tagger_model import Tagger
    from sdtool.label.taggers import tag_images
    from sdtool.label.tags import TagOptions, select_tags
    from sdtool.label.tiny import save_mean_tagger, write_selected_tags

    model = root / "tagger"
    n_tags = 64
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((3, n_tags)).astype(np.float32) / 255.0
    save_mean_tagger(model / "model.onnx", weights=weights, bias=np.zeros(n_tags), size=448, conv_channels=conv)
    write_selected_tags(model / "selected_tags.csv", [(f"tag_{i}", 9 if i < 4 else 0) for i in range(n_tags)])
    options = TagOptions()
    paths = list_images([images])

    tagger = Tagger(str(model), "cpu")

    def reference() -> None:
        for path in paths:
            pixels = tagger.preprocessor(open_image(path))
            probs = tagger.predict(pixels[None])[0]
            text = options.separator.join(select_tags(probs, tagger.tags, options))
            atomic_write_text(path.with_suffix(".txt"), text + "\n")

    def sdtool_run() -> None:
        tag_images(
            [images],
            model=str(model),
            options=options,
            extension=".txt",
            overwrite=True,
            append=False,
            output_path=None,
            recursive=False,
            batch_size=batch_size,
            workers=workers,
            device="cpu",
            out=Output(False, stream=io.StringIO()),
            skips=SkipReporter(),
        )

    t_ref, t_new = best_times(reference, sdtool_run, repeats)
    return len(paths) / t_ref, len(paths) / t_new


def bench_caption(root: Path, images: Path, batch_size: int, workers: int | None, repeats: int) -> tuple[float, float]:
    import torch

    from sdtool.label.captioners import Captioner, GenerationSettings, caption_images
    from sdtool.label.tiny import save_tiny_blip

    model = save_tiny_blip(root / "blip", image_size=128, hidden=128, layers=2)
    settings = GenerationSettings(max_length=20, min_length=20)
    paths = list_images([images])
    captioner = Captioner(str(model), settings=settings, device="cpu")
    preprocess = captioner.preprocessor()

    def reference() -> None:
        torch.manual_seed(settings.seed)
        for path in paths:
            caption = captioner.caption_batch(preprocess(open_image(path)))[0]
            atomic_write_text(path.with_suffix(".caption"), caption + "\n")

    def sdtool_run() -> None:
        caption_images(
            [images],
            model=str(model),
            settings=settings,
            prompt=None,
            extension=".caption",
            overwrite=True,
            recursive=False,
            batch_size=batch_size,
            workers=workers,
            precision="fp32",
            device="cpu",
            trust_remote_code=False,
            out=Output(False, stream=io.StringIO()),
            skips=SkipReporter(),
        )

    t_ref, t_new = best_times(reference, sdtool_run, repeats)
    return len(paths) / t_ref, len(paths) / t_new


TARGET_SPEEDUP = 1.5
QUICK = {"images": 16, "caption_images": 4, "repeats": 1}
FULL = {"images": 192, "caption_images": 16, "repeats": 2}


def measure(
    parts: tuple[str, ...] = ("tag", "caption"),
    images: int = 192,
    caption_images: int = 16,
    batch_size: int = 8,
    workers: int | None = None,
    repeats: int = 2,
    tagger_conv: int = 0,
) -> dict[str, tuple[float, float]]:
    """Images/s of the batch-1 loop and of sdtool for each part in `parts`, on freshly generated JPEGs."""
    from sdtool.runtime import quiet_third_party

    quiet_third_party()
    set_verbosity(QUIET)
    rates: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with redirect_stdout(sys.stderr):
            if "tag" in parts:
                make_images(root / "images", images)
                rates["tag"] = bench_tag(root, root / "images", batch_size, workers, repeats, tagger_conv)
            if "caption" in parts:
                make_images(root / "caption-images", caption_images)
                rates["caption"] = bench_caption(root, root / "caption-images", batch_size, workers, repeats)
    return rates


def to_result(part: str, reference: float, ours: float, n_images: int, batch_size: int) -> BenchResult:
    """One part's row: images/s of sdtool against the batch-1 loop, higher is better."""
    ratio = ours / reference
    return BenchResult(
        name=f"{part}: batched vs batch-1 loop",
        ours=ours,
        reference=reference,
        ratio=ratio,
        target=f"speed-up ≥ {TARGET_SPEEDUP:g}×",
        met=ratio >= TARGET_SPEEDUP,
        unit="img/s",
        note=f"{n_images} 768x512 JPEGs, batch {batch_size}, {os.cpu_count()} CPUs",
        extra={"images": n_images},
    )


def run(quick: bool = False, parts: list[str] | None = None) -> list[BenchResult]:
    """Tag and/or caption throughput at full size (192 / 16 images, best of 2) or quick size (16 / 4, best of 1)."""
    size = QUICK if quick else FULL
    wanted = tuple(p for p in ("tag", "caption") if parts is None or p in parts)
    rates = measure(wanted, size["images"], size["caption_images"], repeats=size["repeats"])
    counts = {"tag": size["images"], "caption": size["caption_images"]}
    return [to_result(part, *rates[part], n_images=counts[part], batch_size=8) for part in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU core")
    parser.add_argument("--only", choices=("tag", "caption"), default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--caption-images", type=int, default=16, help="images for the (slower) caption part")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads for both sides (default: torch's)"
    )
    parser.add_argument(
        "--tagger-conv", type=int, default=0, help="conv channels in the tagger graph (0: light, GPU-like compute)"
    )
    args = parser.parse_args()

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    parts = ("tag", "caption") if args.only is None else (args.only,)
    rates = measure(
        parts, args.images, args.caption_images, args.batch_size, args.workers, args.repeats, args.tagger_conv
    )
    tag_ref, tag_new = rates.get("tag", (float("nan"), float("nan")))
    cap_ref, cap_new = rates.get("caption", (float("nan"), float("nan")))

    import torch

    print(
        f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}; 768x512 JPEGs: "
        f"{args.images} tagged, {args.caption_images} captioned; batch {args.batch_size}, workers {args.workers}"
    )
    print(f"{'':8} {'batch-1 loop':>14} {'sdtool':>10} {'ratio':>7}")
    print(f"{'tag':8} {tag_ref:11.1f}/s {tag_new:7.1f}/s {tag_new / tag_ref:6.2f}x")
    print(f"{'caption':8} {cap_ref:11.1f}/s {cap_new:7.1f}/s {cap_new / cap_ref:6.2f}x")


if __name__ == "__main__":
    main()
