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


def unet_param_groups(unet: Any, lr: float, block_lrs: list[float] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The U-Net's optimizer groups and their names: one group at `lr`, or kohya's per-block rates (`block_lr`).

    With block rates, each weight goes to the block kohya's `sdxl_train.get_block_params_to_optimize` puts its LDM
    name in (0 time/label embedding, 1-9 input blocks, 10-12 middle block, 13-21 output blocks, 22 out); a block
    at rate 0 is frozen, as kohya leaves it out of the optimizer.
    """
    params = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    if block_lrs is None:
        return [{"params": [p for _, p in params], "lr": lr}], ["unet"]
    from sdtool.models import ldm_keys

    ldm_names = ldm_keys.unet_to_ldm({name: p for name, p in params}, unet.config)
    blocks: list[list[Any]] = [[] for _ in block_lrs]
    for ldm_name, param in ldm_names.items():
        blocks[_kohya_block(ldm_name.removeprefix(ldm_keys.UNET_PREFIX))].append(param)
    groups, names = [], []
    for index, (rate, members) in enumerate(zip(block_lrs, blocks, strict=True)):
        if rate == 0:
            for param in members:
                param.requires_grad_(False)
        elif members:
            groups.append({"params": members, "lr": rate})
            names.append(f"block{index}")
    return groups, names


def _kohya_block(name: str) -> int:
    if name.startswith(("time_embed.", "label_emb.")):
        return 0
    for prefix, first in (("input_blocks.", 1), ("middle_block.", 10), ("output_blocks.", 13)):
        if name.startswith(prefix):
            return first + int(name.split(".")[1])
    if name.startswith("out."):
        return 22
    raise ValueError(f"U-Net weight {name} belongs to no block of kohya's block_lr")


def fuse_backward(optimizer: Any, max_grad_norm: float) -> None:
    """kohya's `fused_backward_pass`: each weight takes its optimizer step as soon as its gradient is complete,
    then drops the gradient, so the model's gradients never exist all at once (SDXL on 24 GB with Adafactor).

    PyTorch's own recipe (post-accumulate-grad hooks); each step runs the optimizer over that one weight with its
    group's current settings (the schedule keeps changing the group's rate). Clipping is per weight, as in kohya:
    a global norm would need every gradient at once. `optimizer` may be accelerate's wrapper.
    """
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)

    def step_one(param: Any, group: dict[str, Any]) -> None:
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
        groups = inner.param_groups
        inner.param_groups = [{**group, "params": [param]}]
        try:
            inner.step()
        finally:
            inner.param_groups = groups
        param.grad = None

    for group in inner.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(lambda p, g=group: step_one(p, g))


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
