"""The validation loss (CONTRACT §O): a deterministic loss on the held-out images (holdout.py), when to measure it,
where it is reported, and the best model.

What is measured, so that the same weights always give the same number (to the last bit on one machine) and the
curve moves only when the model does:

* each validation image at each of `validation_timesteps` fixed timesteps (default kohya's four,
  `linspace(min_timestep, max_timestep, 6)[1:-1]` = 200, 400, 600, 800), with noise drawn on the CPU from a
  generator seeded by (the dataset's split seed, the image's path, the timestep): the same noise on any device,
  in any batch, on any number of processes;
* the image's latents are the VAE posterior *mean* (no sample): the cached mean when latents are cached, else the
  VAE encodes the image once and the result is kept in memory (the VAE never trains);
* the image's fixed caption (no shuffle, no dropout), unflipped, with its SDXL size conditioning and cached
  text-encoder outputs where the run has them; models in eval mode (a hypernetwork at full strength);
* plain Gaussian noise (none of the training-only noise_offset, multires noise or ip_noise_gamma) and the run's
  loss (`loss_type`, Huber schedule, min-SNR / debiased weights), so the number is on the training loss's scale.

`val_loss` is the mean over images and timesteps, `val_loss_by_t` the mean per timestep (the low-t and high-t bands
tell different stories). With `use_ema` the EMA weights (what is saved) give `val_loss` and the trained weights
`val_loss_raw`; `validation_weights` picks "ema", "raw" or "both" (the default).

When: before the first step (the starting point; not again on resume), every `validate_every_n_steps` steps, at the
end of every `validate_every_n_epochs`-th epoch (every epoch when neither key is set, as kohya), and after the last
step. Each measurement is one line of `metrics.jsonl` (`step`, `epoch`, `val_loss`, `val_loss_by_t`, `val_images`,
`val_seconds`, and `val_loss_raw`, `val_loss_raw_by_t` with both weights), goes to the trackers and onto the
progress line. `save_best` writes the model with the lowest `val_loss` so far as `<output_name>-best` (pruning
never touches it) after any step that improves on every earlier measurement, the starting point included (which is
the model the run started from, not saved again); the best value is kept in state folders, so a resumed run
compares against it.

Under N processes the global batches of validation images are split between the ranks as training batches are
(distributed.py) and the per-timestep sums are added up across ranks: the numbers equal one process's up to
floating-point summation order. A rank without an image in a batch runs a stand-in, so every rank makes the same
model calls (FSDP and ZeRO-3 gather weights in each one).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from sdtool.captions import fixed_caption
from sdtool.console import info, warn
from sdtool.errors import ConfigError
from sdtool.train.dataset import SubsetRuntime, TrainItem, load_cached, sample_seed, size_conditioning
from sdtool.train.distributed import split_batch
from sdtool.train.holdout import image_key, key_hash, split_seed, subset_roots
from sdtool.train.outputs import model_path


def validation_timesteps(setting: int | list[int], low: int, high: int) -> list[int]:
    """The fixed timesteps: a list as given (sorted), or `setting` points spread over [low, high) as kohya's
    train_network.py does (`np.linspace(low, high, n + 2, dtype=int)[1:-1]`, without the two ends)."""
    if isinstance(setting, list):
        return sorted(setting)
    import numpy as np

    return sorted({int(t) for t in np.linspace(low, high, setting + 2, dtype=int)[1:-1]})


def validation_caption(item: TrainItem, sub: SubsetRuntime) -> str:
    """An image's caption for validation: its subset's prefix, suffix and keep rules, nothing random (no shuffle, no
    dropout). With cached text-encoder outputs (no random keys allowed) it is the caption they were cached for."""
    plain = replace(
        sub.rules,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
    )
    return fixed_caption(item.caption, plain)


def should_validate(
    step: int, epoch: int, *, every_n_steps: int | None, every_n_epochs: int | None, epoch_end: bool
) -> bool:
    """Whether the step just done is a validation point: a multiple of `every_n_steps`, or (with `epoch_end`) the
    end of epoch `epoch` (1-based) when it is a multiple of `every_n_epochs`; without either key every epoch end is
    one (kohya), with only the step key only the steps."""
    if every_n_steps is not None and step % every_n_steps == 0:
        return True
    if epoch_end:
        if every_n_epochs is not None:
            return epoch % every_n_epochs == 0
        return every_n_steps is None
    return False


@dataclass
class Measurement:
    """One validation point: the mean and per-timestep losses under each metric name (`val_loss`, `val_loss_raw`)."""

    step: int
    epoch: int
    losses: dict[str, tuple[float, dict[int, float]]]
    images: int
    seconds: float

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line (non-finite values become null: JSON has no NaN)."""
        out: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        for name, (mean, by_t) in self.losses.items():
            out[name] = _finite(mean)
            out[f"{name}_by_t"] = {str(t): _finite(v) for t, v in by_t.items()}
        out["val_images"] = self.images
        out["val_seconds"] = round(self.seconds, 3)
        return out


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Validator:
    """Measures the validation loss of a recipe's model on `plan.val_items` and reports it (see the module doc)."""

    def __init__(self, recipe: Any):
        t = recipe.t
        self.cfg, self.t = recipe.cfg, t
        self.items: list[TrainItem] = recipe.plan.val_items
        objective = recipe.objective
        self.timesteps = validation_timesteps(t.validation_timesteps, objective.t_min, objective.t_max)
        if max(self.timesteps) >= objective.num_train_timesteps:
            raise ConfigError(
                f"validation_timesteps: {max(self.timesteps)} is past the model's schedule "
                f"({objective.num_train_timesteps} timesteps)"
            )
        self.weights = ["raw"] if recipe.ema is None else _weights_order(t.validation_weights or "both")
        roots = subset_roots(self.cfg.datasets)
        self.noise_keys = [
            key_hash(
                split_seed(self.cfg.datasets[item.dataset], recipe.plan.seed), image_key(item.image, roots[item.subset])
            )
            for item in self.items
        ]
        self.batches = _global_batches(self.items, self.cfg.datasets, recipe.accelerator.num_processes)
        self.latents: dict[int, Any] = {}  # this rank's latents (posterior means), computed once
        self.best: float | None = None
        self.best_step: int | None = None
        self.last_step: int | None = None

    # --------------------------------------------------------------------------------------------- schedule
    def after_step(self, recipe: Any, epoch_end: bool) -> None:
        """Measure (and report) when the schedule says so; call after each optimizer step."""
        state = recipe.state
        if should_validate(
            state.global_step,
            state.epoch,
            every_n_steps=self.t.validate_every_n_steps,
            every_n_epochs=self.t.validate_every_n_epochs,
            epoch_end=epoch_end,
        ):
            self.measure_and_report(recipe)

    def at_start(self, recipe: Any) -> None:
        """The starting point, before the first step of a fresh run."""
        if recipe.state.global_step == 0 and self.last_step is None:
            self.measure_and_report(recipe)

    def at_end(self, recipe: Any) -> None:
        """After the last step, unless that step was just measured."""
        if self.last_step != recipe.state.global_step:
            self.measure_and_report(recipe)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.last_step = state.get("best"), state.get("best_step"), state.get("last_step")

    # ------------------------------------------------------------------------------------------- reporting
    def measure_and_report(self, recipe: Any) -> Measurement:
        recipe._settle()  # the step's loss checked (and shown) first; its metrics line follows its saves and samples
        state = recipe.state
        epoch = state.epoch if state.batch_in_epoch == 0 else state.epoch + 1  # the epoch the last step was in
        m = self.measure(recipe, step=state.global_step, epoch=epoch)
        self.last_step = m.step
        self.report(recipe, m)
        return m

    def report(self, recipe: Any, m: Measurement) -> None:
        """metrics.jsonl, trackers and the progress line (rank 0), then the best model (every rank takes part)."""
        acc = recipe.accelerator
        record = m.record()
        primary = record.get("val_loss", record.get("val_loss_raw"))
        if acc.is_main_process:
            recipe.metrics.write(json.dumps(record) + "\n")
            recipe.metrics.flush()
            scalars = {k: v for k, v in record.items() if k.startswith("val_loss") and isinstance(v, float)}
            for name in [k for k in record if k.endswith("_by_t")]:
                for t, v in record[name].items():
                    if v is not None:
                        scalars[f"{name[: -len('_by_t')]}/t{int(t):04d}"] = v
            acc.log(scalars, step=m.step)
        if primary is None:
            warn(f"the validation loss at step {m.step} is not finite")
            return
        improved = self.best is None or primary < self.best
        if improved:
            self.best, self.best_step = primary, m.step
        progress = getattr(recipe, "progress", None)
        if progress is not None:
            progress.set_validation(f"val {primary:.4f} (best {self.best:.4f} @ {self.best_step})")
        info(
            f"validation loss at step {m.step}: {primary:.4f} ({m.images} images × {len(self.timesteps)} timesteps, "
            f"{m.seconds:.1f} s); best {self.best:.4f} at step {self.best_step}"
        )
        if improved and self.t.save_best and m.step > 0:  # step 0 is the model the run started from
            recipe.save_model(model_path(self.t, f"{self.t.output_name}-best"))

    # ------------------------------------------------------------------------------------------- measuring
    def measure(self, recipe: Any, step: int, epoch: int) -> Measurement:
        """The validation loss of the recipe's current weights (and of its EMA weights, see `validation_weights`)."""
        started = time.perf_counter()
        losses: dict[str, tuple[float, dict[int, float]]] = {}
        for which in self.weights:
            # With EMA, val_loss is the EMA weights' (what is saved) and val_loss_raw the trained weights'.
            name = "val_loss_raw" if which == "raw" and recipe.ema is not None else "val_loss"
            with recipe.ema.swapped_in() if which == "ema" else contextlib.nullcontext():
                losses[name] = self._pass(recipe)
        return Measurement(step, epoch, losses, len(self.items), time.perf_counter() - started)

    def _pass(self, recipe: Any) -> tuple[float, dict[int, float]]:
        import torch

        acc = recipe.accelerator
        rank, processes = acc.process_index, acc.num_processes
        sums = torch.zeros(len(self.timesteps), dtype=torch.float64, device=acc.device)
        with torch.no_grad(), _evaluating(recipe):
            for batch_rows in self.batches:
                start, stop = split_batch(len(batch_rows), rank, processes)
                rows, real = (batch_rows[start:stop], True) if stop > start else (batch_rows[:1], False)
                batch = self._batch(recipe, rows)
                if "hidden" not in batch:  # the text is encoded once, for every timestep
                    with acc.autocast():
                        encoded = recipe.family.encode_ids(recipe.text_encoders, batch["input_ids"], self.t.clip_skip)
                    batch["hidden"] = encoded.hidden
                    if encoded.pooled is not None:
                        batch["pooled"] = encoded.pooled
                x0 = batch["latents"].float() * recipe.scaling_factor
                for k, t in enumerate(self.timesteps):
                    noise = torch.stack([self._noise(i, t, x0.shape[1:]) for i in rows]).to(x0.device)
                    timesteps = torch.full((len(rows),), t, device=x0.device, dtype=torch.long)
                    noisy, target = recipe.objective.noisy_at(x0, noise, timesteps)
                    pred = recipe.predict(batch, noisy, timesteps)
                    if real:  # a stand-in row only keeps the ranks' model calls in step
                        sums[k] += recipe.objective.per_sample_loss(pred, target, timesteps).double().sum()
        if processes > 1:
            sums = acc.reduce(sums, "sum")
        per_t = (sums / len(self.items)).tolist()
        by_t = dict(zip(self.timesteps, per_t, strict=True))
        return float(sums.sum().item() / (len(self.items) * len(self.timesteps))), by_t

    def _noise(self, index: int, t: int, shape: Any) -> Any:
        """The fixed noise of an image at a timestep, drawn on the CPU (the same on every device)."""
        import torch

        generator = torch.Generator().manual_seed(sample_seed(self.noise_keys[index], t))
        return torch.randn(tuple(shape), generator=generator)

    def _batch(self, recipe: Any, rows: list[int]) -> dict[str, Any]:
        """A collated batch on the device: latents (posterior means), token ids or cached text outputs, time ids."""
        import torch
        from accelerate.utils import send_to_device

        from sdtool.train.dataset import Collate

        missing = [i for i in rows if i not in self.latents]
        if missing:
            for i, latents in zip(missing, self._encode(recipe, missing), strict=True):
                self.latents[i] = latents
        samples = []
        for i in rows:
            item = self.items[i]
            sub = recipe.plan.subsets[item.subset]
            caption = validation_caption(item, sub)
            sample: dict[str, Any] = {
                "caption": caption,
                "time_ids": size_conditioning(item, False),
                "latents": self.latents[i],
            }
            if recipe.text_outputs is not None:
                sample.update(recipe.text_outputs.get(caption, sub.metadata_file))
            samples.append(sample)
        collate = Collate(recipe.family, recipe.model.tokenizers, self.t.max_token_length)
        batch = collate(samples)
        batch["latents"] = batch["latents"].to(torch.float32)
        return send_to_device(batch, recipe.accelerator.device)

    def _encode(self, recipe: Any, rows: list[int]) -> list[Any]:
        """Posterior means (CPU, float32, unscaled) of these images: from the latent cache, else from the VAE."""
        import torch

        if recipe.cached:
            out = []
            for i in rows:
                item = self.items[i]
                sub = replace(recipe.plan.subsets[item.subset], flip_aug=False)  # validation never flips
                entry = recipe.latent_memory.get((item.subset, item.image)) or load_cached(item, sub)
                out.append(entry.mean.float())
            return out
        from sdtool.cache.pixels import load_bucketed_pixels, to_tensor

        vae = recipe.model.vae
        pixels = []
        for i in rows:
            item = self.items[i]
            sub = recipe.plan.subsets[item.subset]
            image = load_bucketed_pixels(item.image, item.resized, item.bucket, sub.interpolation, item.image_size)
            pixels.append(to_tensor(image, False))
        stacked = torch.stack(pixels).to(vae.device, dtype=vae.dtype)
        means = vae.encode(stacked).latent_dist.mean.float().cpu()
        return list(means)


def _weights_order(choice: str) -> list[str]:
    return {"ema": ["ema"], "raw": ["raw"], "both": ["ema", "raw"]}[choice]


def _global_batches(items: list[TrainItem], datasets: list[Any], processes: int) -> list[list[int]]:
    """Validation items in batches of one (dataset, bucket), `batch_size × processes` each, in a fixed order."""
    groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.dataset, item.bucket), []).append(i)
    batches = []
    for (d, _bucket), indices in sorted(groups.items()):
        indices.sort(key=lambda i: str(items[i].image))
        size = datasets[d].batch_size * processes
        batches += [indices[j : j + size] for j in range(0, len(indices), size)]
    return batches


@contextlib.contextmanager
def _evaluating(recipe: Any) -> Iterator[None]:
    """Eval mode for everything the loss runs through (no dropout), a hypernetwork at full strength (what training
    optimizes; sampling uses hypernetwork_multiplier); every module's own flag and the multiplier back after."""
    acc, hyper = recipe.accelerator, recipe.hypernetwork
    found = [recipe.model.unet, *(acc.unwrap_model(m) for m in [*recipe.trained, *recipe.text_encoders])]
    modules = list({id(m): m for m in found}.values())
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        if hyper is not None:
            hyper.set_multiplier(1.0)
        yield
    finally:
        if hyper is not None:
            hyper.set_multiplier(recipe.t.hypernetwork_multiplier)
        for m, training in modes:
            m.training = training
