"""What trains and in which dtype each part of the model sits: one answer for the recipe and the memory estimate.

- The trained weights (U-Net, text encoders at their own rates) keep an fp32 master copy, or the compute dtype with
  `full_fp16` / `full_bf16`; frozen parts sit in the compute dtype (`mixed_precision`).
- A text encoder trains when `train_text_encoder` is on and its rate (kohya's `learning_rate_te`, or
  `learning_rate_te1` / `learning_rate_te2` for SDXL; the U-Net's rate when unset) is not 0.
- The VAE runs in fp32 with `no_half_vae`, or in an fp16 run of a family whose released VAE overflows in fp16
  (SDXL), unless the VAE's config says it was fixed (`force_upcast: false`).
"""

from __future__ import annotations

from typing import Any

from sdtool.train.config.schema import TrainConfig

_BYTES = {"no": 4, "fp16": 2, "bf16": 2}


def text_encoder_rates(t: TrainConfig, family: Any) -> list[float | None]:
    """The learning rate of each of the family's text encoders, in `family.text_parts` order (None: frozen)."""
    rates: list[float | None] = []
    for part in family.text_parts:
        rate = getattr(t, part.lr_key)
        rate = (t.learning_rate if rate is None else rate) if t.train_text_encoder else None
        rates.append(None if rate == 0 else rate)
    return rates


def vae_in_fp32(t: TrainConfig, family: Any, force_upcast: bool | None) -> bool:
    """Whether the VAE runs in fp32 (`force_upcast`: the VAE config's value, None when it has none)."""
    if t.no_half_vae:
        return True
    fixed = force_upcast is False
    return t.mixed_precision == "fp16" and family.vae_overflows_in_fp16 and not fixed


def compute_bytes(t: TrainConfig) -> int:
    """Bytes per weight of the frozen parts: the compute dtype of `mixed_precision`."""
    return _BYTES[t.mixed_precision]


def master_bytes(t: TrainConfig) -> int:
    """Bytes per trained weight (and per gradient): fp32, or the compute dtype with full_fp16 / full_bf16."""
    return compute_bytes(t) if (t.full_fp16 or t.full_bf16) else 4
