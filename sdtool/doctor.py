"""`sdtool doctor`: probe the machine instead of printing versions (CONTRACT §L).

Every check runs something small for real (a CUDA matmul, an xformers attention call, one 8-bit optimizer step …)
and reports ok / warn / fail with a detail line. Only checks marked `required` for the detected device make the
command exit 1.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sdtool.runtime import usable_cpus

Status = Literal["ok", "warn", "fail"]
LOW_DISK_BYTES = 10 * 1024**3


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    required: bool = False

    def as_json(self) -> dict[str, str]:
        d = asdict(self)
        d.pop("required")
        return d


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", "ok" if ok else "fail", f"{platform.python_version()} ({sys.executable})", required=True)


def check_versions() -> Check:
    names = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface-hub", "typer")
    versions = {n: _version(n) for n in names}
    missing = [n for n, v in versions.items() if v is None]
    detail = ", ".join(f"{n} {v}" for n, v in versions.items() if v)
    if missing:
        return Check("packages", "fail", f"missing: {', '.join(missing)}; {detail}", required=True)
    return Check("packages", "ok", detail)


def check_torch_cpu() -> Check:
    import torch

    a = torch.randn(64, 64)
    b = a @ a.T
    ok = bool(torch.isfinite(b).all())
    threads = torch.get_num_threads()
    return Check(
        "cpu",
        "ok" if ok else "fail",
        f"matmul ok, {threads} threads, {usable_cpus()} usable cores of {os.cpu_count()}",
        required=True,
    )


def check_cuda() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        build = torch.version.cuda or "CPU-only build"
        return [Check("cuda", "warn", f"no CUDA device (torch {torch.__version__}, {build}); training runs on CPU")]
    checks = []
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        try:
            x = torch.randn(256, 256, device=f"cuda:{i}")
            y = (x @ x).sum().item()
            if y != y:  # NaN
                raise RuntimeError("matmul gave NaN")
            free, total = torch.cuda.mem_get_info(i)
            checks.append(
                Check(
                    f"cuda:{i}",
                    "ok",
                    f"{name}: matmul ok, VRAM {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB",
                    required=True,
                )
            )
        except Exception as exc:
            checks.append(Check(f"cuda:{i}", "fail", f"{name}: {exc}", required=True))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(Check("bf16", "ok" if bf16 else "warn", "supported" if bf16 else "not supported: use fp16"))
    return checks


def check_xformers() -> Check:
    version = _version("xformers")
    if version is None:
        return Check("xformers", "warn", "not installed (optional: SDPA attention is used)")
    import torch

    if not torch.cuda.is_available():
        return Check("xformers", "warn", f"{version} installed, but it needs CUDA; SDPA is used on CPU")
    try:
        import xformers.ops

        q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
        out = xformers.ops.memory_efficient_attention(q, q, q)
        if not torch.isfinite(out).all():
            raise RuntimeError("attention gave non-finite values")
    except Exception as exc:
        return Check("xformers", "fail", f"{version}: attention call failed ({exc}); its build may not match torch")
    return Check("xformers", "ok", f"{version}: attention call ok")


def check_bitsandbytes() -> Check:
    version = _version("bitsandbytes")
    if version is None:
        return Check("bitsandbytes", "warn", "not installed: AdamW8bit is unavailable")
    try:
        import bitsandbytes as bnb
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        # 4096 elements: the smallest tensor bitsandbytes keeps in 8-bit state.
        p = torch.nn.Parameter(torch.randn(64, 64, device=device))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        before = p.detach().clone()
        p.sum().backward()
        opt.step()
        if torch.equal(before, p.detach()) or not torch.isfinite(p).all():
            raise RuntimeError("the step did not change the weights")
        state = opt.state[p]
        dtype = state["state1"].dtype if "state1" in state else None
        return Check("bitsandbytes", "ok", f"{version}: AdamW8bit step ok on {device} (state {dtype})")
    except Exception as exc:
        return Check("bitsandbytes", "fail", f"{version}: 8-bit optimizer step failed ({exc})")


def check_onnxruntime() -> Check:
    version = _version("onnxruntime") or _version("onnxruntime-gpu")
    if version is None:
        return Check("onnxruntime", "warn", "not installed: 'sdtool tag' is unavailable")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    detail = f"{version}: providers {', '.join(providers)}"
    import torch

    if torch.cuda.is_available() and "CUDAExecutionProvider" not in providers:
        return Check("onnxruntime", "warn", detail + " (no CUDA provider: tagging runs on CPU)")
    return Check("onnxruntime", "ok", detail)


def check_accelerate(config_file: Path | None = None) -> Check:
    """accelerate's launch configuration, the devices a multi-process run would use, and its backend's packages."""
    try:
        from accelerate.commands.config import default_config_file
    except Exception as exc:
        return Check("accelerate", "warn", f"cannot read accelerate's configuration ({exc})")
    import importlib.util

    import torch

    path = Path(config_file or default_config_file)
    status: Status = "ok"
    parts = []
    if path.is_file():
        try:
            from accelerate.commands.config.config_args import load_config_from_file

            cfg = load_config_from_file(str(path))
        except Exception as exc:
            return Check("accelerate", "warn", f"config {path} unreadable ({exc})")
        kind = str(cfg.distributed_type).rsplit(".", 1)[-1]
        parts.append(
            f"config {path}: {kind}, {cfg.num_processes} process(es) on {cfg.num_machines} machine(s), "
            f"mixed_precision {cfg.mixed_precision}"
        )
        if kind == "DEEPSPEED":
            stage = (cfg.deepspeed_config or {}).get("zero_stage")
            if importlib.util.find_spec("deepspeed") is None:
                status = "warn"
                parts.append(f"DeepSpeed (ZeRO {stage}) selected but not installed: pip install deepspeed")
            else:
                parts.append(f"DeepSpeed {_version('deepspeed')}, ZeRO stage {stage}")
    else:
        parts.append("no accelerate config: 'sdtool train --num-processes N' launches plain DDP")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        parts.append(f"{count} CUDA device(s) visible{where}: up to {count} process(es) per machine (NCCL)")
    else:
        parts.append("no CUDA device: multi-process runs use CPU processes with gloo")
    world = os.environ.get("WORLD_SIZE")
    if world:
        parts.append(f"inside a launched run: WORLD_SIZE={world}, RANK={os.environ.get('RANK', '?')}")
    return Check("accelerate", status, "; ".join(parts))


def _disk_check(name: str, folder: Path) -> Check:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free = usage.free / 2**30
    detail = f"{folder}: {free:.1f} GiB free of {usage.total / 2**30:.1f} GiB"
    return Check(name, "ok" if usage.free >= LOW_DISK_BYTES else "warn", detail)


def check_disk(output_dir: Path) -> list[Check]:
    from huggingface_hub import constants

    return [_disk_check("disk (output)", output_dir), _disk_check("disk (HF cache)", Path(constants.HF_HUB_CACHE))]


def _safely(name: str, probe: Callable[[], Any], required: bool = False) -> list[Check]:
    """A probe that crashes is a failed check, never a crashed doctor."""
    try:
        result = probe()
    except Exception as exc:
        return [Check(name, "fail", f"{type(exc).__name__}: {exc}", required=required)]
    return result if isinstance(result, list) else [result]


def run_checks(output_dir: Path | None = None) -> list[Check]:
    output_dir = output_dir or Path.cwd()
    checks: list[Check] = []
    checks += _safely("python", check_python, required=True)
    checks += _safely("packages", check_versions, required=True)
    checks += _safely("cpu", check_torch_cpu, required=True)
    checks += _safely("cuda", check_cuda, required=True)
    checks += _safely("xformers", check_xformers)
    checks += _safely("bitsandbytes", check_bitsandbytes)
    checks += _safely("onnxruntime", check_onnxruntime)
    checks += _safely("accelerate", check_accelerate)
    checks += _safely("disk", lambda: check_disk(output_dir))
    return checks


def failed_required(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.required and c.status == "fail"]
