"""What a run will do before it starts: the dataset, its bucket batches, steps per epoch and the total (kohya's
formula), the images held out for validation (holdout.py), printed by `--dry-run` and at the start of training and
kept in `<output_dir>/run.json` for the run report.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtool.console import info, plural, print_table
from sdtool.errors import ConfigError
from sdtool.train.checkpoints import read_state
from sdtool.train.config.schema import ResolvedConfig
from sdtool.train.dataset import (
    BucketBatchSampler,
    SubsetRuntime,
    TrainItem,
    drop_undecodable,
    load_items,
    missing_original_sizes,
    training_vae_fingerprint,
    unusable_latents,
)
from sdtool.train.distributed import world_size
from sdtool.train.holdout import SubsetSplit, split_validation


@dataclass
class Plan:
    """What a run will do: data, batches and steps (printed by --dry-run and at the start of training)."""

    items: list[TrainItem]
    subsets: list[SubsetRuntime]
    sampler: BucketBatchSampler
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    seed: int
    processes: int = 1  # data-parallel processes; each global batch is split between them (distributed.py)
    val_items: list[TrainItem] = field(default_factory=list)  # held out of training (holdout.py)
    splits: list[SubsetSplit] = field(default_factory=list)
    # cache_latents: the items (training and validation) whose latents are missing or stale (with why), encoded
    # before the first step, and the fingerprint of the VAE training encodes with (None when it cannot be read)
    to_encode: list[tuple[TrainItem, str]] = field(default_factory=list)
    vae_fingerprint: str | None = None


def make_plan(cfg: ResolvedConfig) -> Plan:
    """Load the dataset and work out batches, steps per epoch and the total (kohya's formula)."""
    t = cfg.train
    if t.seed is not None:
        seed = t.seed
    elif t.resume is not None:
        seed = int(read_state(Path(t.resume))["train_state"]["seed"])  # the resumed run's own seed
    else:
        seed = random.SystemRandom().randrange(2**31)
    items, subsets = load_items(cfg.datasets)
    if cfg.family is not None and cfg.family.needs_original_size:
        problems = missing_original_sizes(items, subsets)
        if problems:
            raise ConfigError(problems, hint=f"fix {cfg.path}")
    # Split before anything drops an image, so the split never depends on whether the images decode.
    items, val_items, splits = split_validation(items, cfg.datasets, seed)
    if not items:
        raise ConfigError("every image is a validation image; nothing is left to train on", hint=f"fix {cfg.path}")
    if splits and not val_items:
        raise ConfigError(
            "validation_split holds no image out: round(images × validation_split) is 0 in every subset",
            hint=f"raise validation_split in {cfg.path}, or add a [[datasets]] table with validation = true",
        )
    to_encode: list[tuple[TrainItem, str]] = []
    fingerprint = None
    if not t.cache_latents:
        items = drop_undecodable(items)  # found at its first batch, a bad image would stop the run
        if val_items:
            val_items = drop_undecodable(val_items)
    else:
        fingerprint = training_vae_fingerprint(t.vae, t.pretrained_model_name_or_path)
        unusable = unusable_latents(items + val_items, subsets, fingerprint)
        to_encode = [(item, exc.reason) for item, exc in unusable]
        if to_encode:  # usable cache entries were made from decodable images; the others are checked now
            only = {item.image for item, _ in to_encode}
            items = drop_undecodable(items, only=only)
            val_items = drop_undecodable(val_items, only=only) if val_items else val_items
            kept = {item.image for item in items + val_items}
            to_encode = [(item, why) for item, why in to_encode if item.image in kept]
    processes = world_size()
    # Global batches: batch_size per process, so steps per epoch shrink as processes are added.
    sampler = BucketBatchSampler(items, subsets, [d.batch_size * processes for d in cfg.datasets], seed)
    batches = len(sampler)
    steps_per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    total = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    epochs = math.ceil(total / steps_per_epoch)
    return Plan(
        items,
        subsets,
        sampler,
        batches,
        steps_per_epoch,
        total,
        epochs,
        seed,
        processes,
        val_items,
        splits,
        to_encode,
        fingerprint,
    )


def bucket_rows(cfg: ResolvedConfig, plan: Plan) -> list[dict[str, Any]]:
    """The bucket plan, one row per (dataset, bucket) of the training images."""
    counts: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for item in plan.items:
        c = counts.setdefault((item.dataset, item.bucket), [0, 0])
        c[0] += 1
        c[1] += plan.subsets[item.subset].num_repeats
    rows = []
    for (d, bucket), (n, reps) in sorted(counts.items()):
        bs = cfg.datasets[d].batch_size * plan.processes
        rows.append(
            {
                "dataset": d,
                "bucket": list(bucket),
                "images": n,
                "with_repeats": reps,
                "global_batch": bs,
                "batches_per_epoch": math.ceil(reps / bs),
            }
        )
    return rows


def split_lines(plan: Plan, limit: int = 10) -> list[str]:
    """The validation split in words: per subset how many images are held out and how, then (up to `limit`) which."""
    if not plan.splits:
        return []
    lines = [
        f"validation: {len(plan.val_items)} images held out of training (never trained on), {len(plan.items)} train"
    ]
    for split in plan.splits:
        lines.append(f"  dataset {split.dataset}, {split.name}: {split.held} of {split.images} ({split.how})")
    shown = [str(item.image) for item in plan.val_items[:limit]]
    more = len(plan.val_items) - len(shown)
    lines += [f"  {path}" for path in shown] + ([f"  … and {more} more (all in run.json)"] if more > 0 else [])
    return lines


def plan_record(cfg: ResolvedConfig, plan: Plan) -> dict[str, Any]:
    """What `run.json` keeps of the plan: the bucket rows, step counts and the validation split."""
    return {
        "buckets": bucket_rows(cfg, plan),
        "images": len(plan.items),
        "processes": plan.processes,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "batches_per_epoch": plan.batches_per_epoch,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "epochs": plan.epochs,
        "seed": plan.seed,
        "validation": {
            "splits": [
                {"dataset": s.dataset, "metadata_file": s.name, "images": s.images, "held": s.held, "how": s.how}
                for s in plan.splits
            ],
            "images": [str(item.image) for item in plan.val_items],
        },
    }


def print_plan(cfg: ResolvedConfig, plan: Plan) -> None:
    """The bucket plan and step counts, on stderr."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="bucket plan", title_justify="left")
    for col in ("dataset", "bucket", "images", "with repeats", "global batch", "batches/epoch"):
        table.add_column(col, justify="right")
    for row in bucket_rows(cfg, plan):
        bucket = f"{row['bucket'][0]}x{row['bucket'][1]}"
        cells = (row["images"], row["with_repeats"], row["global_batch"], row["batches_per_epoch"])
        table.add_row(str(row["dataset"]), bucket, *map(str, cells))
    print_table(table)
    accum = cfg.train.gradient_accumulation_steps
    sizes = sorted({d.batch_size for d in cfg.datasets})
    per_step = " / ".join(f"{bs} × {plan.processes} × {accum} = {bs * plan.processes * accum}" for bs in sizes)
    info(
        f"{plural(plan.processes, 'process', 'processes')}; images per optimizer step "
        f"(batch_size × processes × accumulation): {per_step}"
    )
    info(
        f"{plural(len(plan.items), 'image')}, {plural(plan.batches_per_epoch, 'batch', 'batches')} per epoch, "
        f"gradient accumulation {accum}: {plural(plan.steps_per_epoch, 'step')} per epoch, "
        f"{plural(plan.total_steps, 'step')} in total ({plural(plan.epochs, 'epoch')}), seed {plan.seed}"
    )
    for line in split_lines(plan):
        info(escape(line))  # paths, not markup


RUN_RECORD = "run.json"


def write_run_record(out_dir: Path, cfg: ResolvedConfig, plan: Plan) -> Path:
    """`<output_dir>/run.json`: the resolved config, the plan and the validation split, for `sdtool report`."""
    import json
    import time

    from sdtool import __version__
    from sdtool.fsutil import atomic_write_text

    record = {
        "sdtool_version": __version__,
        "written": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config_file": str(cfg.path),
        "output_name": cfg.train.output_name,
        "config": cfg.to_toml(),
        "plan": plan_record(cfg, plan),
    }
    return atomic_write_text(out_dir / RUN_RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
