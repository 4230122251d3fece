"""Data-parallel training through accelerate: DDP (gloo on CPU, NCCL on GPUs); DeepSpeed and FSDP from its config.

How a run on N processes relates to a run on one: the sampler builds *global* batches of one bucket with up to
`batch_size × N` items, and rank r trains on the r-th contiguous slice of each, so every rank is in the same bucket
at every step (same shapes, one collective per step). Random draws (noise, timesteps, the VAE posterior sample) are
made for the whole global batch on every rank from the same per-step generator and each rank keeps its rows, and
each per-sample draw (caption shuffle, flip, cached-latent sample) is seeded by the sample's global position. The
gradient DDP averages is therefore the gradient of the mean loss over the global batch: an N-process run equals a
one-process run with `batch_size × N` up to floating-point reduction order.

A short global batch (the last batch of a bucket with k < batch_size × N items) is split as evenly as possible
(slice sizes differ by at most one) and each rank's loss is weighted by `real rows × N / k`, so the update is still
the mean over exactly those k images. When k < N, the ranks left without an image run one copy of the batch's first
image with weight zero: DDP needs every rank to take part in each step, and nothing is dropped or counted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.errors import ConfigError, MissingDependencyError
from sdtool.launch import world_size

RANK_DIGESTS_ENV = "SDTOOL_RANK_DIGESTS"  # a folder: each rank writes a hash of its final weights there (debugging)


@dataclass(frozen=True)
class Shard:
    """Where this rank's micro-batch sits in the global batch."""

    offset: int  # global row of the rank's first sample
    size: int  # rows in the global batch
    real: int  # the rank's real samples (0: one zero-weighted stand-in, see the module docstring)
    processes: int

    @property
    def weight(self) -> float:
        """Loss weight that makes DDP's mean over ranks the mean over the global batch (1.0 on one process)."""
        return self.real * self.processes / self.size

    def rows(self, n: int) -> slice:
        return slice(self.offset, self.offset + n)


def split_batch(size: int, rank: int, processes: int) -> tuple[int, int]:
    """The [start, stop) rows of `rank` in a global batch of `size` rows (even split, sizes differ by ≤ 1)."""
    return size * rank // processes, size * (rank + 1) // processes


class ShardedBatchSampler:
    """This rank's slice of every global batch of a `BucketBatchSampler` (positions and resume stay on the base)."""

    def __init__(self, base: Any, rank: int, processes: int):
        self.base, self.rank, self.processes = base, rank, processes

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[list[tuple[Any, Shard]]]:
        for batch in self.base:
            start, stop = split_batch(len(batch), self.rank, self.processes)
            if stop > start:
                shard = Shard(start, len(batch), stop - start, self.processes)
                yield [(key, shard) for key in batch[start:stop]]
            else:
                yield [(batch[0], Shard(0, len(batch), 0, self.processes))]


class ShardedDataset:
    """Passes each sample's Shard through the Dataset so the collated batch carries it."""

    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[Any, Shard]) -> dict[str, Any]:
        inner, shard = key
        return {**self.base[inner], "shard": shard}


class ShardedCollate:
    """The base collate, plus `batch["shard"]`.

    Tensors leave a DataLoader worker in shared memory (torch's way), never pickled by value: a message through the
    pipe stays small, so a worker killed mid-send (a stop's grace period ending, the OOM killer) cannot leave
    half a message that the training process would wait on forever.
    """

    def __init__(self, base: Any):
        self.base = base

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        shard = samples[0]["shard"]
        batch = self.base([{k: v for k, v in s.items() if k != "shard"} for s in samples])
        batch["shard"] = shard
        return batch


def make_loader(
    dataset: Any,
    sampler: Any,
    collate: Any,
    accelerator: Any,
    workers: int,
    persistent: bool,
    pin_memory: bool,
    worker_init_fn: Any = None,
) -> Any:
    """accelerate's DataLoaderShard over this rank's slices (device placement, end-of-epoch accumulation flush).

    Built directly rather than through `accelerator.prepare`, whose sharding hands whole batches to ranks round
    robin: ranks would train on different buckets and the global batch would not be one bucket's batch. Its
    DataLoader makes one pass over all epochs (`epochs.EpochView`), so the workers load across epoch ends.
    """
    from accelerate.data_loader import DataLoaderShard

    from sdtool.train.epochs import EpochSpanningSampler, EpochView

    spanning = EpochSpanningSampler(sampler)
    loader = DataLoaderShard(
        ShardedDataset(dataset),
        device=accelerator.device,
        batch_sampler=ShardedBatchSampler(spanning, accelerator.process_index, accelerator.num_processes),
        num_workers=workers,
        collate_fn=ShardedCollate(collate),
        persistent_workers=persistent,
        pin_memory=pin_memory,
        worker_init_fn=worker_init_fn,
    )
    loader.base_dataloader = EpochView(loader.base_dataloader, sampler)
    return loader


def stop_workers(loader: Any) -> None:
    """Shut down a loader's persistent worker processes now.

    Workers ignore SIGTERM (signals.py), so multiprocessing's exit hook, which terminates daemon processes with
    SIGTERM and then waits for them, must not be the first to ask them to stop. torch keeps the persistent iterator
    in the loader's `_iterator`; its `_shutdown_workers` is torch's own orderly shutdown (what its `__del__` runs).
    """
    view = getattr(loader, "base_dataloader", None)
    if view is not None and "_stream" in vars(view):  # epochs.EpochView: the one pass across epochs
        view.close()
    for holder in (loader, getattr(view, "loader", None)):
        iterator = getattr(holder, "_iterator", None)
        if holder is not None and iterator is not None:
            holder._iterator = None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def accelerator_options(train_text_encoder: bool, clip_skip: int | None) -> dict[str, Any]:
    """Extra `Accelerator(...)` arguments for the launch this process is part of."""
    import torch

    check_launch_backend()
    options: dict[str, Any] = {}
    if world_size() > 1:
        current = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        has_device = current is not None and current.type != "mps"
        if not has_device:
            options["cpu"] = True  # accelerate only picks gloo for torchrun's CPU ranks when told they are CPU
        if train_text_encoder and (clip_skip or 1) > 1:
            from accelerate.utils import DistributedDataParallelKwargs

            # clip_skip leaves the text encoder's last layers without gradients, which DDP must be told about.
            options["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return options


def check_launch_backend() -> None:
    """A clear error when the launch asks for DeepSpeed and it is not installed (before accelerate's ImportError)."""
    import importlib.util

    wants_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if wants_deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise MissingDependencyError("deepspeed", "the accelerate config's DeepSpeed backend")


def prepare_for_backend(accelerator: Any, batch_size: int, train_text_encoder: bool) -> None:
    """What DeepSpeed needs before `prepare` when the data loader is not prepared with the models."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if train_text_encoder:
        raise ConfigError(
            "train_text_encoder = true is not supported with DeepSpeed (one engine per model)",
            hint="use DDP or FSDP in the accelerate config, or train the U-Net only",
        )
    plugin = accelerator.state.deepspeed_plugin
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size


def noisy_inputs(objective: Any, latents: Any, generator: Any, shard: Shard) -> tuple[Any, Any, Any, Any]:
    """`objective.noisy_inputs` for this rank's rows, drawn as part of the global batch.

    Returns (noisy, timesteps, target) of the rank's rows and the global batch's timesteps (for the logged mean).
    """
    n = latents.shape[0]
    if shard.size == n:
        noisy, t, target = objective.noisy_inputs(latents, generator)
        return noisy, t, target, t
    full = latents.new_zeros((shard.size, *latents.shape[1:]))
    full[shard.rows(n)] = latents  # other ranks' rows stay zero: only their random draws matter here
    noisy, t, target = objective.noisy_inputs(full, generator)
    rows = shard.rows(n)
    return noisy[rows], t[rows], target[rows], t


def sample_posterior(dist: Any, generator: Any, shard: Shard) -> Any:
    """A VAE posterior sample of this rank's rows, drawn as part of the global batch (`dist.sample` on one process)."""
    from diffusers.utils.torch_utils import randn_tensor

    n = dist.mean.shape[0]
    shape = (shard.size, *dist.mean.shape[1:])
    eps = randn_tensor(shape, generator=generator, device=dist.parameters.device, dtype=dist.parameters.dtype)
    return dist.mean + dist.std * eps[shard.rows(n)]


def full_weights(accelerator: Any, prepared: Any) -> Any | None:
    """The trained module with its full weights on the main process (None elsewhere); call it on every rank.

    DDP keeps a full copy on each rank, so the unwrapped module is returned as is. FSDP and DeepSpeed ZeRO-3 shard
    the weights: `accelerator.get_state_dict` gathers them (a collective) and the main process loads them into a
    fresh copy of the module.
    """
    from accelerate.utils import DistributedType

    module = accelerator.unwrap_model(prepared)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return module if accelerator.is_main_process else None
    state = accelerator.get_state_dict(prepared)
    if not accelerator.is_main_process:
        return None
    if hasattr(module, "from_config") and hasattr(module, "config"):
        copy = type(module).from_config(module.config)
    else:
        copy = type(module)(module.config)
    copy.load_state_dict(state)
    return copy


def write_rank_digest(accelerator: Any, modules: dict[str, Any]) -> None:
    """With SDTOOL_RANK_DIGESTS=DIR, each rank writes `rank<r>.json`: a SHA-256 of each trained module's weights.

    A debugging aid for data-parallel runs: under DDP every rank must end with identical weights.
    """
    folder = os.environ.get(RANK_DIGESTS_ENV)
    if not folder:
        return
    digests = {}
    for name, prepared in modules.items():
        h = hashlib.sha256()
        for key, tensor in sorted(accelerator.unwrap_model(prepared).state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
        digests[name] = h.hexdigest()
    path = Path(folder) / f"rank{accelerator.process_index}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(digests) + "\n")


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
