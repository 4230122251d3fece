"""Hypernetwork training (issue 12): the pieces the fine-tuning recipe needs when `train_hypernetwork = true`.

The U-Net and text encoder stay frozen; `attention.apply_hypernetwork` puts the hypernetwork's MLPs into
the U-Net's attention, so gradients flow through the frozen U-Net (gradient checkpointing included) into the
hypernetwork only. Accelerate prepares a `HypernetworkDenoiser`: a module whose only submodule is the hypernetwork
and whose forward calls the U-Net, so that DDP synchronises the hypernetwork's gradients (its hooks need the forward
to pass through the wrapper) while state folders hold the hypernetwork and not a copy of the frozen U-Net.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from sdtool.errors import ConfigError
from sdtool.train.hypernetwork.attention import apply_hypernetwork
from sdtool.train.hypernetwork.network import Hypernetwork
from sdtool.train.hypernetwork.options import HypernetworkOptions, build_hypernetwork


class HypernetworkDenoiser(nn.Module):
    """The module a hypernetwork run prepares: the hypernetwork as its one submodule, the frozen U-Net called by it."""

    frozen_unet: nn.Module

    def __init__(self, unet: nn.Module, hypernetwork: Hypernetwork):
        super().__init__()
        self.hypernetwork = hypernetwork
        # Not registered as a submodule: parameters(), state_dict(), .to() and DDP see the hypernetwork only.
        object.__setattr__(self, "frozen_unet", unet)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.frozen_unet(*args, **kwargs)


def options_from(t: Any) -> HypernetworkOptions:
    """The hypernetwork keys of a train config as `HypernetworkOptions` (explicitly set keys stay marked as set)."""
    given = {k: getattr(t, k) for k in HypernetworkOptions.model_fields if k in t.model_fields_set}
    return HypernetworkOptions(**{**given, "train_hypernetwork": True})


def attach_hypernetwork(t: Any, unet: nn.Module, dtype: Any) -> Hypernetwork:
    """Build (or load from `hypernetwork_weights`) the hypernetwork and install it on `unet`, in training mode.

    Call after the U-Net's attention implementation is chosen: enabling xformers afterwards would replace it.
    """
    hypernetwork = build_hypernetwork(unet, options_from(t), name=t.output_name)
    apply_hypernetwork(unet, hypernetwork, t.hypernetwork_multiplier, attention="xformers" if t.xformers else "auto")
    hypernetwork.to(dtype=dtype)
    hypernetwork.requires_grad_(True)
    hypernetwork.train()
    return hypernetwork


def checkpoint_name(source: str) -> str:
    """The model's name as A1111 records it in `sd_checkpoint_name`: a folder or file stem, or a hub id."""
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.name
    return source


def check_backend(accelerator: Any) -> None:
    """Hypernetworks train on one process or under DDP; with DeepSpeed or FSDP they are refused (not supported)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise ConfigError(
            f"train_hypernetwork is not supported with {accelerator.distributed_type.value}",
            hint="use DDP (MULTI_GPU or MULTI_CPU) in the accelerate config; a hypernetwork is small",
        )


def sampling_mode(hypernetwork: Hypernetwork | None) -> contextlib.AbstractContextManager[None]:
    """Eval mode for the hypernetwork while sampling (strength hypernetwork_multiplier), its flags back after."""
    if hypernetwork is None:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluating() -> Iterator[None]:
        modes = [(m, m.training) for m in hypernetwork.modules()]
        hypernetwork.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    return evaluating()
