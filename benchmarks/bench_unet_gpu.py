"""Training step time, images/s, peak VRAM and model FLOP utilisation of an SD1.5-shaped U-Net on a CUDA GPU.

The U-Net is built from the real SD1.5 `UNet2DConditionModel` config (320/640/1280/1280 channels, cross-attention
768, 8 heads, 2 layers per block) with random weights; nothing is downloaded. One training step is what a full
fine-tune does per batch: noise-prediction MSE on random 64×64 latents (512² images) and random 77×768 text
states, backward, AdamW8bit (bitsandbytes) step, with diffusers' gradient checkpointing and SDPA attention.

Precision: the parameters, gradients and optimizer master copy stay fp32 and the step runs under
`torch.autocast(fp16 | bf16)` (fp16 with a GradScaler), the usual mixed-precision recipe for full fine-tuning.

FLOPs: the forward pass is counted once with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention, with SDPA's math path so that attention is counted on any device). A training step is taken as
3 × forward (forward + backward at twice the forward) for the model FLOP utilisation (MFU), and as
4 × forward for the hardware FLOP utilisation (HFU), which adds the forward that gradient checkpointing recomputes.
Both are divided by the step time and the GPU's peak dense fp16/bf16 tensor TFLOP/s from `PEAK_TFLOPS`; on an
unknown GPU only the achieved TFLOP/s is printed.

    python benchmarks/bench_unet_gpu.py [--quick] [--batch-sizes 1,8] [--precisions fp16,bf16] [--json]
    python benchmarks/bench_unet_gpu.py --cpu-smoke     # one tiny step on CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import BenchResult, machine, report, sd15_config, unavailable  # noqa: E402

# Peak dense (no sparsity) fp16/bf16 tensor-core TFLOP/s by device name, first match wins (the more specific
# names come first). Consumer cards are listed at fp32 accumulation, which is what autocast matmuls use.
PEAK_TFLOPS: list[tuple[str, float, str]] = [
    (r"H100.*PCIe", 756.0, "H100 PCIe"),
    (r"H100 NVL", 835.0, "H100 NVL"),
    (r"H100", 989.0, "H100 SXM"),
    (r"H200 NVL", 835.0, "H200 NVL"),
    (r"H200", 989.0, "H200 SXM"),
    (r"A100", 312.0, "A100"),
    (r"RTX 4090", 165.0, "RTX 4090, fp16 with fp32 accumulation"),
    (r"\bL4\b", 121.0, "L4"),
]

LATENT_CHANNELS = 4
TEXT_TOKENS = 77


def sd15_unet_config() -> dict[str, Any]:
    """The SD1.5 U-Net config sdtool ships (runwayml/stable-diffusion-v1-5 unet/config.json), for 512² images."""
    return sd15_config("unet")


def tiny_unet_config() -> dict[str, Any]:
    """An SD-shaped U-Net small enough for a CPU test: two levels, 32/64 channels, cross-attention 32."""
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=32,
        attention_head_dim=2,
    )


def peak_tflops(device_name: str) -> tuple[float, str] | None:
    """The GPU's peak dense fp16/bf16 TFLOP/s and the entry that matched, or None for a GPU not in the table."""
    for pattern, tflops, label in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, label
    return None


def build_unet(config: dict[str, Any], device: Any, checkpointing: bool = True) -> Any:
    """A randomly initialised fp32 U-Net from `config` on `device`, in training mode, with SDPA attention."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**config)
    unet = unet.to(device)
    unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def make_inputs(config: dict[str, Any], batch: int, latent: int, device: Any) -> dict[str, Any]:
    """Random latents, timesteps, text states and noise target, created once so the timed steps only train."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (batch, LATENT_CHANNELS, latent, latent)
    return {
        "sample": torch.randn(shape, generator=g).to(device),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=g).to(device),
        "target": torch.randn(shape, generator=g).to(device),
    }


def count_forward_flops(unet: Any, inputs: dict[str, Any], precision: str) -> int:
    """FLOPs of one forward pass on `inputs`, counted by FlopCounterMode (attention via SDPA's math path)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    amp = _amp_dtype(precision)
    device_type = inputs["sample"].device.type
    # The fused SDPA kernels are only counted on CUDA; the math path is plain matmuls, counted everywhere, and
    # does the same multiply-adds.
    with (
        torch.no_grad(),
        sdpa_kernel(SDPBackend.MATH),
        torch.autocast(device_type, dtype=amp, enabled=amp is not None),
        FlopCounterMode(display=False) as counter,
    ):
        unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])
    return int(counter.get_total_flops())


def _amp_dtype(precision: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def make_optimizer(params: Any, name: str) -> Any:
    """AdamW8bit from bitsandbytes (what low-VRAM fine-tunes use) or torch's AdamW."""
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    raise ValueError(f"unknown optimizer {name!r}")


def train_step(unet: Any, inputs: dict[str, Any], opt: Any, scaler: Any, amp: Any) -> None:
    """One fine-tuning step: noise-prediction MSE under autocast, (scaled) backward, optimizer step."""
    import torch

    with torch.autocast(inputs["sample"].device.type, dtype=amp, enabled=amp is not None):
        pred = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    loss = torch.nn.functional.mse_loss(pred.float(), inputs["target"])
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def measure(
    config: dict[str, Any],
    batch: int,
    latent: int,
    precision: str,
    device: Any,
    steps: int = 20,
    warmup: int = 5,
    optimizer: str = "adamw8bit",
    checkpointing: bool = True,
) -> dict[str, Any]:
    """Time `steps` training steps after `warmup` ones; return step time, images/s, peak VRAM and FLOP figures."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    unet = build_unet(config, device, checkpointing)
    inputs = make_inputs(config, batch, latent, device)
    opt = make_optimizer(unet.parameters(), optimizer)
    amp = _amp_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    for _ in range(warmup):
        train_step(unet, inputs, opt, scaler, amp)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step(unet, inputs, opt, scaler, amp)
    sync()
    step_s = (time.perf_counter() - t) / steps
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    del opt
    unet.eval()
    forward = count_forward_flops(unet, inputs, precision)
    del unet, inputs
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()

    model_flops = 3 * forward
    hardware_flops = model_flops + (forward if checkpointing else 0)
    result: dict[str, Any] = {
        "batch": batch,
        "resolution": latent * 8,
        "precision": precision,
        "optimizer": optimizer,
        "checkpointing": checkpointing,
        "steps": steps,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "peak_vram_gib": peak_gib,
        "forward_gflops_per_image": forward / batch / 1e9,
        "model_tflops_per_s": model_flops / step_s / 1e12,
        "hardware_tflops_per_s": hardware_flops / step_s / 1e12,
        "mfu": None,
        "hfu": None,
    }
    if cuda:
        peak = peak_tflops(torch.cuda.get_device_name(device))
        if peak is not None:
            result["peak_tflops"], result["peak_entry"] = peak
            result["mfu"] = result["model_tflops_per_s"] / peak[0]
            result["hfu"] = result["hardware_tflops_per_s"] / peak[0]
    return result


def to_result(name: str, m: dict[str, Any]) -> BenchResult:
    """A table row: the step time, with images/s, VRAM, TFLOP/s and MFU in the note and in `extra`."""
    parts = [f"{m['images_per_s']:.2f} img/s"]
    if m["peak_vram_gib"] is not None:
        parts.append(f"peak {m['peak_vram_gib']:.2f} GiB")
    parts.append(f"{m['model_tflops_per_s']:.3g} TFLOP/s (3×fwd)")
    if m["mfu"] is not None:
        parts.append(f"MFU {m['mfu']:.1%}, HFU {m['hfu']:.1%} (4×fwd) of {m['peak_tflops']:g} TF/s")
    else:
        parts.append("MFU: peak TFLOP/s of this device not known")
    return BenchResult(name=name, ours=m["step_s"], unit="s/step", note=", ".join(parts), extra=m)


def run(
    quick: bool = False,
    batch_sizes: tuple[int, ...] = (1, 8),
    precisions: tuple[str, ...] = ("fp16", "bf16"),
    optimizer: str = "adamw8bit",
    checkpointing: bool = True,
) -> list[BenchResult]:
    """SD1.5 U-Net training steps at 512² for each batch size and precision; a 'skipped' row without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return [unavailable("unet sd1.5", "skipped: needs CUDA")]
    steps, warmup = (5, 2) if quick else (20, 5)
    results = []
    for precision in precisions:
        for batch in batch_sizes:
            name = f"unet sd1.5 512² {precision} bs{batch}"
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                results.append(unavailable(name, "skipped: this GPU has no bf16"))
                continue
            try:
                m = measure(sd15_unet_config(), batch, 64, precision, "cuda", steps, warmup, optimizer, checkpointing)
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                results.append(unavailable(name, "out of GPU memory"))
                continue
            results.append(to_result(name, m))
    return results


def cpu_smoke(config: dict[str, Any] | None = None, batch: int = 1, latent: int = 8) -> list[BenchResult]:
    """One tiny training step on CPU (bf16 autocast, AdamW8bit): exercises the script, its numbers mean nothing."""
    m = measure(config or tiny_unet_config(), batch, latent, "bf16", "cpu", steps=1, warmup=0)
    return [to_result("unet tiny (CPU smoke)", m)]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark (or the CPU smoke step) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (2 warm-up, 5 timed)")
    parser.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in _csv(s)), default=(1, 8))
    parser.add_argument("--precisions", type=_csv, default=("fp16", "bf16"), help="fp16, bf16 and/or fp32")
    parser.add_argument("--optimizer", choices=("adamw8bit", "adamw"), default="adamw8bit")
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--cpu-smoke", action="store_true", help="one tiny step on CPU to check the script")
    parser.add_argument("--json", action="store_true", help="also one JSON object per result on stdout")
    args = parser.parse_args(argv)
    bad = [p for p in args.precisions if p not in ("fp16", "bf16", "fp32")]
    if bad or not args.precisions:
        parser.error(f"--precisions: unknown {', '.join(bad) or '(none given)'}; choose from fp16, bf16, fp32")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error("--batch-sizes: give positive integers, e.g. 1,8")

    if args.cpu_smoke:
        results = cpu_smoke()
    else:
        results = run(args.quick, args.batch_sizes, args.precisions, args.optimizer, not args.no_checkpointing)
    report(results, json_lines=args.json, info=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
