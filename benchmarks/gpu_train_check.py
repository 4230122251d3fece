"""Short trainings of the tiny models on CUDA, one per (family, mixed precision, attention), through the CLI.

Part of `benchmarks/gpu_check.sh` (issue 23): each run is `sdtool train` for a few steps on the demo's images,
with fp16 (loss scaling) or bf16 and SDPA or xformers (when importable), gradient checkpointing and AdamW8bit.
A run passes when it exits 0, every metrics line has a finite loss and the saved file loads with safetensors.
Prints one JSON object per run and writes them all to `--out` (default gpu-train.json).

    python benchmarks/gpu_train_check.py --out $OUT/gpu-train.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """\
pretrained_model_name_or_path = "{model}"
output_dir = "{out}"
output_name = "gpu"
max_train_steps = {steps}
seed = 1
mixed_precision = "{precision}"
{attention} = true
gradient_checkpointing = true
optimizer_type = "AdamW8bit"
learning_rate = 1e-4
max_token_length = 225
max_data_loader_n_workers = 2
cache_latents = true

[[datasets]]
resolution = 128
batch_size = 4
  [[datasets.subsets]]
  image_dir = "{images}"
  metadata_file = "{meta}"
"""


def sdtool(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdtool", *map(str, args)], capture_output=True, text=True)


def attentions() -> list[str]:
    found = ["sdpa"]
    try:
        import xformers.ops  # noqa: F401

        found.append("xformers")
    except ImportError:
        pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdtool-gpu-train"))
    parser.add_argument("--out", type=Path, default=Path("gpu-train.json"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--families", default="v1,sdxl")
    parser.add_argument("--precisions", default="fp16,bf16", help="'no' runs on a CPU, to check this script")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from sdtool.demo.data import make_demo_images
    from sdtool.models.tiny import save_tiny_model
    from sdtool.runtime import quiet_third_party

    quiet_third_party()

    work = args.work
    images = work / "images"
    make_demo_images(images, count=16, sidecars=True)
    meta = work / "meta.json"
    bucket = sdtool(
        "bucket", images, "-o", meta, "--resolution", 128, "--min-bucket-reso", 64, "--max-bucket-reso", 256
    )
    if bucket.returncode:
        print(bucket.stderr, file=sys.stderr)
        return 1
    results = []
    for family in args.families.split(","):
        model = save_tiny_model(work / f"tiny-{family}", family)  # type: ignore[arg-type]
        for precision in args.precisions.split(","):
            for attention in attentions():
                name = f"{family}-{precision}-{attention}"
                out = work / name
                config = work / f"{name}.toml"
                text = CONFIG.format(
                    model=model,
                    out=out,
                    steps=args.steps,
                    precision=precision,
                    attention=attention,
                    images=images,
                    meta=meta,
                )
                config.write_text(text)
                started = time.perf_counter()
                run = sdtool("train", config)
                seconds = time.perf_counter() - started
                losses = []
                metrics = out / "metrics.jsonl"
                if metrics.is_file():
                    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
                    losses = [r["loss"] for r in lines if "loss" in r]
                saved = out / "gpu.safetensors"
                loads = False
                if saved.is_file():
                    try:
                        loads = bool(load_file(str(saved)))
                    except Exception:  # a broken file is this check's finding, not its crash
                        loads = False
                ok = run.returncode == 0 and len(losses) == args.steps and all(map(math.isfinite, losses)) and loads
                result = {
                    "run": name,
                    "ok": ok,
                    "exit": run.returncode,
                    "seconds": round(seconds, 1),
                    "losses": [round(x, 4) for x in losses],
                    "saved_loads": loads,
                    "stderr_tail": run.stderr[-1500:] if not ok else "",
                }
                print(json.dumps(result), flush=True)
                results.append(result)
    args.out.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
