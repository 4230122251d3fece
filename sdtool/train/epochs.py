"""One DataLoader pass across epochs, handed to the training loop one epoch at a time.

A DataLoader starts its workers' work anew at every epoch: nothing of epoch e+1 is loaded before the loop asks for
its first batch, and accelerate then waits for a second one (it looks a batch ahead to know the epoch's end). With
short epochs (a few dozen images, the usual fine-tuning set) every few steps begin with the training process idle.
Here the DataLoader iterates `EpochSpanningSampler`, every epoch's batches in order without end, in one pass, so the
workers keep loading across epoch ends; `EpochView` gives the loop (through accelerate's `DataLoaderShard`) one
epoch of that stream per `iter()`, so accelerate still sees each epoch end and flushes gradient accumulation there.

Nothing about the batches changes: each sample's randomness comes from its (epoch, batch, slot) position, not from
when it is loaded. When the loop asks for another position than the stream's next one (a resume, a run stopped
mid-epoch), the stream restarts there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class EpochSpanningSampler:
    """A `BucketBatchSampler`'s batches from its position on: the rest of that epoch, then every later epoch."""

    def __init__(self, sampler: Any):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)  # batches per epoch, as DataLoader and accelerate expect

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        if len(self.sampler) == 0:
            return
        epoch, start = self.sampler.epoch, self.sampler.start
        while True:
            yield from self.sampler.keys(epoch, start)
            epoch, start = epoch + 1, 0


class EpochView:
    """One epoch per `iter()` of a DataLoader over an `EpochSpanningSampler` of `sampler`, from the position the
    sampler was last set to; other attributes are the DataLoader's."""

    def __init__(self, loader: Any, sampler: Any):
        self.loader = loader
        self.sampler = sampler
        self._stream: Iterator[Any] | None = None
        self._next: tuple[int, int] | None = None  # the (epoch, batch) the stream yields next

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.sampler.epoch, self.sampler.start
        if self._stream is None or self._next != (epoch, start):
            self.close()  # a stream at another position: its workers go now, in order
            self._stream = iter(self.loader)  # the spanning sampler starts at the sampler's position
        batches = len(self.sampler)
        stream = self._stream
        for b in range(start, batches):
            self._next = None  # unknown until the batch is out (an error here leaves the stream unusable)
            batch = next(stream)
            self._next = (epoch, b + 1) if b + 1 < batches else (epoch + 1, 0)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        """Shut the stream's worker processes down (torch's own orderly shutdown). The stream usually stops mid-epoch
        (the last step is rarely an epoch's last batch), and workers ignore SIGTERM (signals.py), so multiprocessing's
        exit hook, which terminates daemon processes with SIGTERM and then waits for them, would wait forever."""
        stream, self._stream, self._next = self._stream, None, None
        shutdown = getattr(stream, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        # accelerate's DataLoaderShard reports its base loader's class as its own (`isinstance(x, DataLoader)`).
        return self.loader.__class__
