"""The fine-tuning recipe: setup → train → cleanup, with a loop that reads top to bottom.

`TrainState` (global step, epoch, batch within the epoch, seed) is everything a resume needs besides the
model/optimizer/scheduler states, because every random draw comes from a generator seeded by position (see
dataset.py for samples; `step_generator` here for noise and timesteps). Periodic saves, state folders and resume
live in checkpoints.py, the plan in plan.py; this file decides when things happen.

One concept that reads better whole: setup, the loop, saves, samples and cleanup share one set of state (the
accelerator, models, optimizer, schedule and `TrainState`) and are meant to be read top to bottom, as a recipe.
Everything that stands on its own lives beside it: plan.py, checkpoints.py, outputs.py, signals.py, trackers.py,
progress.py, memory.py, saving.py.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtool.console import info, warn
from sdtool.errors import ConfigError, NonFiniteError, SdtoolError
from sdtool.runtime import usable_cpus
from sdtool.train.checkpoints import check_resume_config, config_record, prune_after_save, read_state, write_state
from sdtool.train.config.checks import block_lrs
from sdtool.train.config.schema import ResolvedConfig
from sdtool.train.dataset import missing_original_sizes, sample_seed
from sdtool.train.hypernetwork.training import sampling_mode
from sdtool.train.outputs import EMA_FILE, model_path, save_stem, state_path
from sdtool.train.plan import Plan
from sdtool.train.progress import TrainProgress, truncate_metrics
from sdtool.train.signals import Interrupted, StopRequest, ignore_sigint
from sdtool.train.trackers import init_trackers, log_epoch_loss, log_sample_grid, tracker_options

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


def step_generator(seed: int, step: int, micro: int, device: Any) -> Any:
    """The generator for one micro-batch's noise, timesteps and VAE sample: a function of its position only."""
    import torch

    return torch.Generator(device=device).manual_seed(sample_seed(seed, _STEP_STREAM, step, micro))


class FineTuneRecipe:
    """Full fine-tuning of a Stable Diffusion U-Net (and optionally its text encoder) from a resolved config."""

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
        from sdtool.train.dataset import Collate, TrainDataset, check_cache, training_vae_fingerprint
        from sdtool.train.distributed import accelerator_options, make_loader, prepare_for_backend
        from sdtool.train.loss import DiffusionObjective, LossOptions
        from sdtool.train.optim import (
            build_lr_scheduler,
            build_optimizer,
            fuse_backward,
            parse_optimizer_args,
            unet_param_groups,
        )

        quiet_third_party()
        t = self.t
        torch.manual_seed(self.plan.seed)
        self.accelerator = acc = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            step_scheduler_with_optimizer=False,
            **tracker_options(t),
            **accelerator_options(t.train_text_encoder, t.clip_skip),
        )
        if acc.num_processes != self.plan.processes:
            raise ConfigError(f"planned for {self.plan.processes} processes but accelerate runs {acc.num_processes}")
        self.hypernetwork = None
        if t.train_hypernetwork:
            from sdtool.train.hypernetwork.training import check_backend

            check_backend(acc)
        self.cached = t.cache_latents
        if self.cached:
            vae_id = training_vae_fingerprint(t.vae, t.pretrained_model_name_or_path)
            check_cache(self.plan.items, self.plan.subsets, vae_id)

        model = self._load_model()
        self.model = model
        self.family = family = model.family
        self.weight_dtype = torch_dtype(t.mixed_precision)
        device = acc.device

        # What trains: the U-Net (or a hypernetwork on the frozen U-Net), the text encoders on request. Frozen parts
        # run in the compute dtype. A frozen U-Net stays in train mode: it has no dropout or batch norm, so the
        # mode changes nothing but the flag, and sampling restores whatever flags it finds.
        unet, encoders = model.unet, model.text_encoders
        rates = self._text_encoder_rates()
        hyper = t.train_hypernetwork
        unet.requires_grad_(not hyper)
        unet.train()
        full_dtype = self.weight_dtype if (t.full_fp16 or t.full_bf16) else torch.float32
        unet.to(device, dtype=self.weight_dtype if hyper else full_dtype)
        for te, rate in zip(encoders, rates, strict=True):
            te.requires_grad_(rate is not None)
            te.train(rate is not None)
            te.to(device, dtype=full_dtype if rate is not None else self.weight_dtype)
        for module in family.unused_text_modules(encoders, t.clip_skip):
            module.requires_grad_(False)  # outputs no conditioning reads (kohya freezes them too)
        if model.vae is not None:
            model.vae.requires_grad_(False)
            model.vae.eval()
            model.vae.to(device, dtype=torch.float32 if self._vae_in_fp32() else self.weight_dtype)

        self._set_attention(unet)
        if hyper:
            from sdtool.train.hypernetwork.training import attach_hypernetwork

            self.hypernetwork = attach_hypernetwork(t, unet, full_dtype)
            self.hypernetwork_start_step = self.hypernetwork.step  # a file continued from keeps counting its steps
        trained_encoders = [te for te, rate in zip(encoders, rates, strict=True) if rate is not None]
        if t.gradient_checkpointing:
            # Only what is trained: checkpointing a frozen encoder costs compute and saves nothing (kohya does it).
            unet.enable_gradient_checkpointing()
            for te in trained_encoders:
                # transformers 5 renamed it and deprecates the old name; earlier 5.x releases have only the old one.
                enable = getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable
                enable()

        if self.hypernetwork is not None:
            groups = [{"params": list(self.hypernetwork.parameters()), "lr": t.learning_rate}]
            self.group_names = ["hypernetwork"]
        else:
            groups, self.group_names = unet_param_groups(
                unet, t.learning_rate, block_lrs(t.block_lr, family.block_lr_blocks)
            )
        for part, te, rate in zip(family.text_parts, encoders, rates, strict=True):
            if rate is not None:
                groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": rate})
                self.group_names.append(part.encoder)
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
        workers = min(t.max_data_loader_n_workers, usable_cpus())
        collate = Collate(family, model.tokenizers, t.max_token_length)
        persistent = t.persistent_data_loader_workers and workers > 0
        # Each rank's slice of every global batch (not accelerate's round-robin sharding): see distributed.py.
        self.loader = make_loader(
            dataset, self.plan.sampler, collate, acc, workers, persistent, device.type == "cuda", ignore_sigint
        )
        prepare_for_backend(acc, min(d.batch_size for d in self.cfg.datasets), bool(trained_encoders))
        denoiser = unet
        if self.hypernetwork is not None:
            from sdtool.train.hypernetwork.training import HypernetworkDenoiser

            # self.unet is what the loss calls: the frozen U-Net through the wrapper DDP and the states see.
            denoiser = HypernetworkDenoiser(unet, self.hypernetwork)
        self.unet, *prepared, self.optimizer = acc.prepare(denoiser, *trained_encoders, optimizer)
        swap = dict(zip(map(id, trained_encoders), prepared, strict=True))
        self.text_encoders = [swap.get(id(te), te) for te in encoders]  # the prepared ones where they train
        self.train_text = bool(trained_encoders)
        if t.full_fp16:
            _allow_fp16_grads(acc)
        if t.fused_backward_pass:
            if acc.num_processes > 1:
                raise ConfigError(
                    "fused_backward_pass steps each weight before the processes have averaged its gradient",
                    hint="train on one process, or remove fused_backward_pass",
                )
            fuse_backward(self.optimizer, t.max_grad_norm)
        self.trained = [self.unet, *prepared]
        self.unet_dtype = next(acc.unwrap_model(self.unet).parameters()).dtype  # DeepSpeed may have cast it
        if self.hypernetwork is not None:
            self.unet_dtype = next(unet.parameters()).dtype

        opts = LossOptions(**{k: getattr(t, k) for k in LossOptions.__dataclass_fields__ if k != "v_prediction"})
        opts.v_prediction = model.v_prediction
        self.objective = DiffusionObjective(model.scheduler_config, opts, device)
        if t.zero_terminal_snr and not model.v_prediction:
            warn("zero_terminal_snr without v-prediction: the last timestep's epsilon target is degenerate")
        self.scaling_factor = self._scaling_factor()

        self.ema = None
        if t.use_ema:
            from sdtool.train.ema import WeightEMA

            params = [p for module in self.trained for p in module.parameters() if p.requires_grad]
            self.ema = WeightEMA(params, t.ema_decay, device="cpu" if t.offload_ema else None)
        self.epoch_loss = [0.0, 0]  # sum and count of the current epoch's step losses
        self.pending: dict[str, Any] | None = None  # the last step's metrics, written one step late (no GPU sync)
        self.sample_prompts = self._read_sample_prompts()
        if t.resume is not None:
            self._resume(Path(t.resume))

        out_dir = Path(t.output_dir)
        if acc.is_main_process:  # only rank 0 writes
            out_dir.mkdir(parents=True, exist_ok=True)
            metrics = out_dir / "metrics.jsonl"
            if t.resume is not None:
                truncate_metrics(metrics, self.state.global_step)
            self.metrics = open(metrics, "a" if t.resume else "w", encoding="utf-8")  # noqa: SIM115 (closed in cleanup)
        if t.log_with is not None:
            init_trackers(acc, self.cfg)

    def _text_encoder_rates(self) -> list[float | None]:
        """The learning rate of each text encoder (None: frozen), as `precision.text_encoder_rates` decides."""
        from sdtool.train.precision import text_encoder_rates

        return text_encoder_rates(self.t, self.family)

    def _load_model(self) -> Any:
        from sdtool.models.loading import load_model, load_vae

        t = self.t
        components: tuple[str, ...] = ("unet", "text_encoder", "tokenizer", "scheduler")
        if not self.cached and t.vae is None:
            components += ("vae",)
        model = load_model(
            t.pretrained_model_name_or_path,
            model_type=t.model_type,
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
        info(f"model {model.source}: {model.family.title}, {model.prediction_type} prediction")
        if self.cfg.family is None:  # a hub id or a pickled file: its family was not known before it loaded
            from sdtool.train.config.checks import check_family

            problems: list[str] = []
            check_family(t, model.family, self.cfg.datasets, problems)
            if model.family.needs_original_size:
                problems += missing_original_sizes(self.plan.items, self.plan.subsets)
            if problems:
                raise ConfigError(problems, hint=f"fix {self.cfg.path}")
        return model

    def _vae_in_fp32(self) -> bool:
        """no_half_vae, or an fp16 run of a family whose VAE overflows in fp16 (SDXL) unless the VAE is a fixed one."""
        from sdtool.train.precision import vae_in_fp32

        vae = self.model.vae
        return vae_in_fp32(self.t, self.family, getattr(vae.config, "force_upcast", None) if vae is not None else None)

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

        from sdtool.text import default_reporter
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
            with torch.set_grad_enabled(self.train_text):
                conditioning = self.family.encode_ids(self.text_encoders, batch["input_ids"], self.t.clip_skip)
            inputs = self.family.unet_inputs(conditioning.to(self.unet_dtype), batch["time_ids"])
            pred = self.unet(noisy.to(self.unet_dtype), timesteps, **inputs).sample
        # Weighted so that DDP's mean over ranks is the mean over the global batch (1.0 on one process).
        return self.objective.loss(pred, target, timesteps) * shard.weight, all_timesteps

    def train(self) -> None:
        """Run optimizer steps until the planned total: metrics, periodic saves, samples and a graceful stop."""
        acc, state, total = self.accelerator, self.state, self.plan.total_steps
        if state.global_step == 0:
            self._maybe_sample(0, epoch_end=False)
        if state.global_step >= total:
            warn(f"the state is already at step {state.global_step} of {total}; nothing left to train")
        with TrainProgress(total, state.global_step) as self.progress, StopRequest() as stop:
            while state.global_step < total:
                self.plan.sampler.set_position(state.epoch, state.batch_in_epoch)
                micro, loss_sum, t_sum, step_start = 0, 0.0, 0.0, time.perf_counter()
                for batch in self.loader:
                    gen = step_generator(state.seed, state.global_step, micro, acc.device)
                    with acc.accumulate(*self.trained):
                        loss, timesteps = self.compute_loss(batch, gen)
                        acc.backward(loss)  # with fused_backward_pass every weight has taken its step here
                        grad_norm = None
                        if not self.t.fused_backward_pass:
                            grad_norm = self._clip_and_measure() if acc.sync_gradients else None
                            self.optimizer.step()
                            self.optimizer.zero_grad(set_to_none=True)
                    state.batch_in_epoch += 1
                    micro += 1
                    loss_sum = loss_sum + acc.reduce(loss.detach(), "mean")  # the global batch's loss
                    t_sum = t_sum + timesteps.float().mean()
                    # accelerate syncs on the last batch of the loader, so an epoch always ends on a step.
                    epoch_end = acc.gradient_state.end_of_dataloader
                    if not acc.sync_gradients:
                        continue
                    lrs = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
                    self.lr_scheduler.step()  # once per optimizer step, whatever the process count
                    state.global_step += 1
                    if self.ema is not None:
                        self.ema.update()
                    self._flush()
                    self.pending = {
                        "step": state.global_step,
                        "epoch": state.epoch + 1,
                        "loss": loss_sum / micro,
                        "lr": dict(zip(self.group_names, lrs, strict=True)),
                        "timestep_mean": t_sum / micro,
                        "seconds": time.perf_counter() - step_start,
                        "grad_norm": grad_norm,
                    }
                    micro, loss_sum, t_sum, step_start = 0, 0.0, 0.0, time.perf_counter()
                    if epoch_end:
                        # Moved on before anything is saved, so a state never points at the end of an epoch.
                        state.epoch += 1
                        state.batch_in_epoch = 0
                        self._end_epoch(state.epoch)
                    self._after_step(epoch_end)
                    if self._stop_requested(stop):
                        self._stop(stop.signal_name)
                    if state.global_step >= total:
                        break
            self._flush()

    def _clip_and_measure(self) -> Any:
        """Clip the gradients (max_grad_norm) and return their total norm, for the non-finite guard."""
        import torch

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = None
        if self.t.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.t.max_grad_norm)
        if self.accelerator.scaler is not None:
            return None  # fp16 loss scaling: inf gradients are expected now and then, and the scaler skips them
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return norm

    def _end_epoch(self, epoch: int) -> None:
        """After epoch `epoch` (1-based): its mean loss to the trackers, on an epoch axis of its own."""
        self._flush()
        total, count = self.epoch_loss
        if count and self.accelerator.is_main_process:
            log_epoch_loss(self.accelerator, epoch, total / count)
        self.epoch_loss = [0.0, 0]

    def _after_step(self, epoch_end: bool) -> None:
        """Periodic saves and samples, kohya's rules: never at the last step or epoch (the final save covers it)."""
        t, state, total = self.t, self.state, self.plan.total_steps
        step, epoch = state.global_step, state.epoch
        if t.save_every_n_steps and step % t.save_every_n_steps == 0 and step < total:
            self._save_periodic("step", step, t.save_every_n_steps)
        every_epochs = self.save_every_n_epochs
        if epoch_end and every_epochs and epoch % every_epochs == 0 and epoch < self.plan.epochs:
            self._save_periodic("epoch", epoch, every_epochs)
        self._maybe_sample(step, epoch_end=False)
        if epoch_end:
            self._maybe_sample(step, epoch_end=True)

    @property
    def save_every_n_epochs(self) -> int | None:
        """save_every_n_epochs, or kohya's `floor(epochs / save_n_epoch_ratio) or 1`."""
        if self.t.save_n_epoch_ratio is not None:
            return math.floor(self.plan.epochs / self.t.save_n_epoch_ratio) or 1
        return self.t.save_every_n_epochs

    def _save_periodic(self, kind: str, number: int, every: int) -> None:
        stem = save_stem(self.t.output_name, **{kind: number})  # type: ignore[arg-type]
        self.save_model(model_path(self.t, stem))
        if self.t.save_state:
            self.save_state(state_path(self.t, stem))
        if self.accelerator.is_main_process:
            prune_after_save(self.t, kind, number, every)

    def _stop_requested(self, stop: StopRequest) -> bool:
        if self.accelerator.num_processes == 1:
            return stop.signal_name is not None
        import torch

        # Every rank must stop at the same step, or the state save below would wait forever.
        flag = torch.tensor([int(stop.signal_name is not None)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())

    def _stop(self, signal_name: str | None) -> None:
        """Save a state after the step that just finished, then stop with exit code 130."""
        stem = save_stem(self.t.output_name, step=self.state.global_step)
        path = self.save_state(state_path(self.t, stem))
        command = f"sdtool train {shlex.quote(str(self.cfg.path))} --set {shlex.quote(f'resume={path}')}"
        raise Interrupted(
            f"stopped by {signal_name or 'a signal'} after step {self.state.global_step}; state saved to {path}",
            hint=f"resume with: {command} (plus any --set options this run had)",
        )

    def _flush(self) -> None:
        """Write the pending metrics line (a GPU sync point), checking the loss and gradients first."""
        if self.pending is not None:
            record, self.pending = self.pending, None
            self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        grad_norm = record.pop("grad_norm", None)
        record = {**record, "loss": float(record["loss"]), "timestep_mean": float(record["timestep_mean"])}
        hint = "lower learning_rate, or use mixed_precision = 'bf16' instead of fp16; nothing of this step was saved"
        if not math.isfinite(record["loss"]):
            raise NonFiniteError(f"the loss became {record['loss']} at step {record['step']}", hint=hint)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise NonFiniteError(f"the gradients became {float(grad_norm)} at step {record['step']}", hint=hint)
        self.epoch_loss[0] += record["loss"]
        self.epoch_loss[1] += 1
        if self.accelerator.is_main_process:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            scalars = {"loss": record["loss"], **{f"lr/{k}": v for k, v in record["lr"].items()}}
            self.accelerator.log(scalars, step=record["step"])
        self.progress.update(record)

    # ------------------------------------------------------------------------------------------ saves and state
    def save_model(self, path: Path) -> Path | None:
        """Write the model (the EMA weights when use_ema) at `path`; rank 0 writes. Never writes non-finite weights."""
        from sdtool.train.distributed import full_weights
        from sdtool.train.saving import save_trained_model

        self._flush()  # checks the last step's loss and gradients before anything is written
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._check_weights_finite()
        if self.hypernetwork is not None:
            return self._save_hypernetwork(path)
        with self._weights_for_output():
            # Every rank takes part: FSDP and ZeRO-3 gather the full weights collectively.
            unet = full_weights(acc, self.unet)
            trained = [full_weights(acc, m) for m in self.trained[1:]]  # the text encoders that train
            if not acc.is_main_process:
                return None
            model = self.model
            swap = dict(zip(map(id, self.trained[1:]), trained, strict=True))
            text_parts: dict[str, Any] = {}
            for part, te in zip(self.family.text_parts, self.text_encoders, strict=True):
                text_parts[part.encoder] = acc.unwrap_model(swap.get(id(te), te))
                text_parts[part.tokenizer] = getattr(model, part.tokenizer)
            out = save_trained_model(
                path,
                self.t.save_model_as,
                unet=unet,
                text_parts=text_parts,
                vae=model.vae if model.vae is not None else self._load_vae_for_saving(),
                scheduler_config=model.scheduler_config,
                family=model.family,
                v_prediction=model.v_prediction,
                precision=self.t.save_precision,
                metadata=self.output_metadata(),
            )
        info(f"saved {out}")
        return out

    def _save_hypernetwork(self, path: Path) -> Path | None:
        """The A1111 `.pt` (the EMA weights when use_ema); its step continues the step of `hypernetwork_weights`."""
        from sdtool.train.hypernetwork.training import checkpoint_name

        if not self.accelerator.is_main_process:
            return None
        assert self.hypernetwork is not None
        with self._weights_for_output():
            out = self.hypernetwork.save(
                path,
                step=self.hypernetwork_start_step + self.state.global_step,
                name=self.t.output_name,
                sd_checkpoint_name=checkpoint_name(self.t.pretrained_model_name_or_path),
            )
        info(f"saved {out}")
        return out

    def _weights_for_output(self) -> Any:
        import contextlib

        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def _check_weights_finite(self) -> None:
        import torch

        finite = all(bool(torch.isfinite(p).all()) for module in self.trained for p in module.parameters())
        if not finite or (self.ema is not None and not self.ema.all_finite()):
            raise NonFiniteError(
                f"the weights became non-finite at step {self.state.global_step}; nothing of this step was saved",
                hint="lower learning_rate",
            )

    def save_state(self, path: Path) -> Path:
        """A state folder for an exact resume (see checkpoints.py)."""
        import torch

        self._flush()
        if self.accelerator.is_main_process:
            self._check_weights_finite()
        record = {
            "sdtool_version": _version(),
            "train_state": self.state.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch_loss": list(self.epoch_loss),
            "total_steps": self.plan.total_steps,
            "num_processes": self.accelerator.num_processes,
            "ema": self.ema is not None,
            "torch": torch.__version__,
            "config": self._config_record(),
        }
        try:
            out = write_state(self.accelerator, path, record, self.ema)
        except (TypeError, ValueError) as exc:
            raise SdtoolError(f"cannot write the training state to {path}: {exc}") from exc
        info(f"saved state {out}")
        return out

    def _config_record(self) -> dict[str, Any]:
        record = config_record(self.cfg)
        record["seed"] = self.plan.seed  # the effective seed, also when the config leaves it unset
        return record

    def _resume(self, path: Path) -> None:
        """Load a state folder: weights, optimizer, scaler, RNGs, accumulation counter, schedule, EMA, position."""
        saved = read_state(path)
        check_resume_config(saved["config"], self._config_record(), self.ema is not None, bool(saved.get("ema")))
        if saved.get("num_processes", 1) != self.accelerator.num_processes:
            warn(
                f"the state was saved by {saved.get('num_processes')} processes, this run has "
                f"{self.accelerator.num_processes}: the data order from here on differs"
            )
        try:
            self.accelerator.load_state(str(path))
            if self.ema is not None:
                self.ema.load(path / EMA_FILE)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise SdtoolError(f"resume: cannot load {path} ({exc})") from exc
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.state.load_state_dict(saved["train_state"])
        self.epoch_loss = [float(saved["epoch_loss"][0]), int(saved["epoch_loss"][1])]
        info(f"resumed from {path} at step {self.state.global_step} (epoch {self.state.epoch + 1})")

    # -------------------------------------------------------------------------------------- samples and logging
    def _read_sample_prompts(self) -> list[Any]:
        if self.t.sample_prompts is None:
            return []
        from sdtool.train.sample_prompts import read_sample_prompts

        return read_sample_prompts(self.t.sample_prompts)

    def _maybe_sample(self, step: int, *, epoch_end: bool) -> None:
        """Render the sample prompts when kohya's schedule says so (rank 0 only; the trajectory is untouched)."""
        if not self.sample_prompts:
            return
        from sdtool.train.sampling import generate_samples, should_sample

        t, epoch = self.t, self.state.epoch
        if not should_sample(
            step,
            epoch,
            every_n_steps=t.sample_every_n_steps,
            every_n_epochs=t.sample_every_n_epochs,
            at_first=t.sample_at_first,
            epoch_end=epoch_end,
        ):
            return
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return
        self._flush()
        model = self.model
        vae = model.vae if model.vae is not None else self._sampling_vae()
        with self._weights_for_output(), sampling_mode(self.hypernetwork):
            paths = generate_samples(
                model.unet if self.hypernetwork is not None else acc.unwrap_model(self.unet),
                vae,
                [acc.unwrap_model(te) for te in self.text_encoders],
                model.tokenizers,
                model.scheduler_config,
                self.sample_prompts,
                encode_prompts=self.family.encode_prompts,
                family=self.family,
                out_dir=Path(t.output_dir) / "sample",
                step=step,
                epoch=epoch,
                device=acc.device,
                dtype=self.weight_dtype,
                default_sampler=t.sample_sampler,
                default_size=self.cfg.datasets[0].resolution if self.cfg.datasets else (512, 512),
                max_token_length=t.max_token_length,
                clip_skip=t.clip_skip,
                name_prefix=t.output_name,
                epoch_end=epoch_end,
            )
        if paths:
            info(f"samples at step {step}: {paths[-1]}")
            log_sample_grid(acc, paths[-1], step)

    def _sampling_vae(self) -> Any:
        """With cached latents the VAE is not loaded for training; sampling loads it once, on the CPU."""
        if getattr(self, "_vae_for_samples", None) is None:
            self._vae_for_samples = self._load_vae_for_saving()
            self._vae_for_samples.requires_grad_(False)
        return self._vae_for_samples

    # ----------------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> Path | None:
        """Save the final model (rank 0 only), the train-end state if asked for, and close what setup opened."""
        from sdtool.train.distributed import write_rank_digest

        parts = {part.encoder: te for part, te in zip(self.family.text_parts, self.text_encoders, strict=True)}
        write_rank_digest(self.accelerator, {"unet": self.unet, **parts})
        out = self.save_model(self.cfg.output_path)
        if self.t.save_state or self.t.save_state_on_train_end:
            self.save_state(state_path(self.t, self.t.output_name))
        return out

    def close(self) -> None:
        """Close the metrics file and the trackers (also after an error)."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "accelerator", None) is not None:
            self.accelerator.end_training()

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
            "sdtool.ema": "true" if self.ema is not None else "false",
        }
        if t.min_timestep is not None or t.max_timestep is not None:
            extra["modelspec.timestep_range"] = f"{t.min_timestep or 0},{t.max_timestep or 1000}"
        for key in ("author", "description", "license", "tags", "usage_hint", "trigger_phrase"):
            value = getattr(t, f"metadata_{key}")
            if value is not None:
                extra[f"modelspec.{key}"] = value
        meta = modelspec_metadata(
            family=model.family,
            v_prediction=model.v_prediction,
            title=t.metadata_title or t.output_name,
            resolution=self.cfg.datasets[0].resolution if self.cfg.datasets else None,
            encoder_layer=t.clip_skip,
            extra=extra,
        )
        return meta

    def run(self) -> Path | None:
        """setup → train → cleanup."""
        try:
            self.setup()
            self.train()
            return self.cleanup()
        finally:
            self.close()


def _version() -> str:
    from sdtool import __version__

    return __version__


def _allow_fp16_grads(accelerator: Any) -> None:
    """full_fp16 keeps fp16 gradients, which GradScaler refuses to unscale unless told it may (as kohya does)."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def _unscale_grads_(optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = _unscale_grads_
