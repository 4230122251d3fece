"""A hypernetwork's MLP and the rules for its structure (layer widths, activation, dropout), as AUTOMATIC1111 has them.

The MLPs are laid out exactly like A1111's `modules/hypernetworks/hypernetwork.py` (`HypernetworkModule.linear`, an
`nn.Sequential`) so that state-dict keys (`linear.0.weight`, …) match. Multiplier: as in A1111, a module in
training mode uses 1 and a module in eval mode uses its `multiplier`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from sdtool.errors import ConfigError

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


# The activations ComfyUI's hypernetwork loader builds (comfy_extras/nodes_hypernetwork.py, `valid_activation`); for
# any other name it logs "Unsupported Hypernetwork format" and leaves the model unpatched, without an error.
COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")


def portability_warning(activation: str | None) -> str | None:
    """Why a file with this activation does not load everywhere (ComfyUI), or None when A1111 and ComfyUI load it."""
    if activation is None or activation in COMFYUI_ACTIVATIONS:
        return None
    return (
        f"hypernetwork activation {activation!r} loads in AUTOMATIC1111's web UI but not in ComfyUI, whose loader "
        f"accepts only {', '.join(COMFYUI_ACTIVATIONS)} (it skips such a file with an error in its log); pick one of "
        "those to share the file with ComfyUI users"
    )


WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


DEFAULT_LAYER_STRUCTURE = (1, 2, 1)


DEFAULT_DROPOUT = 0.3  # A1111's probability when a file says `use_dropout` but carries no dropout structure


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


def a1111_dropout_structure(layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool) -> list:
    """A1111's `parse_dropout_structure`, for files that carry `use_dropout` but no `dropout_structure`."""
    if not use_dropout:
        return [0] * len(layer_structure)
    values: list[float] = [0] + [DEFAULT_DROPOUT] * (len(layer_structure) - 3)
    values.append(DEFAULT_DROPOUT if last_layer_dropout else 0)
    values.append(0)
    return values


def plain_number(x: float) -> int | float:
    """1.0 → 1 so that saved layer structures read like A1111's ([1, 2, 1], not [1.0, 2.0, 1.0])."""
    return int(x) if float(x).is_integer() else float(x)


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
