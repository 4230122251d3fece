"""Small runtime helpers every command shares: devices, dtypes, and quieting third-party chatter.

Importing this module is cheap; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sdtool.console import debug_enabled
from sdtool.errors import UsageError

_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "no": "float32"}


def quiet_third_party() -> None:
    """Keep library log spam off stderr unless `-v`: stderr is for sdtool's own messages.

    Call before importing transformers/diffusers/bitsandbytes (the env vars are read at import time).
    """
    if debug_enabled():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("bitsandbytes", "transformers", "diffusers", "accelerate", "huggingface_hub", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity mask (taskset, cgroup cpusets), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def resolve_device(device: str = "auto") -> Any:
    """`auto` → cuda when available, else mps, else cpu; `cuda` without CUDA is an error, not a fallback."""
    import torch

    d = device.lower()
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine", hint="use --device cpu")
        index = int(d.split(":", 1)[1]) if ":" in d else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(d)


def torch_dtype(precision: str) -> Any:
    """fp32/fp16/bf16 (or accelerate's `no`) → torch dtype."""
    import torch

    try:
        return getattr(torch, _PRECISIONS[precision.lower()])
    except KeyError as exc:
        raise UsageError(f"unknown precision {precision!r}", hint="use fp32, fp16 or bf16") from exc
