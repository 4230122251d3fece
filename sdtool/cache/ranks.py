"""The cache job under `torchrun` / `accelerate launch`: each process's rank, its device, and the few collectives
(gloo, on CPU) that let rank 0 alone report what every rank wrote and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtool.console import Output, SkipReporter


class QuietSkips(SkipReporter):
    """Collects skips without printing them (ranks other than 0)."""

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.append((str(path), reason))


@dataclass
class Ranks:
    """This process's place in a launched run, with the few collectives the cache job needs (gloo, CPU)."""

    rank: int = 0
    size: int = 1
    local: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls) -> Ranks:
        """Join the launcher's process group (env:// rendezvous) when started by torchrun / accelerate launch."""
        from sdtool.launch import local_rank, process_rank, world_size

        ranks = cls(process_rank(), world_size(), local_rank())
        if ranks.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.size)
                ranks.owns_group = True
        return ranks

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(clean=exc_type is None)

    def close(self, clean: bool = True) -> None:
        """Leave the process group. After a clean run every rank first waits for the others: a gloo group torn
        down while a peer still talks to it can abort the process ("terminate called without an active
        exception"), which turned a finished run into exit 134."""
        if self.owns_group:
            import torch.distributed as dist

            if clean:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def device(self, device: str) -> str:
        """Each rank its own GPU: `auto` / `cuda` become `cuda:LOCAL_RANK` when CUDA is there."""
        if self.size == 1 or device.lower() not in ("auto", "cuda"):
            return device
        import torch

        return f"cuda:{self.local}" if torch.cuda.is_available() else device

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(
        self,
        summary: Any,
        output: Output,
        skips: SkipReporter,
        main_output: Output,
        main_skips: SkipReporter,
    ) -> Any:
        """Rank 0 prints the other ranks' output and skips and returns the summed summary (a dataclass of counts);
        the others return theirs."""
        import torch.distributed as dist

        mine = None
        if not self.main:
            text = output.stream.getvalue()
            mine = (vars(summary), text, skips.skipped, skips.done)
        everything: list[Any] = [None] * self.size
        dist.all_gather_object(everything, mine)
        if not self.main:
            return summary
        for part in everything[1:]:
            counts, text, skipped, done = part
            for name, n in counts.items():
                setattr(summary, name, getattr(summary, name) + n)
            if text:
                main_output.stream.write(text)
                main_output.stream.flush()
            main_skips.extend(skipped)
            main_skips.ok(done)
        return summary
