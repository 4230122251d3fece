"""Optimizers and learning-rate schedules by kohya's names, with `optimizer_args` parsed safely (never eval)."""

from __future__ import annotations

import ast
import importlib
from typing import Any

from sdtool.errors import ConfigError, MissingDependencyError


def parse_optimizer_args(items: list[str]) -> dict[str, Any]:
    """kohya's `["key=value", …]`: values are Python literals (ast.literal_eval), else plain strings."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            problems.append(f"optimizer_args: {item!r} is not key=value")
            continue
        raw = raw.strip()
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # e.g. `decouple=True` parses, `mode=fast` stays the string "fast"
    if problems:
        raise ConfigError(problems)
    return out


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, args: dict[str, Any]) -> Any:
    """The optimizer `name` (kohya's names or a dotted class path) over `param_groups`."""
    import torch

    args = dict(args)
    if name == "AdamW":
        cls: Any = torch.optim.AdamW
    elif name in ("AdamW8bit", "PagedAdamW8bit"):
        bnb = _import("bitsandbytes", name)
        cls = bnb.optim.AdamW8bit if name == "AdamW8bit" else bnb.optim.PagedAdamW8bit
    elif name == "Lion":
        cls = _import("lion_pytorch", name).Lion
    elif name == "SGDNesterov":
        # Built once, with nesterov kept (kohya builds the 8-bit variant twice and loses nesterov=True).
        args.setdefault("momentum", 0.9)
        args["nesterov"] = True
        cls = torch.optim.SGD
    elif name == "Adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate by default: kohya defaults to relative_step=True, which silently replaces the
        # configured learning rate and scheduler. Pass relative_step=True in optimizer_args to get that behaviour.
        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        args.setdefault("warmup_init", False)
        if args["relative_step"]:
            lr = None  # type: ignore[assignment]
            for group in param_groups:
                group.pop("lr", None)
        cls = Adafactor
    elif name == "Prodigy":
        cls = _import("prodigyopt", name).Prodigy
    else:
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"optimizer_type: cannot import {name!r} ({exc})") from exc
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(f"optimizer_type: {name!r} is not a torch.optim.Optimizer subclass")
    try:
        return cls(param_groups, lr=lr, **args) if lr is not None else cls(param_groups, **args)
    except TypeError as exc:
        raise ConfigError(f"optimizer_args: {name} does not accept these arguments ({exc})") from exc


def _import(module: str, needed_for: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module, f"optimizer_type = {needed_for!r}") from exc


def warmup_steps(value: int | float, total_steps: int) -> int:
    """`lr_warmup_steps` as steps: an int as is, a float < 1 as a ratio of the total."""
    return int(value * total_steps) if isinstance(value, float) else int(value)


def build_lr_scheduler(
    name: str, optimizer: Any, *, warmup: int | float, total_steps: int, num_cycles: int = 1, power: float = 1.0
) -> Any:
    """A diffusers schedule by name; stepped once per optimizer step (not per process or micro-batch)."""
    if getattr(optimizer, "defaults", {}).get("relative_step"):
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps(warmup, total_steps),
        num_training_steps=total_steps,
        num_cycles=num_cycles,
        power=power,
    )


def apply_learning_rates(optimizer: Any, scheduler: Any, rates: list[float]) -> list[tuple[int, float, float]]:
    """Make the configured base rates win over those a resumed state brought back; returns (group, old, new) changes.

    A state restores each parameter group's rate and the schedule's base rates, which would silently keep the old
    `learning_rate`. For each group whose base rate differs, the new base goes into the schedule (`base_lrs`) and the
    group (`initial_lr`), and the group's current rate is recomputed at the schedule's current position. Groups
    whose rate did not change are left untouched, so an unchanged resume stays bit-exact.
    """
    changes = []
    for index, (group, new) in enumerate(zip(optimizer.param_groups, rates, strict=True)):
        old = scheduler.base_lrs[index]
        if old == new:
            continue
        scheduler.base_lrs[index] = new
        group["initial_lr"] = new
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None:  # LambdaLR (every diffusers schedule): rate = base × factor(position)
            group["lr"] = new * lambdas[index](scheduler.last_epoch)
        else:
            group["lr"] = group["lr"] * new / old if old else new
        last = getattr(scheduler, "_last_lr", None)
        if last is not None:
            last[index] = group["lr"]
        changes.append((index, float(old), float(new)))
    return changes
