"""An exponential moving average of the trained weights, optionally kept on the CPU.

Our own small class rather than diffusers' `EMAModel`: that one needs the average on the same device as the
weights (no CPU offload) and copies, rather than averages, any tensor without `requires_grad`. The decay warms up
like `EMAModel`'s default, `min(ema_decay, (1 + n) / (10 + n))` after n updates, so the average of a short run is
not stuck at the initial weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class WeightEMA:
    """fp32 shadow copies of `params`, updated after every optimizer step."""

    def __init__(self, params: list[Any], decay: float, device: Any = None):
        import torch

        self.params = params
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().to(device=device or p.device, dtype=torch.float32, copy=True) for p in params]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self) -> None:
        """shadow ← shadow + (1 − decay)·(param − shadow), for every parameter."""
        import torch

        weight = 1.0 - self.current_decay()
        with torch.no_grad():
            device = self.shadow[0].device
            current = [p.detach().to(device=device, dtype=torch.float32) for p in self.params]
            torch._foreach_lerp_(self.shadow, current, weight)
        self.updates += 1

    def swapped_in(self) -> _Swap:
        """A context manager that puts the averaged weights into the model and the trained ones back afterwards."""
        return _Swap(self)

    def all_finite(self) -> bool:
        """False when any averaged weight is NaN or inf."""
        import torch

        return all(bool(torch.isfinite(s).all()) for s in self.shadow)

    def save(self, path: Path) -> None:
        """The averaged weights and the update count, as safetensors."""
        from safetensors.torch import save_file

        tensors = {f"{i:05d}": s.contiguous() for i, s in enumerate(self.shadow)}
        save_file(tensors, path, metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, path: Path) -> None:
        """Restore what `save` wrote; the parameter count and shapes must match."""
        from safetensors import safe_open

        with safe_open(path, "pt", device="cpu") as f:
            keys = sorted(f.keys())
            if len(keys) != len(self.shadow):
                raise ValueError(f"{path}: {len(keys)} averaged tensors, the model trains {len(self.shadow)}")
            for key, shadow in zip(keys, self.shadow, strict=True):
                tensor = f.get_tensor(key)
                if tensor.shape != shadow.shape:
                    raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, not {tuple(shadow.shape)}")
                shadow.copy_(tensor)
            self.updates = int(f.metadata()["updates"])


class _Swap:
    def __init__(self, ema: WeightEMA):
        self.ema = ema
        self.saved: list[Any] = []

    def __enter__(self) -> None:
        import torch

        with torch.no_grad():
            # The trained weights wait on the CPU, so a save does not need a second copy in accelerator memory.
            self.saved = [p.detach().to("cpu", copy=True) for p in self.ema.params]
            for p, s in zip(self.ema.params, self.ema.shadow, strict=True):
                p.copy_(s)

    def __exit__(self, *exc: Any) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.ema.params, self.saved, strict=True):
                p.copy_(s)
        self.saved = []
