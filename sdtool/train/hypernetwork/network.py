"""A hypernetwork: for every context width the U-Net's attention sees, a pair of MLPs `(k, v)`; its A1111 `.pt` file.

The `.pt` file is a plain dict (`torch.load(weights_only=True)` reads it):
`{width: [k state dict, v state dict], …, "layer_structure", "activation_func", "is_layer_norm",
"weight_initialization", "use_dropout", "dropout_structure", "last_layer_dropout", "activate_output", "step",
"name", "sd_checkpoint", "sd_checkpoint_name"}`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtool.errors import ConfigError, InputError
from sdtool.models.torch_file import save_torch_file
from sdtool.train.hypernetwork.structure import (
    DEFAULT_LAYER_STRUCTURE,
    WEIGHT_INITS,
    HypernetworkModule,
    a1111_dropout_structure,
    activation_problem,
    dropout_structure,
    dropout_structure_problem,
    layer_structure_problem,
    plain_number,
)

# Metadata keys of the file format (everything that is not an integer width).
_META_KEYS = (
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "activate_output",
    "step",
    "name",
    "sd_checkpoint",
    "sd_checkpoint_name",
)


# NovelAI's original files named the two layers linear1/linear2; A1111 renames them on load.
_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


class Hypernetwork(nn.Module):
    """A `(k, v)` pair of `HypernetworkModule`s per context width, with A1111's metadata; saves and loads `.pt`.

    It is an `nn.Module` so that `parameters()`, `train()`/`eval()`, `.to()`, `requires_grad_()` and accelerate's
    state saving work; its own `state_dict()` keys are `pairs.<width>.<0|1>.linear.N.*` (for resumable training
    state), while `save`/`load` use A1111's file format.
    """

    def __init__(
        self,
        widths: Iterable[int],
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation: str | None = "linear",
        layer_norm: bool = False,
        dropout: float | Sequence[float] = 0.0,
        *,
        weight_init: str = "Normal",
        activate_output: bool = False,
        name: str | None = None,
        step: int = 0,
        sd_checkpoint: str | None = None,
        sd_checkpoint_name: str | None = None,
    ):
        super().__init__()
        widths = sorted({int(w) for w in widths})
        if not widths or any(w <= 0 for w in widths):
            raise ConfigError(f"a hypernetwork needs at least one positive context width, got {widths}")
        problem = layer_structure_problem(layer_structure)
        if problem:  # checked before dropout_structure, which needs a valid length
            raise ConfigError(problem)
        self.layer_structure = [plain_number(x) for x in layer_structure]
        self.activation = activation
        self.layer_norm = bool(layer_norm)
        self.dropout_structure = dropout_structure(layer_structure, dropout)
        self.weight_init = weight_init
        self.activate_output = bool(activate_output)
        self.name = name
        self.step = int(step)
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name

        def make(width: int) -> HypernetworkModule:
            return HypernetworkModule(
                width,
                self.layer_structure,
                activation,
                self.layer_norm,
                self.dropout_structure,
                weight_init=weight_init,
                activate_output=self.activate_output,
            )

        self.pairs = nn.ModuleDict({str(w): nn.ModuleList([make(w), make(w)]) for w in widths})

    @property
    def widths(self) -> list[int]:
        """The context widths this hypernetwork has a (k, v) pair for, ascending."""
        return sorted(int(w) for w in self.pairs)

    def pair(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """The (k, v) modules for a context width, or None when this hypernetwork has none for it."""
        if str(width) not in self.pairs:
            return None
        modules: Any = self.pairs[str(width)]
        return modules[0], modules[1]

    def set_multiplier(self, multiplier: float) -> Hypernetwork:
        """Set the strength used in eval mode (sampling); training mode always uses 1."""
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = float(multiplier)
        return self

    @property
    def use_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_structure)

    def file_dict(self) -> dict[str, Any] | dict[Any, Any]:
        """The A1111 `.pt` content: integer widths → [k, v] state dicts, plus metadata (plain, weights_only-safe)."""
        data: dict[Any, Any] = {}
        for width in self.widths:
            k, v = self.pair(width)  # type: ignore[misc]
            data[width] = [_plain_state_dict(k), _plain_state_dict(v)]
        data.update(
            layer_structure=list(self.layer_structure),
            # A1111 reads None as "linear", ComfyUI refuses None: "linear" is what both load.
            activation_func=self.activation or "linear",
            is_layer_norm=self.layer_norm,
            weight_initialization=self.weight_init,
            use_dropout=self.use_dropout,
            dropout_structure=list(self.dropout_structure),
            # A1111 derives this from the structure on save; it only matters for files without a structure.
            last_layer_dropout=self.dropout_structure[-2] != 0,
            # Written explicitly: A1111 assumes True when the key is missing (NovelAI-era files).
            activate_output=self.activate_output,
            step=self.step,
            name=self.name,
            sd_checkpoint=self.sd_checkpoint,
            sd_checkpoint_name=self.sd_checkpoint_name,
        )
        return data

    def save(
        self,
        path: str | Path,
        step: int | None = None,
        name: str | None = None,
        sd_checkpoint_name: str | None = None,
        sd_checkpoint: str | None = None,
    ) -> Path:
        """Write the A1111 `.pt` file atomically; given `step`/`name`/checkpoint fields update this object first."""
        path = Path(path)
        if step is not None:
            self.step = int(step)
        if name is not None:
            self.name = name
        elif self.name is None:
            self.name = path.stem
        if sd_checkpoint_name is not None:
            self.sd_checkpoint_name = sd_checkpoint_name
        if sd_checkpoint is not None:
            self.sd_checkpoint = sd_checkpoint
        return save_torch_file(self.file_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Hypernetwork:
        """Read an A1111/NovelAI hypernetwork `.pt` with `torch.load(weights_only=True)`, validating its structure."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no such hypernetwork file")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses anything but tensors and plain containers; a hypernetwork needs nothing more.
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if unsafe:
                raise InputError(
                    path, f"not a plain hypernetwork file: loading it would run code ({unsafe.group(1)}); refused"
                ) from e
            raise InputError(path, "cannot be read as a PyTorch file (not a pickle torch.load understands)") from e
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
            raise InputError(path, f"cannot be read as a PyTorch file ({e})") from e
        return cls.from_file_dict(data, source=path)

    @classmethod
    def from_file_dict(cls, data: Any, source: str | Path = "<hypernetwork>") -> Hypernetwork:
        """Build from the content of an A1111 `.pt` file; every structural problem is an `InputError` naming it."""

        def refuse(reason: str) -> InputError:
            return InputError(source, f"not a valid hypernetwork file: {reason}")

        if not isinstance(data, dict):
            raise refuse(f"the file holds a {type(data).__name__}, not a dict")
        width_keys = [k for k in data if isinstance(k, int) and not isinstance(k, bool)]
        if not width_keys:
            raise refuse("it has no integer width keys (e.g. 768: [k, v])")
        unknown = [k for k in data if k not in width_keys and not isinstance(k, str)]
        if unknown:
            raise refuse(f"unexpected keys {unknown[:5]}")

        layer_structure = data.get("layer_structure") or list(DEFAULT_LAYER_STRUCTURE)
        if not isinstance(layer_structure, list | tuple):
            raise refuse(f"layer_structure is a {type(layer_structure).__name__}, not a list")
        problem = layer_structure_problem(layer_structure)
        activation = data.get("activation_func")
        if activation is not None and not isinstance(activation, str):
            raise refuse(f"activation_func is a {type(activation).__name__}, not a string")
        problem = problem or activation_problem(activation)
        weight_init = data.get("weight_initialization") or "Normal"
        if problem:
            raise refuse(problem)
        # A1111's defaults for keys older files lack.
        layer_norm = bool(data.get("is_layer_norm", False))
        activate_output = bool(data.get("activate_output", True))
        structure = data.get("dropout_structure")
        if structure is None:
            structure = a1111_dropout_structure(
                layer_structure, bool(data.get("use_dropout", False)), bool(data.get("last_layer_dropout", False))
            )
        if not isinstance(structure, list | tuple):
            raise refuse(f"dropout_structure is a {type(structure).__name__}, not a list")
        problem = dropout_structure_problem(layer_structure, structure)
        if problem:
            raise refuse(problem)
        step = data.get("step") or 0
        if not isinstance(step, int):
            raise refuse(f"step is a {type(step).__name__}, not an integer")
        name, checkpoint, checkpoint_name = (data.get(k) for k in ("name", "sd_checkpoint", "sd_checkpoint_name"))

        hypernetwork = cls(
            width_keys,
            layer_structure,
            activation,
            layer_norm,
            [float(x) for x in structure],
            # The weights are replaced below; only the name is kept (A1111 ignores it when loading too).
            weight_init=weight_init if weight_init in WEIGHT_INITS else "Normal",
            activate_output=activate_output,
            name=name if isinstance(name, str) else None,
            step=step,
            sd_checkpoint=checkpoint if isinstance(checkpoint, str) else None,
            sd_checkpoint_name=checkpoint_name if isinstance(checkpoint_name, str) else None,
        )
        for width in width_keys:
            pair = data[width]
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise refuse(f"width {width} must hold a [k, v] pair of state dicts")
            for label, module, state in zip("kv", hypernetwork.pair(width), pair, strict=True):  # type: ignore[arg-type]
                problem = _load_module_state(module, state)
                if problem:
                    raise refuse(f"width {width} {label}: {problem}")
        return hypernetwork


def _plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    # A plain dict of detached CPU copies: no OrderedDict metadata, no views into live training parameters.
    return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in module.state_dict().items()}


def _load_module_state(module: HypernetworkModule, state: Any) -> str | None:
    """Load `state` into `module`; a reason string when its keys or shapes do not match the layer structure."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        return "not a state dict"
    state = {_LEGACY_KEYS.get(k, k): v for k, v in state.items()}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        return (
            "its keys do not match the layer structure, activation, layer norm and dropout it declares "
            f"({'; '.join(parts)})"
        )
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            return f"{key} is not a tensor"
        if tuple(tensor.shape) != tuple(expected[key].shape):
            return f"{key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
        if not tensor.is_floating_point():
            return f"{key} is not a floating-point tensor"
        if not torch.isfinite(tensor).all():
            return f"{key} holds NaN or inf"
    module.load_state_dict(state)
    return None
