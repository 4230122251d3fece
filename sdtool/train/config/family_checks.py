"""Checks that depend on the model family (read from a local model's configs at config time, or after a hub
model loads): kohya's SDXL-only keys on other models, SD-only keys on SDXL, per-block rates, original sizes.
"""

from __future__ import annotations

from typing import Any

from sdtool.train.config.schema import TrainConfig


def block_lrs(value: str | list[float] | None, blocks: int | None) -> list[float] | None:
    """`block_lr` as kohya writes it ("1e-6,2e-6,…") or as a TOML list; ValueError unless it has `blocks` rates."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        rates = [float(v) for v in items]
    except ValueError:
        raise ValueError(f"expected numbers, got {value!r}") from None
    if (blocks is not None and len(rates) != blocks) or any(r < 0 for r in rates):
        raise ValueError(f"expected {blocks} non-negative learning rates, got {len(rates)}")
    return rates


def check_family(cfg: TrainConfig, family: Any, datasets: list[Any], problems: list[str]) -> None:
    """Keys that depend on the model family, checked as soon as the family is known (from the model's small files
    at config time, else right after the model loads); `family` None checks only what holds for every family."""
    if family is not None:
        problem = family.check_clip_skip(cfg.clip_skip)
        if problem is not None:
            problems.append(f"clip_skip: {problem}")
        if cfg.v2 is not None and cfg.v2 != family.kohya_v2:
            problems.append(
                f"v2: v2 = {str(cfg.v2).lower()} contradicts the model in {cfg.pretrained_model_name_or_path}, which "
                f"is {family.title}; remove v2 (it is detected from the model)"
            )
        lr_keys = {part.lr_key for part in family.text_parts}
        for key in ("learning_rate_te", "learning_rate_te1", "learning_rate_te2"):
            if getattr(cfg, key) is not None and key not in lr_keys:
                problems.append(
                    f"{key}: not a key for {family.title}, whose text encoder rates are {', '.join(sorted(lr_keys))}"
                )
        if cfg.block_lr is not None and family.block_lr_blocks is None:
            problems.append(f"block_lr: kohya's per-block rates are for SDXL U-Nets; the model is {family.title}")
        if cfg.train_hypernetwork and not family.supports_hypernetworks:
            problems.append(
                f"train_hypernetwork: A1111 hypernetworks are for SD1/SD2 models; the model is {family.title}"
            )
    for key in ("learning_rate_te1", "learning_rate_te2"):
        if getattr(cfg, key) is not None and not cfg.train_text_encoder:
            problems.append(f"{key}: set, but train_text_encoder is off; set train_text_encoder = true or remove it")
    try:
        block_lrs(cfg.block_lr, family.block_lr_blocks if family is not None else None)
    except ValueError as exc:
        problems.append(f"block_lr: {exc}")
    if cfg.fused_backward_pass:
        if cfg.optimizer_type.lower() != "adafactor":
            problems.append("fused_backward_pass: works with optimizer_type = 'Adafactor' only (as in kohya)")
        if cfg.gradient_accumulation_steps != 1:
            problems.append("fused_backward_pass: steps each weight in backward; needs gradient_accumulation_steps = 1")
        if cfg.mixed_precision == "fp16":
            problems.append("fused_backward_pass: fp16 loss scaling steps the whole model at once; use 'bf16'")
        if cfg.train_hypernetwork:
            problems.append("fused_backward_pass: not for hypernetwork training")
    if cfg.cache_text_encoder_outputs_to_disk:
        cfg.cache_text_encoder_outputs = True  # implied, as in kohya
    if cfg.cache_text_encoder_outputs:
        if cfg.train_text_encoder:
            problems.append(
                "cache_text_encoder_outputs: contradicts train_text_encoder (its outputs change as it trains)"
            )
        changing = (
            "shuffle_caption",
            "caption_dropout_rate",
            "caption_tag_dropout_rate",
            "caption_dropout_every_n_epochs",
        )
        for d, spec in enumerate(datasets):
            for j, sub in enumerate(spec.subsets):
                for key in changing:
                    if sub.options.get(key):
                        problems.append(
                            f"datasets[{d}].subsets[{j}].{key}: changes the caption from step to step, so the text "
                            "encoders' outputs cannot be cached; remove it or cache_text_encoder_outputs"
                        )
