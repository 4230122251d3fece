"""What a hypernetwork costs per training step compared with the plain U-Net (diffusers' own SDPA processor).

Builds an SD-shaped U-Net (default: the tiny test U-Net; `--sd15` for SD 1.5's real shape, slow on a CPU) and
measures in the same run, on the same inputs:
- reference: a frozen U-Net forward (no grad) with diffusers' stock SDPA processors;
- sdtool: the same forward with the hypernetwork processors ([1, 2, 1], relu), the overhead when sampling;
- and a training step: that forward plus the backward into the hypernetwork.
Prints the median times and the ratios against the reference. CPU timings on a busy machine are noisy: repeat.

    python benchmarks/bench_hypernetwork.py [--sd15] [--batch 2] [--latent 32] [--repeats 5] [--device cpu]

`run(quick)` is what `benchmarks/run_all.py` calls (tiny U-Net on the CPU); it returns both ratios as
`BenchResult` rows. They have no target: they say what the hypernetwork costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchResult, sd15_config
from sdtool.train.hypernetwork.attention import apply_hypernetwork, context_widths, remove_hypernetwork
from sdtool.train.hypernetwork.network import Hypernetwork


def _unet(sd15: bool):
    from diffusers import UNet2DConditionModel

    from sdtool.models.tiny import tiny_configs

    if not sd15:
        return UNet2DConditionModel(**tiny_configs("v1")["unet"]), 32
    config = sd15_config("unet")
    return UNet2DConditionModel(**config), config["cross_attention_dim"]


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    sd15: bool = False, batch: int = 2, latent: int = 32, repeats: int = 5, device_name: str = "cpu"
) -> dict[str, float]:
    """Median seconds of the stock forward, the forward with the hypernetwork, and a hypernetwork training step."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    unet, text_width = _unet(sd15)
    unet = unet.to(device).eval().requires_grad_(False)
    latents = torch.randn(batch, 4, latent, latent, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    context = torch.randn(batch, 77, text_width, device=device)

    def reference() -> None:
        with torch.no_grad():
            unet(latents, timesteps, context)

    hypernetwork = Hypernetwork(context_widths(unet), [1, 2, 1], "relu").train()
    apply_hypernetwork(unet, hypernetwork)

    def training_step() -> None:
        hypernetwork.zero_grad(set_to_none=True)
        unet(latents, timesteps, context).sample.square().mean().backward()

    try:
        t_step = _median_seconds(training_step, repeats, device)
        hypernetwork.eval()
        t_hyper = _median_seconds(reference, repeats, device)
    finally:
        remove_hypernetwork(unet)
    t_ref = _median_seconds(reference, repeats, device)
    return {"reference_s": t_ref, "forward_s": t_hyper, "step_s": t_step}


def to_results(m: dict[str, float], sd15: bool, batch: int, latent: int, device: str) -> list[BenchResult]:
    """Two rows against the stock forward: the forward with the hypernetwork, and its training step (no target)."""
    note = f"U-Net {'SD 1.5' if sd15 else 'tiny'}, batch {batch}, latent {latent}, {device}; time / stock forward"
    return [
        BenchResult(
            name=f"hypernetwork: {label}",
            ours=m[key],
            reference=m["reference_s"],
            ratio=m[key] / m["reference_s"],
            note=note,
            extra=dict(m),
        )
        for label, key in (("forward", "forward_s"), ("training step", "step_s"))
    ]


def run(quick: bool = False) -> list[BenchResult]:
    """The tiny U-Net on the CPU, batch 2, latent 32: median of 5 repeats (quick: 3)."""
    m = measure(repeats=3 if quick else 5)
    return to_results(m, sd15=False, batch=2, latent=32, device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    m = measure(args.sd15, args.batch, args.latent, args.repeats, args.device)
    t_ref, t_hyper, t_step = m["reference_s"], m["forward_s"], m["step_s"]
    print(f"device {args.device}, U-Net {'SD 1.5' if args.sd15 else 'tiny'}, batch {args.batch}, latent {args.latent}")
    print(f"reference (stock U-Net forward):             {t_ref * 1000:9.1f} ms")
    print(f"sdtool forward with the hypernetwork:        {t_hyper * 1000:9.1f} ms  ratio {t_hyper / t_ref:.2f}")
    print(f"sdtool training step (forward + backward):   {t_step * 1000:9.1f} ms  ratio {t_step / t_ref:.2f}")


if __name__ == "__main__":
    main()
