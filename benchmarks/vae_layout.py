"""How far the VAE's channels-last layout moves latents on CPU, against the default layout (not a speed benchmark).

`sdtool cache` once ran the VAE channels-last on CPU for speed. This measures, for the same VAE weights and pixels,
the largest difference between the posterior means the two layouts give, on:
- the tiny test VAE (`sdtool.models.tiny`, random weights);
- an SD-sized VAE (`sdtool/models/configs/sd15/vae`) with diffusers' default initialisation;
- the same SD-sized VAE with weights of realistic statistics: He-initialised convolutions (activations keep their
  scale through the network, as in a trained VAE), GroupNorm scales and shifts spread around 1 and 0, and a
  `quant_conv` scaled so the latents have SD's spread (std ≈ 1 / 0.18215 ≈ 5.5, i.e. unit variance once scaled).
Images: a flat grey one, a smooth gradient, a gradient with fine noise, and a photo-like mix of edges and texture,
at 256x256 (and 512x512 with --full). The result is printed as a table; docs/benchmarks.md records a run.

    python benchmarks/vae_layout.py [--full] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def images(size: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    flat = np.full((size, size, 3), 128.0)
    gradient = np.stack([255 * x, 255 * y, 255 * (1 - x) * y], axis=-1)
    noisy = np.clip(gradient + rng.normal(0, 8, gradient.shape), 0, 255)
    blocks = ((np.floor(x * 8) + np.floor(y * 8)) % 2)[..., None] * np.array([200.0, 60.0, 30.0])
    photo = np.clip(
        0.6 * gradient + 0.4 * blocks + 20 * np.sin(40 * x * y)[..., None] + rng.normal(0, 3, flat.shape), 0, 255
    )
    out = {}
    for name, arr in {"flat": flat, "gradient": gradient, "noisy": noisy, "photo-like": photo}.items():
        pixels = np.round(arr).astype(np.uint8)
        out[name] = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 127.5 - 1.0
    return out


def tiny_vae():
    from diffusers import AutoencoderKL

    from sdtool.models.tiny import tiny_configs

    torch.manual_seed(0)
    return AutoencoderKL(**tiny_configs("v1")["vae"])


def sd_vae(realistic: bool):
    from diffusers import AutoencoderKL

    config = json.loads((REPO / "sdtool/models/configs/sd15/vae/config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKL(**config)
    if realistic:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for module in vae.encoder.modules():
                if isinstance(module, torch.nn.Conv2d):
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    module.weight.normal_(0, math.sqrt(2 / fan_in), generator=gen)
                    module.bias.normal_(0, 0.05, generator=gen)
                elif isinstance(module, torch.nn.GroupNorm):
                    module.weight.normal_(1, 0.2, generator=gen)
                    module.bias.normal_(0, 0.2, generator=gen)
            sample = images(256)["photo-like"]
            mean = vae.encode(sample).latent_dist.mean
            vae.quant_conv.weight[:4] *= 5.5 / float(mean.std())
            vae.quant_conv.bias[:4] *= 5.5 / float(mean.std())
            vae.quant_conv.bias[4:] = -6.0  # logvar: a posterior std of about 0.05, as in SD's VAE
    return vae.eval().requires_grad_(False)


def compare(vae, pixels: torch.Tensor) -> tuple[float, float, float]:
    """(max |latent|, max |difference| between layouts, max difference / latent std)."""
    with torch.inference_mode():
        default = vae.encode(pixels).latent_dist.mean
        last = vae.to(memory_format=torch.channels_last)
        other = last.encode(pixels.to(memory_format=torch.channels_last)).latent_dist.mean.contiguous()
        vae.to(memory_format=torch.contiguous_format)
    diff = float((default - other).abs().max())
    return float(default.abs().max()), diff, diff / float(default.std())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also 512x512 for the SD-sized VAEs")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'VAE':<28} {'image':<11} {'size':>5} {'max |latent|':>13} {'max diff':>10} {'diff / std':>11}")
    rows = [("tiny test VAE", tiny_vae(), [64, 256])]
    sizes = [256, 512] if args.full else [256]
    rows += [("SD-sized, diffusers init", sd_vae(False), sizes), ("SD-sized, realistic stats", sd_vae(True), sizes)]
    for label, vae, for_sizes in rows:
        for size in for_sizes:
            for name, pixels in images(size).items():
                top, diff, rel = compare(vae, pixels)
                print(f"{label:<28} {name:<11} {size:>5} {top:>13.4g} {diff:>10.3g} {rel:>11.3g}", flush=True)


if __name__ == "__main__":
    main()
