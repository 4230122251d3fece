"""The fine-tuning recipe: setup → train → cleanup, with a loop that reads top to bottom.

What the long-runs work builds on: `TrainState` (global step, epoch, batch within the epoch, seed) is everything a
resume needs besides the model/optimizer/scheduler states, because every random draw comes from a generator
seeded by position (see dataset.py for samples; `step_generator` here for noise and timesteps).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtool.console import info, make_progress, print_table, warn
from sdtool.errors import ConfigError, NonFiniteError
from sdtool.train.config import ResolvedConfig
from sdtool.train.dataset import BucketBatchSampler, SubsetRuntime, TrainItem, load_items, sample_seed
from sdtool.train.distributed import world_size

_STEP_STREAM = 1  # separates the per-step seeds from the per-sample seeds derived from the same run seed


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, current epoch (0-based), micro-batches consumed in that epoch."""

    seed: int
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.__dict__.update(state)


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


def make_plan(cfg: ResolvedConfig) -> Plan:
    """Load the dataset and work out batches, steps per epoch and the total (kohya's formula)."""
    t = cfg.train
    seed = t.seed if t.seed is not None else random.SystemRandom().randrange(2**31)
    items, subsets = load_items(cfg.datasets)
    processes = world_size()
    # Global batches: batch_size per process, so steps per epoch shrink as processes are added.
    sampler = BucketBatchSampler(items, subsets, [d.batch_size * processes for d in cfg.datasets], seed)
    batches = len(sampler)
    steps_per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    total = t.max_train_epochs * steps_per_epoch if t.max_train_epochs else t.max_train_steps
    epochs = math.ceil(total / steps_per_epoch)
    return Plan(items, subsets, sampler, batches, steps_per_epoch, total, epochs, seed, processes)


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
    info(f"{plan.processes} process(es); images per optimizer step (batch_size × processes × accumulation): {per_step}")
    info(
        f"{len(plan.items)} images, {plan.batches_per_epoch} batches per epoch, gradient accumulation {accum}: "
        f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} steps in total ({plan.epochs} epochs), seed "
        f"{plan.seed}"
    )


def estimate_memory(cfg: ResolvedConfig) -> dict[str, float]:
    """A rough GiB estimate of weights, gradients and optimizer state (activations come on top)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    src = cfg.train.pretrained_model_name_or_path
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(src, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(src, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(src, subfolder="text_encoder"))
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae), ("te", te))}
    t = cfg.train
    half = 2 if t.mixed_precision != "no" else 4
    master = half if (t.full_fp16 or t.full_bf16) else 4
    state_bytes = {"AdamW": 8, "AdamW8bit": 2, "PagedAdamW8bit": 2, "Lion": 4, "SGDNesterov": 4, "Prodigy": 16}
    per_param_state = state_bytes.get(t.optimizer_type, 8) * (master / 4)
    trained = count["unet"] + (count["te"] if t.train_text_encoder else 0)
    frozen = count["vae"] * (4 if t.no_half_vae else half) + (0 if t.train_text_encoder else count["te"] * half)
    gib = float(1 << 30)
    out = {
        "trained weights": trained * master / gib,
        "gradients": trained * master / gib,
        "optimizer state": trained * per_param_state / gib,
        "frozen weights": frozen / gib,
    }
    out["total (without activations)"] = sum(out.values())
    return out


def step_generator(seed: int, step: int, micro: int, device: Any) -> Any:
    """The generator for one micro-batch's noise, timesteps and VAE sample: a function of its position only."""
    import torch

    return torch.Generator(device=device).manual_seed(sample_seed(seed, _STEP_STREAM, step, micro))


class FineTuneRecipe:
    """Full fine-tuning of an SD v1/v2 U-Net (and optionally its text encoder) from a resolved config."""

    def __init__(self, cfg: ResolvedConfig, plan: Plan):
        self.cfg = cfg
        self.t = cfg.train
        self.plan = plan
        self.state = TrainState(seed=plan.seed)

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Accelerator, models, attention, optimizer, schedule and data loader, all before the first step."""
        import torch
        from accelerate import Accelerator

        from sdtool.runtime import quiet_third_party, torch_dtype
        from sdtool.train.dataset import Collate, TrainDataset, check_cache
        from sdtool.train.distributed import accelerator_options, make_loader, prepare_for_backend
        from sdtool.train.loss import DiffusionObjective, LossOptions
        from sdtool.train.optim import build_lr_scheduler, build_optimizer, parse_optimizer_args

        quiet_third_party()
        t = self.t
        torch.manual_seed(self.plan.seed)
        self.accelerator = acc = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            step_scheduler_with_optimizer=False,
            **accelerator_options(t.train_text_encoder, t.clip_skip),
        )
        if acc.num_processes != self.plan.processes:
            raise ConfigError(f"planned for {self.plan.processes} processes but accelerate runs {acc.num_processes}")
        self.cached = t.cache_latents
        if self.cached:
            check_cache(self.plan.items, self.plan.subsets)

        model = self._load_model()
        self.model = model
        self.weight_dtype = torch_dtype(t.mixed_precision)
        device = acc.device

        # What trains: the U-Net always, the text encoder on request. Frozen parts run in the compute dtype.
        unet, te = model.unet, model.text_encoder
        unet.requires_grad_(True)
        unet.train()
        te.requires_grad_(t.train_text_encoder)
        te.train(t.train_text_encoder)
        full_dtype = self.weight_dtype if (t.full_fp16 or t.full_bf16) else torch.float32
        unet.to(device, dtype=full_dtype)
        te.to(device, dtype=full_dtype if t.train_text_encoder else self.weight_dtype)
        if model.vae is not None:
            model.vae.requires_grad_(False)
            model.vae.eval()
            model.vae.to(device, dtype=torch.float32 if t.no_half_vae else self.weight_dtype)

        self._set_attention(unet)
        if t.gradient_checkpointing:
            # Only what is trained: checkpointing a frozen encoder costs compute and saves nothing (kohya does it).
            unet.enable_gradient_checkpointing()
            if t.train_text_encoder:
                te.gradient_checkpointing_enable()

        lr_te = t.learning_rate_te if t.learning_rate_te is not None else t.learning_rate
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": t.learning_rate}]
        self.group_names = ["unet"]
        if t.train_text_encoder:
            groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": lr_te})
            self.group_names.append("text_encoder")
        optimizer = build_optimizer(t.optimizer_type, groups, t.learning_rate, parse_optimizer_args(t.optimizer_args))
        self.lr_scheduler = build_lr_scheduler(
            t.lr_scheduler,
            optimizer,
            warmup=t.lr_warmup_steps,
            total_steps=self.plan.total_steps,
            num_cycles=t.lr_scheduler_num_cycles,
            power=t.lr_scheduler_power,
        )

        dataset = TrainDataset(self.plan.items, self.plan.subsets, self.plan.seed, self.cached)
        workers = min(t.max_data_loader_n_workers, os.cpu_count() or 1)
        collate = Collate(model.tokenizer, t.max_token_length)
        persistent = t.persistent_data_loader_workers and workers > 0
        # Each rank's slice of every global batch (not accelerate's round-robin sharding): see distributed.py.
        self.loader = make_loader(dataset, self.plan.sampler, collate, acc, workers, persistent, device.type == "cuda")
        prepare_for_backend(acc, min(d.batch_size for d in self.cfg.datasets), t.train_text_encoder)
        if t.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer = acc.prepare(unet, te, optimizer)
        else:
            self.unet, self.optimizer = acc.prepare(unet, optimizer)
            self.text_encoder = te
        if t.full_fp16:
            _allow_fp16_grads(acc)
        self.trained = [self.unet, self.text_encoder] if t.train_text_encoder else [self.unet]
        self.unet_dtype = next(acc.unwrap_model(self.unet).parameters()).dtype  # DeepSpeed may have cast it

        opts = LossOptions(**{k: getattr(t, k) for k in LossOptions.__dataclass_fields__ if k != "v_prediction"})
        opts.v_prediction = model.v_prediction
        self.objective = DiffusionObjective(model.scheduler_config, opts, device)
        if t.zero_terminal_snr and not model.v_prediction:
            warn("zero_terminal_snr without v-prediction: the last timestep's epsilon target is degenerate")
        self.scaling_factor = self._scaling_factor()

        out_dir = Path(t.output_dir)
        if acc.is_main_process:  # only rank 0 writes
            out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = open(out_dir / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (closed in cleanup)

    def _load_model(self) -> Any:
        from sdtool.models.loading import load_model, load_vae

        t = self.t
        components = ("unet", "text_encoder", "tokenizer", "scheduler")
        if not self.cached and t.vae is None:
            components += ("vae",)
        model = load_model(
            t.pretrained_model_name_or_path,
            model_type="auto" if t.v2 is None else ("v2" if t.v2 else "v1"),
            components=components,
        )
        if t.v_parameterization is not None and t.v_parameterization != model.v_prediction:
            raise ConfigError(
                f"v_parameterization = {str(t.v_parameterization).lower()} contradicts the model, whose scheduler "
                f"predicts {model.prediction_type}",
                hint="remove v_parameterization to use what the model says",
            )
        if t.vae is not None:
            model.vae = load_vae(t.vae)
        kind = "v2" if model.v2 else "v1"
        info(f"model {model.source}: SD {kind}, {model.prediction_type} prediction")
        return model

    def _scaling_factor(self) -> float:
        if self.model.vae is not None:
            return float(self.model.vae.config.scaling_factor)
        from diffusers import AutoencoderKL

        src = self.t.vae or self.t.pretrained_model_name_or_path
        sub = None if (Path(src) / "config.json").is_file() else "vae"
        return float(AutoencoderKL.load_config(src, subfolder=sub).get("scaling_factor", 0.18215))

    def _set_attention(self, unet: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        if self.t.xformers:
            unet.enable_xformers_memory_efficient_attention()
        elif self.t.mem_eff_attn:
            unet.set_attention_slice("auto")  # diffusers' sliced attention: lower peak memory, same result
        else:
            unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA

    # ------------------------------------------------------------------------------------------------- train
    def compute_loss(self, batch: dict[str, Any], generator: Any) -> tuple[Any, Any]:
        """One micro-batch: latents → noise → U-Net → loss. Returns (loss, the global batch's timesteps)."""
        import torch

        from sdtool.text import default_reporter, encode_chunks
        from sdtool.train.distributed import noisy_inputs, sample_posterior

        shard = batch["shard"]  # this rank's rows of the global batch
        for caption, n_tokens in zip(batch["captions"], batch["lengths"], strict=True):
            default_reporter.report(caption, n_tokens, self.t.max_token_length)
        with torch.no_grad():
            if self.cached:
                latents = batch["latents"]
            else:
                vae = self.model.vae
                dist = vae.encode(batch["pixels"].to(vae.dtype)).latent_dist
                latents = sample_posterior(dist, generator, shard)
            latents = latents.float() * self.scaling_factor
        noisy, timesteps, target, all_timesteps = noisy_inputs(self.objective, latents, generator, shard)
        with self.accelerator.autocast():
            with torch.set_grad_enabled(self.t.train_text_encoder):
                states = encode_chunks(self.text_encoder, batch["input_ids"], self.t.clip_skip)
            pred = self.unet(noisy.to(self.unet_dtype), timesteps, states.to(self.unet_dtype)).sample
        # Weighted so that DDP's mean over ranks is the mean over the global batch (1.0 on one process).
        return self.objective.loss(pred, target, timesteps) * shard.weight, all_timesteps

    def train(self) -> None:
        """Run optimizer steps until the planned total; writes one metrics line per step."""
        acc, state, total = self.accelerator, self.state, self.plan.total_steps
        pending: dict[str, Any] | None = None  # the previous step's metrics, written one step late (no GPU sync)
        with _TrainProgress(total, state.global_step) as progress:
            while state.global_step < total:
                self.plan.sampler.set_position(state.epoch, state.batch_in_epoch)
                micro, loss_sum, t_sum, step_start = 0, 0.0, 0.0, time.perf_counter()
                for batch in self.loader:
                    gen = step_generator(state.seed, state.global_step, micro, acc.device)
                    with acc.accumulate(*self.trained):
                        loss, timesteps = self.compute_loss(batch, gen)
                        acc.backward(loss)
                        if acc.sync_gradients and self.t.max_grad_norm > 0:
                            params = [p for group in self.optimizer.param_groups for p in group["params"]]
                            acc.clip_grad_norm_(params, self.t.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    state.batch_in_epoch += 1
                    micro += 1
                    loss_sum = loss_sum + acc.reduce(loss.detach(), "mean")  # the global batch's loss
                    t_sum = t_sum + timesteps.float().mean()
                    if not acc.sync_gradients:
                        continue
                    lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
                    self.lr_scheduler.step()  # once per optimizer step, whatever the process count
                    state.global_step += 1
                    if pending is not None:
                        self._log(pending, progress)
                    pending = {
                        "step": state.global_step,
                        "epoch": state.epoch + 1,
                        "loss": loss_sum / micro,
                        "lr": dict(zip(self.group_names, lrs, strict=True)),
                        "timestep_mean": t_sum / micro,
                        "seconds": time.perf_counter() - step_start,
                    }
                    micro, loss_sum, t_sum, step_start = 0, 0.0, 0.0, time.perf_counter()
                    if state.global_step >= total:
                        break
                else:
                    state.epoch += 1
                    state.batch_in_epoch = 0
            if pending is not None:
                self._log(pending, progress)

    def _log(self, record: dict[str, Any], progress: _TrainProgress) -> None:
        record = {**record, "loss": float(record["loss"]), "timestep_mean": float(record["timestep_mean"])}
        if not math.isfinite(record["loss"]):
            raise NonFiniteError(
                f"the loss became {record['loss']} at step {record['step']}",
                hint="lower learning_rate, or use mixed_precision = 'bf16' instead of fp16",
            )
        if self.accelerator.is_main_process:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        progress.update(record)

    # ----------------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> Path | None:
        """Save the final model (rank 0 only) and close what setup opened."""
        from sdtool.train.distributed import full_weights, write_rank_digest
        from sdtool.train.saving import save_trained_model

        acc = self.accelerator
        acc.wait_for_everyone()
        write_rank_digest(acc, {"unet": self.unet, "text_encoder": self.text_encoder})
        # Every rank takes part: FSDP and ZeRO-3 gather the full weights collectively.
        unet = full_weights(acc, self.unet)
        text_encoder = full_weights(acc, self.text_encoder) if self.t.train_text_encoder else self.text_encoder
        out: Path | None = None
        if acc.is_main_process:
            self.metrics.close()
            model = self.model
            out = save_trained_model(
                self.cfg.output_path,
                self.t.save_model_as,
                unet=unet,
                text_encoder=acc.unwrap_model(text_encoder),
                vae=model.vae if model.vae is not None else self._load_vae_for_saving(),
                tokenizer=model.tokenizer,
                scheduler_config=model.scheduler_config,
                v2=model.v2,
                v_prediction=model.v_prediction,
                precision=self.t.save_precision,
                metadata=self.output_metadata(),
            )
            info(f"saved {out}")
        acc.end_training()
        return out

    def _load_vae_for_saving(self) -> Any:
        from sdtool.models.loading import load_vae

        return load_vae(self.t.vae or self.t.pretrained_model_name_or_path)

    def output_metadata(self) -> dict[str, str]:
        """modelspec 1.0.1 fields plus `sdtool.*` keys with the resolved training config (CONTRACT §I)."""
        from sdtool import __version__
        from sdtool.models.saving import modelspec_metadata

        model, t = self.model, self.t
        extra = {
            "sdtool.version": __version__,
            "sdtool.config": self.cfg.to_toml(),
            "sdtool.seed": str(self.plan.seed),
            "sdtool.steps": str(self.state.global_step),
            "sdtool.epochs": str(self.state.epoch + (1 if self.state.batch_in_epoch else 0)),
        }
        if t.min_timestep is not None or t.max_timestep is not None:
            extra["modelspec.timestep_range"] = f"{t.min_timestep or 0},{t.max_timestep or 1000}"
        for key in ("author", "description", "license", "tags", "usage_hint", "trigger_phrase"):
            value = getattr(t, f"metadata_{key}")
            if value is not None:
                extra[f"modelspec.{key}"] = value
        meta = modelspec_metadata(
            v2=model.v2,
            v_prediction=model.v_prediction,
            title=t.metadata_title or t.output_name,
            resolution=self.cfg.datasets[0].resolution if self.cfg.datasets else None,
            encoder_layer=t.clip_skip,
            extra=extra,
        )
        return meta

    def run(self) -> Path | None:
        """setup → train → cleanup."""
        self.setup()
        self.train()
        return self.cleanup()


def _allow_fp16_grads(accelerator: Any) -> None:
    """full_fp16 keeps fp16 gradients, which GradScaler refuses to unscale unless told it may (as kohya does)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def _unscale_grads_(optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = _unscale_grads_


class _TrainProgress:
    """A rich progress bar on stderr with loss, learning rate, it/s and ETA."""

    def __init__(self, total: int, done: int):
        from rich.progress import TextColumn

        self.progress = make_progress(TextColumn("{task.fields[stats]}"))
        self.total, self.done = total, done
        self.started = time.perf_counter()

    def __enter__(self) -> _TrainProgress:
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total, completed=self.done, stats="")
        return self

    def update(self, record: dict[str, Any]) -> None:
        steps = record["step"] - self.done
        rate = steps / max(time.perf_counter() - self.started, 1e-9)
        lrs = " ".join(f"{v:.2e}" for v in record["lr"].values())
        stats = f"loss {record['loss']:.4f}  lr {lrs}  {rate:.2f} it/s"
        self.progress.update(self.task, completed=record["step"], stats=stats)

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)
