"""What validation costs: the time of the periodic validation passes against the training they interrupt.

A validation pass measures every validation image at every fixed timestep, forward only, so on V validation images
every N steps of B images it should cost at most V / (B·N) of the training time (a training image takes a
forward and a backward pass and an optimizer share; a validation image takes one forward per timestep, its latents
encoded once), plus 5 % for its fixed costs (issue 22's budget). The run trains the tiny SD-v1-shaped model with
the validation images as a `validation = true` dataset beside the training images. Validation leaves training
unchanged (tests/train/test_validation_runs.py checks it bit for bit), so the reference is the run's own training
steps, timed between the validation passes: both see the same load on a shared machine.

    python benchmarks/bench_validation.py [--steps 32] [--every 8] [--batch 4] [--val-images 4] [--timesteps 4]

Prints the overhead (a pass's seconds / the seconds of the N training steps it follows), the budget
V/(B·N) + 0.05 and their ratio (≤ 1.00 means within budget). `run(quick)` is what `benchmarks/run_all.py` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchResult

SLACK = 0.05


def _run(
    root: Path,
    name: str,
    model: Path,
    train_meta: Path,
    val_meta: Path,
    steps: int,
    every: int,
    batch: int,
    timesteps: int,
) -> list[dict]:
    from accelerate.state import AcceleratorState

    from sdtool.train.config import load_config
    from sdtool.train.plan import make_plan
    from sdtool.train.recipe import FineTuneRecipe

    validation = f"""
[[datasets]]
resolution = 64
batch_size = {batch}
validation = true
  [[datasets.subsets]]
  image_dir = "{val_meta.parent / "images"}"
  metadata_file = "{val_meta}"
"""
    keys = f"validate_every_n_steps = {every}\nvalidation_timesteps = {timesteps}\n"
    config = root / f"{name}.toml"
    config.write_text(
        f"""
pretrained_model_name_or_path = "{model}"
output_dir = "{root / name}"
overwrite = true
max_train_steps = {steps}
cache_latents = false
optimizer_type = "AdamW"
learning_rate = 1e-4
seed = 0
max_data_loader_n_workers = 0
{keys}
[[datasets]]
resolution = 64
batch_size = {batch}
  [[datasets.subsets]]
  image_dir = "{train_meta.parent / "images"}"
  metadata_file = "{train_meta}"
{validation}"""
    )
    cfg = load_config(config)
    recipe = FineTuneRecipe(cfg, make_plan(cfg))
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.close()
        AcceleratorState._reset_state(reset_partial_state=True)
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def _square_dataset(folder: Path, n: int, seed: int) -> Path:
    from tests.train.conftest import make_dataset

    _, meta = make_dataset(folder, n)
    entries = {k: v for k, v in json.loads(meta.read_text()).items() if v["train_resolution"] == [64, 64]}
    meta.write_text(json.dumps(entries))
    return meta


def measure(
    steps: int = 32, every: int = 8, batch: int = 4, val_images: int = 4, timesteps: int = 4, threads: int = 1
) -> dict[str, float]:
    """Training seconds per step (reference run), validation seconds per periodic pass, and the budget."""
    import torch

    from sdtool.models.tiny import save_tiny_model
    from sdtool.runtime import quiet_third_party

    quiet_third_party()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model = save_tiny_model(root / "tiny-v1", "v1")
            train_meta = _square_dataset(root / "train", 24, 0)  # 16 square images
            val_meta = _square_dataset(root / "val", val_images * 3 // 2 + 2, 1)
            entries = json.loads(val_meta.read_text())
            val_meta.write_text(json.dumps(dict(list(entries.items())[:val_images])))
            validated = _run(root, "validated", model, train_meta, val_meta, steps, every, batch, timesteps)
    finally:
        torch.set_num_threads(previous)
    # A step's `seconds` run from the end of the step before it, so the step after a pass also counts the pass:
    # the median leaves those out.
    step_s = statistics.median(r["seconds"] for r in validated if "loss" in r)
    # The periodic passes (not the one before the first step, which also encodes the images' latents once).
    passes = [r["val_seconds"] for r in validated if "val_loss" in r and r["step"] > 0 and r["step"] % every == 0]
    val_s = statistics.median(passes)
    overhead = val_s / (every * step_s)
    budget = val_images / (batch * every) + SLACK
    first = next(r["val_seconds"] for r in validated if "val_loss" in r and r["step"] == 0)
    return {
        "steps": steps, "every": every, "batch": batch, "val_images": val_images, "timesteps": timesteps,
        "threads": threads, "step_s": step_s, "val_s": val_s, "first_val_s": first, "overhead": overhead,
        "budget": budget,
    }  # fmt: skip


def to_result(m: dict[str, float]) -> BenchResult:
    """The row: validation's share of the training time against its budget, ratio overhead / budget (≤ 1.00)."""
    ratio = m["overhead"] / m["budget"]
    return BenchResult(
        name="validation: overhead vs budget V/(B·N) + 5 %",
        ours=m["overhead"],
        reference=m["budget"],
        ratio=ratio,
        target="ratio ≤ 1.00",
        met=ratio <= 1.0,
        unit="",
        note=(
            f"tiny SD-v1 model, {int(m['val_images'])} validation images × {int(m['timesteps'])} timesteps every "
            f"{int(m['every'])} steps of batch {int(m['batch'])}, 64x64, uncached latents, "
            f"{int(m['threads'])} torch thread{'s' if m['threads'] != 1 else ''}"
        ),
        extra=dict(m),
    )


def run(quick: bool = False) -> list[BenchResult]:
    """The cost of validation at full size (32 steps) or quick size (16 steps)."""
    return [to_result(measure(steps=16 if quick else 32))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--every", type=int, default=8, help="validate_every_n_steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--val-images", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=4, help="validation_timesteps (a count)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    m = measure(args.steps, args.every, args.batch, args.val_images, args.timesteps, args.threads)
    print(
        f"{args.val_images} validation images × {args.timesteps} timesteps every {args.every} steps of batch "
        f"{args.batch}, 64x64, uncached latents"
    )
    print(f"training step:                   median {m['step_s'] * 1000:.1f} ms")
    print(
        f"validation pass:                 median {m['val_s'] * 1000:.1f} ms (first, encoding latents: "
        f"{m['first_val_s'] * 1000:.1f} ms)"
    )
    print(f"overhead (validation / training over {args.every} steps): {m['overhead']:.3f}")
    print(f"budget V/(B·N) + 0.05: {m['budget']:.3f}")
    print(f"ratio overhead / budget: {m['overhead'] / m['budget']:.3f}  (target ≤ 1.00)")


if __name__ == "__main__":
    main()
