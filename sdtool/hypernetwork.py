"""NovelAI/A1111-style hypernetworks: residual MLPs on the attention context, in A1111's `.pt` format.

A hypernetwork holds, for every context width the U-Net's attention layers see (each block's channel width for
self-attention, the text encoder width for cross-attention), a pair of small residual MLPs `(k, v)`. Attention then
computes `k = to_k(hn_k(context))` and `v = to_v(hn_v(context))` with `hn(x) = x + mlp(x)·m`; the U-Net and text
encoder stay frozen and untouched. The MLPs are laid out exactly like AUTOMATIC1111's
`modules/hypernetworks/hypernetwork.py` (`HypernetworkModule.linear`, an `nn.Sequential`) so that state-dict keys
(`linear.0.weight`, …) match: files written here load in A1111, and A1111's files load here.

Multiplier: as in A1111, a module in training mode uses 1 and a module in eval mode uses its `multiplier`. Training
therefore learns the full-strength MLP and `hypernetwork_multiplier` scales it when sampling (eval mode).

The `.pt` file is a plain dict (`torch.load(weights_only=True)` reads it):
`{width: [k state dict, v state dict], …, "layer_structure", "activation_func", "is_layer_norm",
"weight_initialization", "use_dropout", "dropout_structure", "last_layer_dropout", "activate_output", "step",
"name", "sd_checkpoint", "sd_checkpoint_name"}`.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from sdtool.errors import ConfigError, InputError, MissingDependencyError, ModelError
from sdtool.fsutil import atomic_path

# A1111's names. "swish" is Hardswish there (not SiLU): files say "swish" and A1111 builds Hardswish, so must we.
# "linear" means no activation module at all (it takes no position in the Sequential).
_A1111_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
# A1111 also accepts any `torch.nn` activation class by its lower-case name; these are the argument-free,
# element-wise ones that appear in shared hypernetwork files.
_EXTRA_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "hardtanh": nn.Hardtanh,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "tanhshrink": nn.Tanhshrink,
    "logsigmoid": nn.LogSigmoid,
    "prelu": nn.PReLU,
}
ACTIVATIONS: dict[str, type[nn.Module] | None] = {**_A1111_ACTIVATIONS, **_EXTRA_ACTIVATIONS}
"""Activation name → module class (None: no activation). The first seven are A1111's documented choices."""

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
DEFAULT_LAYER_STRUCTURE = (1, 2, 1)
DEFAULT_DROPOUT = 0.3  # A1111's probability when a file says `use_dropout` but carries no dropout structure
AttentionBackend = Literal["auto", "sdpa", "xformers"]

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


# --- structure checks (shared by the module, the file loader and the config schema) ---------------------------------


def layer_structure_problem(layer_structure: Sequence[Any]) -> str | None:
    """Why `layer_structure` is not a valid A1111 layer structure, or None when it is."""
    values = list(layer_structure)
    if len(values) < 2:
        return f"hypernetwork layer structure {values} needs at least two entries, e.g. [1, 2, 1]"
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
        return f"hypernetwork layer structure {values} must hold numbers"
    if not all(math.isfinite(x) and x > 0 for x in values):
        return f"hypernetwork layer structure {values} must hold positive numbers"
    if values[0] != 1 or values[-1] != 1:
        return f"hypernetwork layer structure {values} must start and end with 1 (the MLP maps a width to itself)"
    return None


def activation_problem(activation: str | None) -> str | None:
    """Why `activation` is not a known hypernetwork activation name, or None when it is."""
    if activation is None or activation in ACTIVATIONS:
        return None
    return f"unknown hypernetwork activation {activation!r} (choose from: {', '.join(ACTIVATIONS)})"


def dropout_structure(layer_structure: Sequence[float], dropout: float | Sequence[float]) -> list[float]:
    """The per-layer dropout list A1111 stores: a probability p → `[0, p, …, p, 0]`, a list is checked and kept.

    Entry i+1 is the dropout after layer i; the first and last entries are always 0 (no dropout on the input or the
    MLP's output), as A1111 requires.
    """
    n = len(layer_structure)
    if isinstance(dropout, bool):
        raise ConfigError(f"hypernetwork dropout must be a probability or a list of them, not {dropout}")
    if isinstance(dropout, int | float):
        if not 0 <= dropout < 1:
            raise ConfigError(f"hypernetwork dropout {dropout} must be in [0, 1)")
        return [0.0] + [float(dropout)] * (n - 2) + [0.0]
    values = [float(x) for x in dropout]
    problem = dropout_structure_problem(layer_structure, values)
    if problem:
        raise ConfigError(problem)
    return values


def dropout_structure_problem(layer_structure: Sequence[float], structure: Sequence[Any]) -> str | None:
    """Why `structure` is not a valid dropout structure for `layer_structure`, or None when it is."""
    values = list(structure)
    if len(values) != len(layer_structure):
        return (
            f"hypernetwork dropout structure {values} must have one entry per layer-structure entry "
            f"({len(layer_structure)})"
        )
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x < 1 for x in values):
        return f"hypernetwork dropout structure {values} must hold probabilities in [0, 1)"
    if values[0] != 0 or values[-1] != 0:
        return f"hypernetwork dropout structure {values} must start and end with 0"
    return None


def _a1111_dropout_structure(layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool) -> list:
    """A1111's `parse_dropout_structure`, for files that carry `use_dropout` but no `dropout_structure`."""
    if not use_dropout:
        return [0] * len(layer_structure)
    values: list[float] = [0] + [DEFAULT_DROPOUT] * (len(layer_structure) - 3)
    values.append(DEFAULT_DROPOUT if last_layer_dropout else 0)
    values.append(0)
    return values


def _plain_number(x: float) -> int | float:
    """1.0 → 1 so that saved layer structures read like A1111's ([1, 2, 1], not [1.0, 2.0, 1.0])."""
    return int(x) if float(x).is_integer() else float(x)


# --- the MLP ---------------------------------------------------------------------------------------------------------


class HypernetworkModule(nn.Module):
    """One residual MLP `x + linear(x)·m`; `linear` is laid out exactly like A1111's so state-dict keys match.

    Per layer i: `Linear(dim·ls[i], dim·ls[i+1])`, then the activation (not after the last layer unless
    `activate_output`; none for "linear"), then `LayerNorm` if `layer_norm` (after every layer, the last included),
    then `Dropout(p)` where the dropout structure's entry i+1 is above 0. `m` is 1 in training mode and
    `self.multiplier` in eval mode.
    """

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation: str | None = "linear",
        layer_norm: bool = False,
        dropout: float | Sequence[float] = 0.0,
        *,
        weight_init: str = "Normal",
        activate_output: bool = False,
    ):
        super().__init__()
        problems = [p for p in (layer_structure_problem(layer_structure), activation_problem(activation)) if p]
        if weight_init not in WEIGHT_INITS:
            choices = ", ".join(WEIGHT_INITS)
            problems.append(f"unknown hypernetwork weight init {weight_init!r} (choose from: {choices})")
        if problems:
            raise ConfigError(problems)
        dropouts = dropout_structure(layer_structure, dropout)
        activation_cls = ACTIVATIONS[activation] if activation is not None else None

        self.dim = dim
        self.multiplier = 1.0
        layers: list[nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width_out = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), width_out))
            if activation_cls is not None and (i < last or activate_output):
                layers.append(activation_cls())
            if layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropouts[i + 1] > 0:
                layers.append(nn.Dropout(p=dropouts[i + 1]))
        self.linear = nn.Sequential(*layers)
        self._initialise(weight_init, activation)

    @torch.no_grad()
    def _initialise(self, weight_init: str, activation: str | None) -> None:
        # A1111's initialisation. "Normal" draws every Linear and LayerNorm weight from N(0, 0.01) with zero biases,
        # so a fresh module's output is x plus a small perturbation (close to identity, but not exactly).
        nonlinearity: Literal["leaky_relu", "relu"] = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, nn.Linear | nn.LayerNorm):
                continue
            w, b = layer.weight, layer.bias
            if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(w, mean=0.0, std=0.01)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(w)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(w)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)
            else:
                nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiplier = 1.0 if self.training else self.multiplier
        return x + self.linear(x) * multiplier


# --- a set of (k, v) pairs, and its file format ---------------------------------------------------------------------


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
        self.layer_structure = [_plain_number(x) for x in layer_structure]
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
            activation_func=self.activation,
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
        data = self.file_dict()
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
        return path

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
            structure = _a1111_dropout_structure(
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


# --- the U-Net side: widths and attention processors ----------------------------------------------------------------


def _attention_modules(unet: nn.Module) -> Iterator[tuple[str, Any]]:
    from diffusers.models.attention_processor import Attention

    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            yield name, module


def context_widths(unet: nn.Module) -> list[int]:
    """The attention context widths of a U-Net: block channels (self-attention) and cross_attention_dim."""
    widths = {module.to_k.in_features for _, module in _attention_modules(unet)}
    if not widths:
        raise ModelError("this U-Net has no attention layers for a hypernetwork to act on")
    return sorted(widths)


def _apply_mlp(module: HypernetworkModule, context: torch.Tensor) -> torch.Tensor:
    # The MLP runs in its own dtype (usually fp32 while the U-Net is fp16), as A1111 does, and hands back the
    # U-Net's dtype.
    dtype = next(module.parameters()).dtype
    return module(context.to(dtype)).to(context.dtype)


class HypernetworkAttnProcessor:
    """Diffusers' `AttnProcessor2_0` (SDPA) with the key and value computed from `hn_k(context)`/`hn_v(context)`.

    Everything else is the stock processor's code, line for line, so that with a zero MLP the output is identical.
    `original` is the processor it replaced, restored by `remove_hypernetwork`.
    """

    def __init__(self, hn_k: HypernetworkModule, hn_v: HypernetworkModule, original: Any):
        self.hn_k = hn_k
        self.hn_v = hn_v
        self.original = original

    def _key_value(self, attn: Any, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.to_k(_apply_mlp(self.hn_k, context)), attn.to_v(_apply_mlp(self.hn_v, context))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # The steps of diffusers' processors; only the key/value context and the attention kernel differ.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, key_tokens, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = self._prepare_mask(attn, attention_mask, key_tokens, batch_size, hidden_states.shape[1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = self._key_value(attn, encoder_hidden_states)

        hidden_states = self._attend(attn, query, key, value, attention_mask, batch_size)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _prepare_mask(
        self, attn: Any, mask: torch.Tensor | None, key_tokens: int, batch_size: int, query_tokens: int
    ) -> torch.Tensor | None:
        if mask is None:
            return None
        mask = attn.prepare_attention_mask(mask, key_tokens, batch_size)
        # SDPA expects the mask as (batch, heads, source_length, target_length).
        return mask.view(batch_size, attn.heads, -1, mask.shape[-1])

    def _attend(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        batch_size: int,
    ) -> torch.Tensor:
        """As `AttnProcessor2_0`: split heads, optional q/k norms, SDPA, merge heads."""
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        return hidden_states.to(query.dtype)


def _xformers_ops() -> Any:
    try:
        import xformers.ops
    except ImportError as e:
        raise MissingDependencyError("xformers", "hypernetwork attention with xformers") from e
    return xformers.ops


class HypernetworkXFormersAttnProcessor(HypernetworkAttnProcessor):
    """Diffusers' `XFormersAttnProcessor` with the key and value computed from `hn_k(context)`/`hn_v(context)`."""

    def __init__(
        self, hn_k: HypernetworkModule, hn_v: HypernetworkModule, original: Any, attention_op: Callable | None = None
    ):
        super().__init__(hn_k, hn_v, original)
        self.attention_op = attention_op
        self.ops = _xformers_ops()

    def _prepare_mask(
        self, attn: Any, mask: torch.Tensor | None, key_tokens: int, batch_size: int, query_tokens: int
    ) -> torch.Tensor | None:
        mask = attn.prepare_attention_mask(mask, key_tokens, batch_size)
        if mask is not None:
            # xformers does not broadcast the singleton query dimension of the bias.
            mask = mask.expand(-1, query_tokens, -1)
        return mask

    def _attend(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        batch_size: int,
    ) -> torch.Tensor:
        """As `XFormersAttnProcessor`: heads into the batch, memory-efficient attention, heads back."""
        query = attn.head_to_batch_dim(query).contiguous()
        key = attn.head_to_batch_dim(key).contiguous()
        value = attn.head_to_batch_dim(value).contiguous()
        hidden_states = self.ops.memory_efficient_attention(
            query, key, value, attn_bias=mask, op=self.attention_op, scale=attn.scale
        )
        hidden_states = hidden_states.to(query.dtype)
        return attn.batch_to_head_dim(hidden_states)


def apply_hypernetwork(
    unet: nn.Module,
    hypernetwork: Hypernetwork,
    multiplier: float = 1.0,
    *,
    attention: AttentionBackend = "auto",
    strict: bool = True,
) -> int:
    """Install hypernetwork attention processors on every U-Net attention layer; returns how many were patched.

    `attention`: "sdpa", "xformers" (an error when xformers is missing) or "auto" (xformers where the layer already
    used diffusers' xformers processor, else SDPA). `strict`: every context width of the U-Net must have a (k, v)
    pair (a file made for another model is refused); otherwise layers without one keep their processor, as in A1111.
    The hypernetwork moves to the U-Net's device; `multiplier` is its strength in eval mode. Call it after choosing
    the U-Net's attention implementation (`enable_xformers_memory_efficient_attention` would replace these).
    """
    from diffusers.models.attention_processor import XFormersAttnProcessor

    if attention not in ("auto", "sdpa", "xformers"):
        raise ConfigError(f"unknown attention backend {attention!r} for the hypernetwork (auto, sdpa or xformers)")
    remove_hypernetwork(unet)
    layers = list(_attention_modules(unet))
    missing = sorted({m.to_k.in_features for _, m in layers} - set(hypernetwork.widths))
    if strict and missing:
        raise ModelError(
            f"the hypernetwork has no layers for the U-Net's attention context width(s) {missing} "
            f"(it has {hypernetwork.widths})",
            hint="it was made for a different model (e.g. SD 1.x vs 2.x)",
        )
    try:
        device = next(unet.parameters()).device
    except StopIteration:
        device = None
    if device is not None:
        hypernetwork.to(device)
    hypernetwork.set_multiplier(multiplier)

    patched = 0
    for _, attn in layers:
        pair = hypernetwork.pair(attn.to_k.in_features)
        if pair is None:
            continue
        original = attn.processor
        if attention == "xformers" or (attention == "auto" and isinstance(original, XFormersAttnProcessor)):
            op = getattr(original, "attention_op", None)
            processor: HypernetworkAttnProcessor = HypernetworkXFormersAttnProcessor(*pair, original, op)
        else:
            processor = HypernetworkAttnProcessor(*pair, original)
        attn.set_processor(processor)
        patched += 1
    if patched == 0:
        raise ModelError(
            f"the hypernetwork's widths {hypernetwork.widths} match none of the U-Net's attention layers "
            f"({context_widths(unet)})"
        )
    return patched


def remove_hypernetwork(unet: nn.Module) -> int:
    """Put back the attention processors `apply_hypernetwork` replaced; returns how many were restored."""
    restored = 0
    for _, attn in _attention_modules(unet):
        if isinstance(attn.processor, HypernetworkAttnProcessor):
            attn.set_processor(attn.processor.original)
            restored += 1
    return restored


# --- training config keys -------------------------------------------------------------------------------------------


class HypernetworkOptions(BaseModel):
    """The train-config keys of issue 12 (flat, kohya-style names); `build_hypernetwork` turns them into a model.

    `train_hypernetwork`: train a hypernetwork on the frozen U-Net and text encoder.
    `hypernetwork_layer_structure`: MLP widths as multiples of the context width, starting and ending with 1.
    `hypernetwork_activation`: linear, relu, leakyrelu, elu, swish (Hardswish, as in A1111), tanh, sigmoid, or
    another argument-free torch activation A1111 accepts (gelu, silu, mish, …).
    `hypernetwork_layer_norm`: a LayerNorm after every layer.
    `hypernetwork_dropout`: a probability p (dropout after every hidden layer: [0, p, …, p, 0]) or an explicit
    A1111 dropout structure (one entry per layer-structure entry, first and last 0).
    `hypernetwork_multiplier`: strength when sampling (training always runs at 1, as in A1111).
    `hypernetwork_weights`: an A1111 `.pt` to continue from; its structure wins, and explicitly set structure keys
    that contradict it are errors.
    """

    model_config = ConfigDict(extra="forbid")

    train_hypernetwork: bool = False
    hypernetwork_layer_structure: list[float] = [1, 2, 1]
    hypernetwork_activation: str = "linear"
    hypernetwork_layer_norm: bool = False
    hypernetwork_dropout: float | list[float] = 0.0
    hypernetwork_multiplier: float = 1.0
    hypernetwork_weights: Path | None = None

    @field_validator("hypernetwork_layer_structure")
    @classmethod
    def _check_layer_structure(cls, value: list[float]) -> list[float]:
        problem = layer_structure_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("hypernetwork_activation")
    @classmethod
    def _check_activation(cls, value: str) -> str:
        problem = activation_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("hypernetwork_multiplier")
    @classmethod
    def _check_multiplier(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("hypernetwork_multiplier must be a finite number")
        return value

    @model_validator(mode="after")
    def _check_dropout(self) -> HypernetworkOptions:
        dropout = self.hypernetwork_dropout
        if isinstance(dropout, list):
            problem = dropout_structure_problem(self.hypernetwork_layer_structure, dropout)
        else:
            problem = None if 0 <= dropout < 1 else f"hypernetwork_dropout {dropout} must be in [0, 1)"
        if problem:
            raise ValueError(problem)
        return self


def build_hypernetwork(unet: nn.Module, options: HypernetworkOptions, name: str | None = None) -> Hypernetwork:
    """A fresh hypernetwork for every context width of `unet`, or the one in `hypernetwork_weights` (checked)."""
    if options.hypernetwork_weights is None:
        return Hypernetwork(
            context_widths(unet),
            options.hypernetwork_layer_structure,
            options.hypernetwork_activation,
            options.hypernetwork_layer_norm,
            options.hypernetwork_dropout,
            name=name,
        )
    hypernetwork = Hypernetwork.load(options.hypernetwork_weights)
    problems = options_problems(hypernetwork, options)
    missing = sorted(set(context_widths(unet)) - set(hypernetwork.widths))
    if missing:
        problems.append(
            f"{options.hypernetwork_weights} has no layers for the U-Net's context width(s) {missing} "
            f"(it has {hypernetwork.widths}; was it made for another model?)"
        )
    if problems:
        raise ConfigError(problems)
    if name is not None:
        hypernetwork.name = name
    return hypernetwork


def options_problems(hypernetwork: Hypernetwork, options: HypernetworkOptions) -> list[str]:
    """Explicitly set structure keys of `options` that contradict a loaded `hypernetwork_weights` file."""
    problems: list[str] = []
    given = options.model_fields_set
    checks = {
        "hypernetwork_layer_structure": (
            [_plain_number(x) for x in options.hypernetwork_layer_structure],
            hypernetwork.layer_structure,
        ),
        # A file's `null` activation is A1111's "linear".
        "hypernetwork_activation": (options.hypernetwork_activation, hypernetwork.activation or "linear"),
        "hypernetwork_layer_norm": (options.hypernetwork_layer_norm, hypernetwork.layer_norm),
        "hypernetwork_dropout": (
            dropout_structure(options.hypernetwork_layer_structure, options.hypernetwork_dropout),
            hypernetwork.dropout_structure,
        ),
    }
    for key, (wanted, found) in checks.items():
        if key in given and wanted != found:
            problems.append(f"{key} = {wanted} contradicts {options.hypernetwork_weights} ({found})")
    return problems
