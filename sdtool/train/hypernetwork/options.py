"""The hypernetwork training keys (`hypernetwork_*`), validated, and the hypernetwork they describe."""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import nn

from sdtool.errors import ConfigError
from sdtool.train.hypernetwork.attention import context_widths
from sdtool.train.hypernetwork.network import Hypernetwork
from sdtool.train.hypernetwork.structure import (
    activation_problem,
    dropout_structure,
    dropout_structure_problem,
    layer_structure_problem,
    plain_number,
)


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
            [plain_number(x) for x in options.hypernetwork_layer_structure],
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
