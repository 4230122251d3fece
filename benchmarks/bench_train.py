"""Median optimizer-step time of `sdtool train` against a minimal diffusers loop doing the same work.

Both run on the same tiny SD-v1-shaped model, images, batch size and resolution: load the bucketed images (or
cached latents when the latent cache module is available), sample latents from the VAE posterior, encode
225-token captions with clip_skip 2, add noise, U-Net forward/backward, AdamW. Prints the ratio
sdtool / plain (≤ 1.0 means no overhead). Usage: python benchmarks/bench_train.py [--steps 30] [--batch 4]

`run(quick)` is what `benchmarks/run_all.py` calls; it returns the median step times and their ratio as a
`BenchResult` (target ≤ 1.00).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchResult


def plain_loop(model_dir: Path, meta_path: Path, steps: int, batch: int) -> list[float]:
    """The reference: a straight diffusers/transformers training loop, no sdtool code in the step."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdtool.cache.pixels import load_bucketed_pixels, to_tensor

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").train()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    meta = json.loads(meta_path.read_text())
    entries = list(meta.items())
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        chosen = [entries[(step * batch + i) % len(entries)] for i in range(batch)]
        pixels = torch.stack(
            [
                to_tensor(load_bucketed_pixels(path, (64, 64), tuple(e["train_resolution"]), "lanczos"))
                for path, e in chosen
            ]
        )
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            ids = tok([e["caption"] for _, e in chosen], padding="max_length", truncation=True, max_length=227)
            ids = torch.tensor(ids["input_ids"])
            chunks = torch.cat([torch.cat([ids[:, :1], ids[:, i : i + 75], ids[:, -1:]], 1) for i in (1, 76, 151)])
            out = te(chunks, output_hidden_states=True)
            h = te.final_layer_norm(out.hidden_states[-2]).reshape(batch, 3 * 77, -1)
            states = torch.cat([h[:, :1], h[:, 1:76], h[:, 78:153], h[:, 155:230], h[:, -1:]], 1)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, states).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the plain loop looks at its loss every step too
        times.append(time.perf_counter() - t0)
    return times


def sdtool_run(root: Path, model_dir: Path, meta_path: Path, steps: int, batch: int, extra: str = "") -> list[float]:
    from accelerate.state import AcceleratorState

    from sdtool.train.config import load_config
    from sdtool.train.plan import make_plan
    from sdtool.train.recipe import FineTuneRecipe

    cfg_path = root / "bench.toml"
    cfg_path.write_text(
        f"""
pretrained_model_name_or_path = "{model_dir}"
output_dir = "{root / "out"}"
save_model_as = "diffusers_safetensors"
overwrite = true
max_train_steps = {steps}
max_token_length = 225
clip_skip = 2
cache_latents = false
optimizer_type = "AdamW"
learning_rate = 1e-4
seed = 0
max_data_loader_n_workers = 1
persistent_data_loader_workers = true
{extra}
[[datasets]]
resolution = 64
batch_size = {batch}
  [[datasets.subsets]]
  image_dir = "{meta_path.parent / "images"}"
  metadata_file = "{meta_path}"
"""
    )
    cfg = load_config(cfg_path)
    recipe = FineTuneRecipe(cfg, make_plan(cfg))
    recipe.setup()
    recipe.train()
    recipe.accelerator.end_training()
    recipe.metrics.close()
    AcceleratorState._reset_state(reset_partial_state=True)
    lines = (root / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in lines]


TARGET_RATIO = 1.0
FULL_STEPS = 30
QUICK_STEPS = 8
WARM_STEPS = 3


def measure(steps: int = FULL_STEPS, batch: int = 4, threads: int = 1, ema: bool = False) -> dict[str, float]:
    """Median step seconds of the plain loop (run before and after sdtool, pooled) and of `sdtool train`."""
    import torch

    from sdtool.models.tiny import save_tiny_model
    from sdtool.runtime import quiet_third_party
    from tests.train.conftest import make_dataset

    quiet_third_party()
    # Both loops get the same intra-op threads; put back what the caller had (run_all runs more benchmarks after).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model_dir = save_tiny_model(root / "tiny-v1", "v1")
            _, meta_path = make_dataset(root / "data", 16)
            meta = json.loads(meta_path.read_text())
            # One bucket for both loops, so the batches are the same shape.
            square = {k: v for k, v in meta.items() if v["train_resolution"] == [64, 64]}
            meta_path.write_text(json.dumps({str(meta_path.parent / "images" / k): v for k, v in square.items()}))
            warm = WARM_STEPS
            plain_a = plain_loop(model_dir, meta_path, steps + warm, batch)[warm:]
            extra = "use_ema = true" if ema else ""
            ours = sdtool_run(root, model_dir, meta_path, steps + warm, batch, extra)[warm:]
            plain_b = plain_loop(model_dir, meta_path, steps + warm, batch)[warm:]
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "steps": steps,
        "batch": batch,
        "threads": threads,
        "plain_s": statistics.median(plain_a + plain_b),
        "sdtool_s": statistics.median(ours),
    }


def to_result(m: dict[str, float], ema: bool = False) -> BenchResult:
    """The row: sdtool's median step time against the plain loop's, ratio sdtool / plain (target ≤ 1.00)."""
    ratio = m["sdtool_s"] / m["plain_s"]
    return BenchResult(
        name="train: median step vs plain diffusers loop",
        ours=m["sdtool_s"],
        reference=m["plain_s"],
        ratio=ratio,
        target=f"time ratio ≤ {TARGET_RATIO:.2f}",
        met=ratio <= TARGET_RATIO,
        unit="s/step",
        note=(
            f"tiny SD-v1 model, {int(m['steps'])} steps, batch {int(m['batch'])}, 64x64, 225 tokens, clip_skip 2, "
            f"AdamW, uncached latents, {int(m['threads'])} torch thread{'s' if m['threads'] != 1 else ''}"
            + (", sdtool with EMA" if ema else "")
        ),
        extra=dict(m),
    )


def run(quick: bool = False) -> list[BenchResult]:
    """The step-time comparison at full size (30 timed steps) or quick size (8 timed steps), batch 4."""
    return [to_result(measure(steps=QUICK_STEPS if quick else FULL_STEPS))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=FULL_STEPS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops")
    parser.add_argument("--ema", action="store_true", help="sdtool keeps an EMA of the U-Net (use_ema = true)")
    args = parser.parse_args()

    m = measure(args.steps, args.batch, args.threads, args.ema)
    plain, mine = m["plain_s"], m["sdtool_s"]
    ema = ", sdtool with EMA" if args.ema else ""
    print(f"steps {args.steps}, batch {args.batch}, 64x64, 225 tokens, clip_skip 2, AdamW, uncached latents{ema}")
    print(f"plain diffusers loop: median {plain * 1000:.1f} ms/step")
    print(f"sdtool train:         median {mine * 1000:.1f} ms/step")
    print(f"ratio sdtool/plain: {mine / plain:.3f}")


if __name__ == "__main__":
    main()
