"""Median optimizer-step time of `sdtool train` against a minimal diffusers loop doing the same work.

Both loops run on the same tiny model, images, batch size and resolution, with the same optimizer (AdamW),
gradient clipping at 1.0 and torch thread count:

- SD1 (`--model v1`): the tiny SD-v1-shaped model; load the bucketed images, sample latents from the VAE
  posterior, encode 225-token captions with clip_skip 2, add noise, U-Net forward/backward, AdamW.
- SDXL (`--model sdxl`): the tiny SDXL-shaped model on latents `sdtool cache` wrote (both loops read the same
  cache entries from disk every step and draw a sample from the stored posterior); encode 77-token captions with
  both text encoders (penultimate hidden states concatenated, the second encoder's pooled and projected
  embedding), build the size conditioning (original size, crop top-left, target size), add noise, U-Net
  forward/backward with `added_cond_kwargs`, AdamW.

Prints the ratio sdtool / plain (≤ 1.0 means no overhead).
Usage: python benchmarks/bench_train.py [--model v1|sdxl|both] [--steps 30] [--batch 4] [--rounds 2] [--workers 1]

`run(quick)` is what `benchmarks/run_all.py` calls; it returns each model's median step times and their ratio as
a `BenchResult` (target ≤ 1.00).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import BenchResult  # noqa: E402


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


def plain_loop_sdxl(model_dir: Path, meta_path: Path, cache_dir: Path, steps: int, batch: int) -> list[float]:
    """The SDXL reference: a straight diffusers/transformers loop over cached latents, no sdtool code in the step.

    Each step reads its images' cache entries (safetensors files `sdtool cache` wrote: posterior mean and std,
    unscaled), draws a latent sample, and conditions the U-Net as SDXL does: both encoders' penultimate states
    concatenated, the second encoder's projected pooled embedding, and (orig h, orig w, crop top, crop left,
    target h, target w) from the entry's record.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").train()
    te1 = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval().requires_grad_(False)
    te2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2")
    te2 = te2.eval().requires_grad_(False)
    tok1 = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
    sched = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    scaling = AutoencoderKL.load_config(model_dir, subfolder="vae")["scaling_factor"]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    # What never changes is read once: each entry's caption and size conditioning.
    meta = json.loads(meta_path.read_text())
    entries = []
    for path in sorted(cache_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            record = json.loads(f.metadata()["record"])
        (w, h), (left, top, _, _), (bw, bh) = record["original_size"], record["crop_ltrb"], record["bucket"]
        entries.append((path, meta[record["image"]]["caption"], [h, w, top, left, bh, bw]))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        chosen = [entries[(step * batch + i) % len(entries)] for i in range(batch)]
        cached = [load_file(str(path)) for path, _, _ in chosen]
        latents = torch.stack([c["mean"] + c["std"] * torch.randn_like(c["std"]) for c in cached]) * scaling
        captions = [caption for _, caption, _ in chosen]
        time_ids = torch.tensor([ids for _, _, ids in chosen], dtype=torch.float32)
        with torch.no_grad():
            ids1 = tok1(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
            ids2 = tok2(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids
            hidden1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
            out2 = te2(ids2, output_hidden_states=True)
            states = torch.cat([hidden1, out2.hidden_states[-2]], dim=-1)
            pooled = out2.text_embeds
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, states, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


# The keys that set each model's work apart (the rest of the config is shared).
SD1_KEYS = "max_token_length = 225\nclip_skip = 2\ncache_latents = false\n"
SDXL_KEYS = "cache_latents = true\n"


def sdtool_run(
    root: Path, model_dir: Path, meta_path: Path, steps: int, batch: int, extra: str = "", workers: int = 1
) -> list[float]:
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
optimizer_type = "AdamW"
learning_rate = 1e-4
seed = 0
max_data_loader_n_workers = {workers}
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
MODELS = ("v1", "sdxl")


def cache_latents(model_dir: Path, meta_path: Path, images: Path) -> Path:
    """`sdtool cache` on the bench images (CPU, fp32), as a user would run it; returns the cache folder."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-m", "sdtool", "-q", "cache", str(meta_path), "--model", str(model_dir)]
    args += ["--image-dir", str(images), "--device", "cpu", "--workers", "0"]
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    return meta_path.parent / f"{meta_path.stem}.latents"


def measure(
    steps: int = FULL_STEPS,
    batch: int = 4,
    threads: int = 1,
    ema: bool = False,
    model: str = "v1",
    rounds: int = 1,
    workers: int = 1,
) -> dict[str, float]:
    """Median step seconds of the plain loop and of `sdtool train`, run in turn: plain, then `rounds` times sdtool
    and plain again (all runs of each pooled), so that a machine whose load drifts weighs on both alike."""
    import torch

    from sdtool.models.tiny import save_tiny_model
    from sdtool.runtime import quiet_third_party
    from tests.train.conftest import make_dataset

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    quiet_third_party()
    # Both loops get the same intra-op threads; put back what the caller had (run_all runs more benchmarks after).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model_dir = save_tiny_model(root / f"tiny-{model}", model)  # type: ignore[arg-type]
            images, meta_path = make_dataset(root / "data", 16)
            meta = json.loads(meta_path.read_text())
            # One bucket for both loops, so the batches are the same shape.
            square = {k: v for k, v in meta.items() if v["train_resolution"] == [64, 64]}
            meta_path.write_text(json.dumps({str(images / k): v for k, v in square.items()}))
            warm = WARM_STEPS
            extra = ("use_ema = true\n" if ema else "") + (SDXL_KEYS if model == "sdxl" else SD1_KEYS)

            def plain() -> list[float]:
                if model == "sdxl":
                    return plain_loop_sdxl(model_dir, meta_path, cache_dir, steps + warm, batch)[warm:]
                return plain_loop(model_dir, meta_path, steps + warm, batch)[warm:]

            cache_dir = cache_latents(model_dir, meta_path, images) if model == "sdxl" else root
            reference, ours = plain(), []
            for _ in range(rounds):
                ours += sdtool_run(root, model_dir, meta_path, steps + warm, batch, extra, workers)[warm:]
                reference += plain()
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "steps": steps,
        "batch": batch,
        "threads": threads,
        "rounds": rounds,
        "workers": workers,
        "plain_s": statistics.median(reference),
        "sdtool_s": statistics.median(ours),
    }


def to_result(m: dict[str, float], ema: bool = False, model: str = "v1") -> BenchResult:
    """The row: sdtool's median step time against the plain loop's, ratio sdtool / plain (target ≤ 1.00)."""
    ratio = m["sdtool_s"] / m["plain_s"]
    threads = f"{int(m['threads'])} torch thread{'s' if m['threads'] != 1 else ''}"
    if model == "sdxl":
        name = "train sdxl: median step vs plain diffusers loop"
        work = "tiny SDXL model, {steps} steps, batch {batch}, 64x64, 77 tokens, both text encoders, AdamW"
        work += ", cached latents"
    else:
        name = "train: median step vs plain diffusers loop"
        work = "tiny SD-v1 model, {steps} steps, batch {batch}, 64x64, 225 tokens, clip_skip 2, AdamW"
        work += ", uncached latents"
    note = work.format(steps=int(m["steps"]), batch=int(m["batch"])) + f", {threads}"
    if m.get("rounds", 1) > 1:
        note += f", {int(m['rounds'])} rounds"
    workers = int(m.get("workers", 1))
    note += f", sdtool with {workers} data-loader worker{'s' if workers != 1 else ''}"
    return BenchResult(
        name=name,
        ours=m["sdtool_s"],
        reference=m["plain_s"],
        ratio=ratio,
        target=f"time ratio ≤ {TARGET_RATIO:.2f}",
        met=ratio <= TARGET_RATIO,
        unit="s/step",
        note=note + (", sdtool with EMA" if ema else ""),
        extra=dict(m),
    )


def run(quick: bool = False) -> list[BenchResult]:
    """The step-time comparison for SD1 and SDXL at full size (30 timed steps, two rounds) or quick size (8 steps,
    one round), batch 4."""
    steps, rounds = (QUICK_STEPS, 1) if quick else (FULL_STEPS, 2)
    return [to_result(measure(steps=steps, model=model, rounds=rounds), model=model) for model in MODELS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both")
    parser.add_argument("--steps", type=int, default=FULL_STEPS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both loops")
    parser.add_argument("--ema", action="store_true", help="sdtool keeps an EMA of the U-Net (use_ema = true)")
    parser.add_argument("--rounds", type=int, default=2, help="sdtool runs, each followed by a plain run")
    parser.add_argument("--workers", type=int, default=1, help="sdtool's max_data_loader_n_workers")
    args = parser.parse_args()

    for model in MODELS if args.model == "both" else (args.model,):
        m = measure(args.steps, args.batch, args.threads, args.ema, model, args.rounds, args.workers)
        plain, mine = m["plain_s"], m["sdtool_s"]
        row = to_result(m, args.ema, model)
        print(f"{model}: {row.note}")
        print(f"  plain diffusers loop: median {plain * 1000:.1f} ms/step")
        print(f"  sdtool train:         median {mine * 1000:.1f} ms/step")
        print(f"  ratio sdtool/plain ({model}): {mine / plain:.3f}")


if __name__ == "__main__":
    main()
