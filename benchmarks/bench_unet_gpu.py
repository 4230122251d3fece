"""Training step time, images/s, peak VRAM and model FLOP utilisation of SD1.5- and SDXL-shaped U-Nets on a GPU.

The U-Nets are built from the real configs sdtool ships (`sdtool/models/configs/sd15` and `sdxl-base`) with
random weights; nothing is downloaded. One training step is what a full fine-tune does per batch: noise-prediction
MSE on random latents and text conditioning, backward, gradient clipping at 1.0 (`sdtool train`'s default
`max_grad_norm`), optimizer step, with diffusers' gradient checkpointing and SDPA attention.

- SD1.5: 64×64 latents (512² images), 77×768 text states; AdamW8bit (bitsandbytes); fp16 and bf16; batch 1 and 8.
- SDXL: 128×128 latents (1024² images), 77×2048 text states (both encoders' penultimate states), the 1280-wide
  pooled embedding and the size conditioning (original 1024×1024, crop 0,0, target 1024×1024), passed the way
  `sdtool train` passes them (`SDXL.unet_inputs`); bf16; batch 1 and 4; Adafactor with the fused backward pass
  (`sdtool.train.optim.fuse_backward`: each weight steps as its gradient completes, clipped per weight) and
  AdamW8bit. No text encoder or VAE is on the GPU: the step runs on cached latents and cached text-encoder
  outputs. Targets (issue 21): the fused-Adafactor step at batch 1 fits in 20 GB (peak reserved by PyTorch's
  allocator, the CUDA context left out), and the batch-4 steps reach 40 % MFU on an H100-class GPU.

Precision: the parameters, gradients and optimizer master copy stay fp32 and the step runs under
`torch.autocast(fp16 | bf16)` (fp16 with a GradScaler), the usual mixed-precision recipe for full fine-tuning
(`mixed_precision` without `full_bf16`).

FLOPs: the forward pass is counted once with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and
attention, with SDPA's math path so that attention is counted on any device; SDXL's added-conditioning embedding
is part of the forward and counted with it). A training step is taken as 3 × forward (forward + backward at twice
the forward) for the model FLOP utilisation (MFU), and as 4 × forward for the hardware FLOP utilisation (HFU),
which adds the forward that gradient checkpointing recomputes. Both are divided by the step time and the GPU's
peak dense fp16/bf16 tensor TFLOP/s from `PEAK_TFLOPS`; on an unknown GPU only the achieved TFLOP/s is printed.

    python benchmarks/bench_unet_gpu.py [--quick] [--models sd15,sdxl] [--json]
    python benchmarks/bench_unet_gpu.py --models sd15 --batch-sizes 1,8 --precisions fp16,bf16 --optimizer adamw8bit
    python benchmarks/bench_unet_gpu.py --models sdxl --sdxl-batch-sizes 1,4 --sdxl-optimizers adafactor-fused
    python benchmarks/bench_unet_gpu.py --cpu-smoke     # tiny SD and SDXL steps on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from dataclasses import dataclass
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
# The GPUs the MFU target is set for.
H100_CLASS = ("H100", "H200")

LATENT_CHANNELS = 4
TEXT_TOKENS = 77
MAX_GRAD_NORM = 1.0  # sdtool train's default max_grad_norm
OPTIMIZERS = ("adamw8bit", "adamw", "adafactor-fused")

# Issue 21's targets for the SDXL full fine-tune step at 1024², bf16, gradient checkpointing, cached latents and
# text-encoder outputs.
SDXL_VRAM_TARGET_GB = 20.0  # batch 1, fused-backward Adafactor: peak reserved memory, 10^9 bytes
SDXL_MFU_TARGET = 0.40  # batch 4, on an H100-class GPU


@dataclass(frozen=True)
class UNetSpec:
    """A U-Net to benchmark: its config, its family (which says how conditioning reaches it), its latent side."""

    name: str
    config: dict[str, Any]
    family: Any
    latent: int


def sd15_unet_config() -> dict[str, Any]:
    """The SD1.5 U-Net config sdtool ships (runwayml/stable-diffusion-v1-5 unet/config.json), for 512² images."""
    return sd15_config("unet")


def sdxl_unet_config() -> dict[str, Any]:
    """The SDXL 1.0 base U-Net config sdtool ships (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json)."""
    from sdtool.models.families.sdxl import SDXL

    config = json.loads((SDXL.config_dir(False) / "unet" / "config.json").read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if not key.startswith("_")}


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


def tiny_sdxl_unet_config() -> dict[str, Any]:
    """The tiny SDXL U-Net of the tests (`sdtool.models.tiny`): SDXL's levels and `text_time` conditioning."""
    from sdtool.models.tiny import tiny_configs

    return tiny_configs("sdxl")["unet"]


def sd15_spec() -> UNetSpec:
    from sdtool.models.families.sd1 import SD1

    return UNetSpec("sd1.5 512²", sd15_unet_config(), SD1, 64)


def sdxl_spec() -> UNetSpec:
    from sdtool.models.families.sdxl import SDXL

    return UNetSpec("sdxl 1024²", sdxl_unet_config(), SDXL, 128)


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
    with torch.device(device):  # initialised where it runs: SDXL's 2.6 B weights take minutes to fill on a CPU
        unet: Any = UNet2DConditionModel(**config)
    unet.set_attn_processor(AttnProcessor2_0())
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def make_inputs(config: dict[str, Any], batch: int, latent: int, device: Any, family: Any = None) -> dict[str, Any]:
    """Random latents, timesteps, noise target and conditioning, created once so the timed steps only train.

    `cond` holds the U-Net's keyword arguments as `family.unet_inputs` builds them from text states (and, for SDXL,
    the pooled embedding and the size conditioning of a square image at the latent's resolution).
    """
    import torch

    from sdtool.models.families.base import TextConditioning

    if family is None:
        from sdtool.models.families.sd1 import SD1

        family = SD1
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (batch, LATENT_CHANNELS, latent, latent)
    hidden = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=g).to(device)
    pooled_width = config.get("projection_class_embeddings_input_dim")
    time_ids = None
    pooled = None
    if family.needs_original_size:
        # text_embeds and six size numbers, each embedded in addition_time_embed_dim, fill the embedding's input.
        pooled_width -= 6 * config["addition_time_embed_dim"]
        pooled = torch.randn(batch, pooled_width, generator=g).to(device)
        side = float(latent * 8)
        time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * batch, device=device)
    return {
        "sample": torch.randn(shape, generator=g).to(device),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
        "cond": family.unet_inputs(TextConditioning(hidden, pooled), time_ids),
        "target": torch.randn(shape, generator=g).to(device),
    }


def count_forward_flops(unet: Any, inputs: dict[str, Any], precision: str) -> int:
    """FLOPs of one forward pass on `inputs`, counted by FlopCounterMode (attention via SDPA's math path).

    Works on the meta device too (fp32 only): a full-size U-Net is counted without memory or compute.
    """
    import contextlib

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    amp = _amp_dtype(precision)
    device_type = inputs["sample"].device.type
    autocast = torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext()
    # The fused SDPA kernels are only counted on CUDA; the math path is plain matmuls, counted everywhere, and
    # does the same multiply-adds.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), autocast, FlopCounterMode(display=False) as counter:
        unet(inputs["sample"], inputs["timestep"], **inputs["cond"])
    return int(counter.get_total_flops())


def _amp_dtype(precision: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


def make_optimizer(params: Any, name: str) -> Any:
    """AdamW8bit from bitsandbytes (what low-VRAM fine-tunes use), torch's AdamW, or `sdtool train`'s Adafactor
    with the fused backward pass (its steps then happen inside backward)."""
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5, weight_decay=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    if name == "adafactor-fused":
        from sdtool.train.optim import build_optimizer, fuse_backward

        optimizer = build_optimizer("Adafactor", [{"params": list(params), "lr": 1e-5}], 1e-5, {})
        fuse_backward(optimizer, MAX_GRAD_NORM)
        return optimizer
    raise ValueError(f"unknown optimizer {name!r}")


def train_step(unet: Any, inputs: dict[str, Any], opt: Any, scaler: Any, amp: Any, fused: bool = False) -> None:
    """One fine-tuning step: noise-prediction MSE under autocast, (scaled) backward, clipping, optimizer step.
    With `fused` the optimizer has stepped (and clipped) every weight during backward."""
    import torch

    with torch.autocast(inputs["sample"].device.type, dtype=amp, enabled=amp is not None):
        pred = unet(inputs["sample"], inputs["timestep"], **inputs["cond"]).sample
    loss = torch.nn.functional.mse_loss(pred.float(), inputs["target"])
    scaler.scale(loss).backward()
    if fused:
        return
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)
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
    family: Any = None,
) -> dict[str, Any]:
    """Time `steps` training steps after `warmup` ones; return step time, images/s, peak VRAM and FLOP figures."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    fused = optimizer == "adafactor-fused"
    if fused and precision == "fp16":
        raise ValueError("the fused backward pass cannot run with fp16 loss scaling; use bf16")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    unet = build_unet(config, device, checkpointing)
    inputs = make_inputs(config, batch, latent, device, family)
    opt = make_optimizer(unet.parameters(), optimizer)
    amp = _amp_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    for _ in range(warmup):
        train_step(unet, inputs, opt, scaler, amp, fused)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step(unet, inputs, opt, scaler, amp, fused)
    sync()
    step_s = (time.perf_counter() - t) / steps
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    reserved_gib = torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None

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
        "peak_reserved_gib": reserved_gib,
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


def sdxl_target(batch: int, optimizer: str) -> str:
    """Issue 21's target for an SDXL row ("" when the row has none)."""
    if batch == 1 and optimizer == "adafactor-fused":
        return f"peak VRAM ≤ {SDXL_VRAM_TARGET_GB:g} GB"
    if batch == 4:
        return f"MFU ≥ {SDXL_MFU_TARGET:.0%} (H100-class)"
    return ""


def to_result(name: str, m: dict[str, Any], target: str = "") -> BenchResult:
    """A table row: the step time, with images/s, VRAM, TFLOP/s and MFU in the note and in `extra`.

    With a target (SDXL's VRAM or MFU), `ratio` is the measured value over the target's and `met` says whether it
    holds; both stay empty when the quantity was not measured (no CUDA, or MFU on a GPU that is not H100-class).
    """
    parts = [f"{m['images_per_s']:.2f} img/s"]
    if m["peak_vram_gib"] is not None:
        parts.append(f"peak {m['peak_vram_gib']:.2f} GiB allocated, {m['peak_reserved_gib']:.2f} GiB reserved")
    parts.append(f"{m['model_tflops_per_s']:.3g} TFLOP/s (3×fwd)")
    if m["mfu"] is not None:
        parts.append(f"MFU {m['mfu']:.1%}, HFU {m['hfu']:.1%} (4×fwd) of {m['peak_tflops']:g} TF/s")
    else:
        parts.append("MFU: peak TFLOP/s of this device not known")
    ratio, met = None, None
    if target.startswith("peak VRAM") and m["peak_reserved_gib"] is not None:
        ratio = m["peak_reserved_gib"] * 2**30 / 1e9 / SDXL_VRAM_TARGET_GB
        met = ratio <= 1.0
    elif target.startswith("MFU") and m["mfu"] is not None and m.get("peak_entry", "").startswith(H100_CLASS):
        ratio = m["mfu"] / SDXL_MFU_TARGET
        met = ratio >= 1.0
    elif target.startswith("MFU") and m["mfu"] is not None:
        parts.append("the MFU target is for H100-class GPUs")
    return BenchResult(
        name=name, ours=m["step_s"], ratio=ratio, target=target, met=met, unit="s/step", note=", ".join(parts), extra=m
    )


def run(
    quick: bool = False,
    batch_sizes: tuple[int, ...] = (1, 8),
    precisions: tuple[str, ...] = ("fp16", "bf16"),
    optimizer: str = "adamw8bit",
    checkpointing: bool = True,
    models: tuple[str, ...] = ("sd15", "sdxl"),
    sdxl_batch_sizes: tuple[int, ...] = (1, 4),
    sdxl_optimizers: tuple[str, ...] = ("adafactor-fused", "adamw8bit"),
) -> list[BenchResult]:
    """SD1.5 steps at 512² (each batch size and precision) and SDXL steps at 1024² in bf16 (each batch size and
    optimizer); without CUDA, one 'skipped' row for SD1.5 and one per SDXL step, with its target."""
    import torch

    # (model, row name, batch, precision, optimizer, target)
    plan: list[tuple[str, str, int, str, str, str]] = []
    if "sd15" in models:
        plan += [("sd15", f"unet sd1.5 512² {p} bs{b}", b, p, optimizer, "") for p in precisions for b in batch_sizes]
    if "sdxl" in models:
        for opt in sdxl_optimizers:
            for b in sdxl_batch_sizes:
                plan.append(("sdxl", f"unet sdxl 1024² bf16 bs{b} {opt}", b, "bf16", opt, sdxl_target(b, opt)))

    if not torch.cuda.is_available():
        rows = [unavailable("unet sd1.5", "skipped: needs CUDA")] if "sd15" in models else []
        for model, name, _, _, _, target in plan:
            if model == "sdxl":
                rows.append(BenchResult(name=name, ours=None, target=target, note="skipped: needs CUDA"))
        return rows
    steps, warmup = (5, 2) if quick else (20, 5)
    specs = {"sd15": sd15_spec, "sdxl": sdxl_spec}
    results = []
    for model, name, batch, precision, opt, target in plan:
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            results.append(BenchResult(name=name, ours=None, target=target, note="skipped: this GPU has no bf16"))
            continue
        spec = specs[model]()
        try:
            m = measure(
                spec.config, batch, spec.latent, precision, "cuda", steps, warmup, opt, checkpointing, spec.family
            )
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            met = False if target.startswith("peak VRAM") else None
            results.append(BenchResult(name=name, ours=None, target=target, met=met, note="out of GPU memory"))
            continue
        results.append(to_result(name, m, target))
    return results


def cpu_smoke(
    config: dict[str, Any] | None = None,
    batch: int = 1,
    latent: int = 8,
    models: tuple[str, ...] = ("sd15", "sdxl"),
    sdxl_optimizers: tuple[str, ...] = ("adafactor-fused", "adamw8bit"),
) -> list[BenchResult]:
    """Tiny training steps on CPU (bf16 autocast): an SD-shaped U-Net with AdamW8bit, and the tiny SDXL U-Net with
    fused Adafactor and with AdamW8bit. They exercise the script; their numbers mean nothing."""
    from sdtool.models.families.sdxl import SDXL

    rows = []
    if "sd15" in models:
        m = measure(config or tiny_unet_config(), batch, latent, "bf16", "cpu", steps=1, warmup=0)
        rows.append(to_result("unet tiny (CPU smoke)", m))
    if "sdxl" in models:
        for opt in sdxl_optimizers:
            m = measure(tiny_sdxl_unet_config(), batch, latent, "bf16", "cpu", 1, 0, opt, True, SDXL)
            rows.append(to_result(f"unet tiny sdxl {opt} (CPU smoke)", m, sdxl_target(batch, opt)))
    return rows


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(text))


def main(argv: list[str] | None = None) -> int:
    """Run the GPU benchmark (or the CPU smoke steps) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (2 warm-up, 5 timed)")
    parser.add_argument("--models", type=_csv, default=("sd15", "sdxl"), help="sd15 and/or sdxl")
    parser.add_argument("--batch-sizes", type=_ints, default=(1, 8), help="SD1.5 batch sizes")
    parser.add_argument("--precisions", type=_csv, default=("fp16", "bf16"), help="SD1.5: fp16, bf16 and/or fp32")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw8bit", help="SD1.5's optimizer")
    parser.add_argument("--sdxl-batch-sizes", type=_ints, default=(1, 4))
    parser.add_argument("--sdxl-optimizers", type=_csv, default=("adafactor-fused", "adamw8bit"))
    parser.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny steps on CPU to check the script")
    parser.add_argument("--json", action="store_true", help="also one JSON object per result on stdout")
    args = parser.parse_args(argv)
    bad = [p for p in args.precisions if p not in ("fp16", "bf16", "fp32")]
    if bad or not args.precisions:
        parser.error(f"--precisions: unknown {', '.join(bad) or '(none given)'}; choose from fp16, bf16, fp32")
    for flag, sizes in (("--batch-sizes", args.batch_sizes), ("--sdxl-batch-sizes", args.sdxl_batch_sizes)):
        if not sizes or min(sizes) < 1:
            parser.error(f"{flag}: give positive integers, e.g. 1,4")
    unknown = [m for m in args.models if m not in ("sd15", "sdxl")]
    unknown += [o for o in args.sdxl_optimizers if o not in OPTIMIZERS]
    if unknown or not args.models or not args.sdxl_optimizers:
        known = f"models sd15, sdxl; optimizers {', '.join(OPTIMIZERS)}"
        parser.error(f"unknown {', '.join(unknown) or '(none given)'}; choose from {known}")
    if args.optimizer == "adafactor-fused" and "fp16" in args.precisions and "sd15" in args.models:
        parser.error("--optimizer adafactor-fused: the fused backward pass needs bf16 (no fp16 loss scaling)")

    if args.cpu_smoke:
        results = cpu_smoke(models=args.models)
    else:
        results = run(
            args.quick,
            args.batch_sizes,
            args.precisions,
            args.optimizer,
            not args.no_checkpointing,
            args.models,
            args.sdxl_batch_sizes,
            args.sdxl_optimizers,
        )
    report(results, json_lines=args.json, info=machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
