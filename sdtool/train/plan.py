"""What a run will do before it starts: the dataset, its bucket batches, steps per epoch and the total (kohya's
formula), printed by `--dry-run` and at the start of training.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

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
    # cache_latents: the items whose latents are missing or stale (with why), encoded before the first step, and the
    # fingerprint of the VAE training encodes with (None when it cannot be read)
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
    to_encode: list[tuple[TrainItem, str]] = []
    fingerprint = None
    if not t.cache_latents:
        items = drop_undecodable(items)  # found at its first batch, a bad image would stop the run
    else:
        fingerprint = training_vae_fingerprint(t.vae, t.pretrained_model_name_or_path)
        to_encode = [(item, exc.reason) for item, exc in unusable_latents(items, subsets, fingerprint)]
        if to_encode:  # usable cache entries were made from decodable images; the others are checked now
            items = drop_undecodable(items, only={item.image for item, _ in to_encode})
            kept = {item.image for item in items}
            to_encode = [(item, why) for item, why in to_encode if item.image in kept]
    processes = world_size()
    # Global batches: batch_size per process, so steps per epoch shrink as processes are added.
    sampler = BucketBatchSampler(items, subsets, [d.batch_size * processes for d in cfg.datasets], seed)
    batches = len(sampler)
    steps_per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    total = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    epochs = math.ceil(total / steps_per_epoch)
    return Plan(
        items, subsets, sampler, batches, steps_per_epoch, total, epochs, seed, processes, to_encode, fingerprint
    )


def print_plan(cfg: ResolvedConfig, plan: Plan) -> None:
    """The bucket plan and step counts, on stderr."""
    from rich.table import Table

    table = Table(title="bucket plan", title_justify="left")
    for col in ("dataset", "bucket", "images", "with repeats", "global batch", "batches/epoch"):
        table.add_column(col, justify="right")
    counts: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for item in plan.items:
        c = counts.setdefault((item.dataset, item.bucket), [0, 0])
        c[0] += 1
        c[1] += plan.subsets[item.subset].num_repeats
    for (d, bucket), (n, reps) in sorted(counts.items()):
        bs = cfg.datasets[d].batch_size * plan.processes
        table.add_row(str(d), f"{bucket[0]}x{bucket[1]}", str(n), str(reps), str(bs), str(math.ceil(reps / bs)))
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
