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

import contextlib
import json
import math
import shlex
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtool.console import debug, info, loading, warn
from sdtool.errors import ConfigError, NonFiniteError, SdtoolError
from sdtool.runtime import usable_cpus
from sdtool.train.checkpoints import (
    check_resume_config,
    config_record,
    model_identity,
    prune_after_save,
    read_state,
    write_state,
)
from sdtool.train.config.family_checks import block_lrs
from sdtool.train.config.schema import ResolvedConfig
from sdtool.train.dataset import missing_original_sizes, sample_seed
from sdtool.train.hypernetwork.training import sampling_mode
from sdtool.train.outputs import EMA_FILE, clean_leftovers, model_path, save_stem, state_path
from sdtool.train.plan import Plan, write_run_record
from sdtool.train.progress import TrainProgress, truncate_metrics
from sdtool.train.signals import Interrupted, StopRequest, batches, ignore_stop_signals
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

    def __init__(self, cfg: ResolvedConfig, plan: Plan, command: list[str] | None = None):
        self.cfg = cfg
        self.t = cfg.train
        self.plan = plan
        self.state = TrainState(seed=plan.seed)
        self.last_state: tuple[int, Path] | None = None  # (step, folder) of the last state saved by this run
        self.stop = StopRequest()  # active (signal handlers installed) while `run` trains and saves
        # The command line that started this run (without any `--set resume=…`): a stopped run prints it with the
        # state to resume from, ready to paste.
        self.command = command or ["sdtool", "train", str(cfg.path)]

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Accelerator, models, attention, optimizer, schedule and data loader, all before the first step."""
        import torch
        from accelerate import Accelerator

        from sdtool.runtime import quiet_third_party, torch_dtype
        from sdtool.train.dataset import Collate, TrainDataset, check_cache
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
        self.cached = t.cache_latents
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
        memory: dict[Any, Any] = {}
        if self.cached and self.plan.to_encode:
            # Under several processes the encoding shares accelerate's process group (latent_cache.py).
            from sdtool.train.latent_cache import encode_missing_latents

            memory = encode_missing_latents(self.cfg, self.plan)
        if self.cached:
            check_cache(self.plan.items + self.plan.val_items, self.plan.subsets, self.plan.vae_fingerprint, memory)

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

        self.text_outputs = text_outputs = self._cache_text_outputs(encoders) if t.cache_text_encoder_outputs else None
        self.encoders_parked = text_outputs is not None and device.type != "cpu"
        if self.encoders_parked:
            # Their outputs are cached and they do not train: off the accelerator until a sample needs them (as
            # kohya does; the memory estimate counts them so).
            for te in encoders:
                te.to("cpu")
        self.latent_memory = memory  # latents cache_latents encoded for this run only (validation reads them too)
        dataset = TrainDataset(self.plan.items, self.plan.subsets, self.plan.seed, self.cached, memory, text_outputs)
        workers = min(t.max_data_loader_n_workers, usable_cpus())
        collate = Collate(family, model.tokenizers, t.max_token_length)
        persistent = t.persistent_data_loader_workers and workers > 0
        # Each rank's slice of every global batch (not accelerate's round-robin sharding): see distributed.py.
        self.loader = make_loader(
            dataset, self.plan.sampler, collate, acc, workers, persistent, device.type == "cuda", ignore_stop_signals
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
        # The last step's metrics: `pending` holds tensors (read one step late, so no GPU sync per step), `settled`
        # the checked numbers, written to metrics.jsonl once the time spent saving and sampling after the step is
        # known (`after_step_times`).
        self.pending: dict[str, Any] | None = None
        self.settled: dict[str, Any] | None = None
        self.after_step_times: dict[str, float] = {}
        self.sample_prompts = self._read_sample_prompts()
        self.validator = None
        if self.plan.val_items:
            from sdtool.train.validation import Validator

            self.validator = Validator(self)
        self.model_identity = model_identity(t.pretrained_model_name_or_path)
        resumed_record = None
        if t.resume is not None:
            resumed_record = self._resume(Path(t.resume))

        out_dir = Path(t.output_dir)
        if acc.is_main_process:  # only rank 0 writes
            out_dir.mkdir(parents=True, exist_ok=True)
            for path in clean_leftovers(t):
                info(f"cleaned up after an interrupted run: {path}")
            metrics = out_dir / "metrics.jsonl"
            if t.resume is not None:
                truncate_metrics(metrics, self.state.global_step, resumed_record)
            self.metrics = open(metrics, "a" if t.resume else "w", encoding="utf-8")  # noqa: SIM115 (closed in cleanup)
            write_run_record(out_dir, self.cfg, self.plan)  # what the run report shows besides the metrics
        if t.log_with is not None:
            init_trackers(acc, self.cfg)

    def _cache_text_outputs(self, encoders: list[Any]) -> Any:
        """Encode every caption once before the first step (kohya's cache_text_encoder_outputs): into memory, or into
        each subset's `<META stem>.text/` folder with cache_text_encoder_outputs_to_disk (entries already there, from
        an earlier run or `sdtool cache --text-encoder-outputs`, are used as they are)."""
        from sdtool.cache.text_outputs import TextSettings, encode_missing, text_cache_dir, text_encoders_fingerprint
        from sdtool.console import progress_bar
        from sdtool.train.dataset import TextOutputs, item_caption

        t, acc = self.t, self.accelerator
        settings = TextSettings(self.family.name, text_encoders_fingerprint(encoders), t.max_token_length, t.clip_skip)
        texts: dict[Path, list[str]] = {}
        for item in self.plan.items + self.plan.val_items:
            sub = self.plan.subsets[item.subset]
            texts.setdefault(sub.metadata_file, []).append(item_caption(item, sub))
        store: dict[str, dict[str, Any]] = {}
        to_disk = t.cache_text_encoder_outputs_to_disk
        total = sum(len(set(v)) for v in texts.values())
        encoded = 0
        with progress_bar("text-encoder outputs", total, unit="captions") as advance:
            for metadata_file, captions in texts.items():
                if to_disk and not acc.is_main_process:
                    continue  # rank 0 writes the files; the others read them after the barrier below
                folder = text_cache_dir(metadata_file) if to_disk else None
                encoded += encode_missing(
                    captions,
                    self.family,
                    self.model.tokenizers,
                    encoders,
                    settings,
                    store=None if to_disk else store,
                    cache_dir=folder,
                    advance=advance,
                )
        acc.wait_for_everyone()
        info(f"text-encoder outputs: {total} captions, {encoded} encoded" + (" to disk" if to_disk else ""))
        for te in encoders:  # no longer needed on the device: sampling moves them back while it runs
            te.to("cpu")
        return TextOutputs(settings, store, to_disk)

    def _text_encoder_rates(self) -> list[float | None]:
        """The learning rate of each text encoder (None: frozen), as `precision.text_encoder_rates` decides."""
        from sdtool.train.precision import text_encoder_rates

        return text_encoder_rates(self.t, self.family)

    def _load_model(self) -> Any:
        from sdtool.models.loading import load_model
        from sdtool.models.vae import load_vae

        t = self.t
        components: tuple[str, ...] = ("unet", "text_encoder", "tokenizer", "scheduler")
        if not self.cached and t.vae is None:
            components += ("vae",)
        with loading(f"the model {t.pretrained_model_name_or_path}"):
            model = load_model(t.pretrained_model_name_or_path, model_type=t.model_type, components=components)
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
            from sdtool.train.config.family_checks import check_family

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

        from sdtool.models import hub

        src = self.t.vae or self.t.pretrained_model_name_or_path
        if hub.is_hub_id(src):  # its config, from the local cache (loading the model put it there)
            src = str(hub.local_model(src, what="the VAE", folders={"": False, "vae": False}))
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
        pred = self.predict(batch, noisy, timesteps)
        # Weighted so that DDP's mean over ranks is the mean over the global batch (1.0 on one process).
        return self.objective.loss(pred, target, timesteps) * shard.weight, all_timesteps

    def predict(self, batch: dict[str, Any], noisy: Any, timesteps: Any) -> Any:
        """The U-Net's prediction for a batch's noisy latents: its text conditioning (cached, or encoded, with
        gradients when the text encoders train) and the family's extra inputs (SDXL's size conditioning)."""
        import torch

        from sdtool.models.families.base import TextConditioning

        with self.accelerator.autocast():
            if "hidden" in batch:  # computed once before the first step (cache_text_encoder_outputs)
                conditioning = TextConditioning(batch["hidden"], batch.get("pooled"))
            else:
                with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
                    conditioning = self.family.encode_ids(self.text_encoders, batch["input_ids"], self.t.clip_skip)
            inputs = self.family.unet_inputs(conditioning.to(self.unet_dtype), batch["time_ids"])
            return self.unet(noisy.to(self.unet_dtype), timesteps, **inputs).sample

    def train(self) -> None:
        """Run optimizer steps until the planned total: metrics, periodic saves, samples and a graceful stop."""
        acc, state, total, stop = self.accelerator, self.state, self.plan.total_steps, self.stop
        if state.global_step == 0:
            self._maybe_sample(0, epoch_end=False)
        if state.global_step >= total:
            warn(f"the state is already at step {state.global_step} of {total}; nothing left to train")
        with TrainProgress(total, state.global_step) as self.progress:
            if self.validator is not None:
                self.validator.at_start(self)
            while state.global_step < total:
                self.plan.sampler.set_position(state.epoch, state.batch_in_epoch)
                micro, loss_sum, t_sum, step_start = 0, 0.0, 0.0, time.perf_counter()
                for batch in batches(self.loader, stop):
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
                    self._write_metrics()  # the previous step's line
                    self.pending = {
                        "step": state.global_step,
                        "epoch": state.epoch + 1,
                        "loss": loss_sum / micro,
                        "lr": dict(zip(self.group_names, lrs, strict=True)),
                        "timestep_mean": t_sum / micro,
                        "seconds": time.perf_counter() - step_start,  # the step alone; saves and samples come after
                        "grad_norm": grad_norm,
                    }
                    self.after_step_times = {}
                    if epoch_end:
                        # Moved on before anything is saved, so a state never points at the end of an epoch.
                        state.epoch += 1
                        state.batch_in_epoch = 0
                        self._end_epoch(state.epoch)
                    self._after_step(epoch_end)
                    # After the last step the final save runs instead, and the stop follows it (see run).
                    if state.global_step < total and self._stop_requested(stop):
                        self._stop(stop.signal_name)
                    micro, loss_sum, t_sum, step_start = 0, 0.0, 0.0, time.perf_counter()
                    if state.global_step >= total:
                        break
                if stop.loader_failure is not None:
                    # The workers went down with the job after the stop request: back to the last whole step.
                    debug(f"data loader stopped: {stop.loader_failure}")
                    self._rewind_micro_batches(micro)
                    self._stop(stop.signal_name)
            self._write_metrics()
            if self.validator is not None:
                self.validator.at_end(self)

    def _rewind_micro_batches(self, micro: int) -> None:
        """Forget `micro` micro-batches accumulated since the last optimizer step (their gradients and position)."""
        if micro:
            self.state.batch_in_epoch -= micro
            self.accelerator.step -= micro  # accelerate's accumulation counter, saved in the state
            self.optimizer.zero_grad(set_to_none=True)

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
        self._settle()
        total, count = self.epoch_loss
        if count and self.accelerator.is_main_process:
            log_epoch_loss(self.accelerator, epoch, total / count)
        self.epoch_loss = [0.0, 0]

    def _after_step(self, epoch_end: bool) -> None:
        """Periodic saves and samples, kohya's rules: never at the last step or epoch (the final save covers it).

        Their time goes to the step's metrics as `save_seconds` and `sample_seconds`, apart from the step's own.
        """
        t, state, total = self.t, self.state, self.plan.total_steps
        step, epoch = state.global_step, state.epoch
        if self.validator is not None:  # first, so a save_best model is written before the periodic saves
            self.validator.after_step(self, epoch_end)  # its own line in metrics.jsonl has its time (val_seconds)
        with self._timed("save_seconds"):
            if t.save_every_n_steps and step % t.save_every_n_steps == 0 and step < total:
                self._save_periodic("step", step, t.save_every_n_steps)
            every_epochs = self.save_every_n_epochs
            if epoch_end and every_epochs and epoch % every_epochs == 0 and epoch < self.plan.epochs:
                self._save_periodic("epoch", epoch, every_epochs)
        with self._timed("sample_seconds"):
            self._maybe_sample(step, epoch_end=False)
            if epoch_end:
                self._maybe_sample(step, epoch_end=True)

    @contextlib.contextmanager
    def _timed(self, field: str) -> Iterator[None]:
        """Add the time the block takes to this step's `field` in metrics.jsonl (only when it did something)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            if spent > 0.01:  # a schedule check alone takes microseconds; a save or sample takes far longer
                self.after_step_times[field] = self.after_step_times.get(field, 0.0) + spent

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
        """Save a state after the step that just finished (unless a periodic save just did), then exit with 130."""
        stem = save_stem(self.t.output_name, step=self.state.global_step)
        path = state_path(self.t, stem)
        if self.last_state != (self.state.global_step, path):
            with self._timed("save_seconds"):
                path = self.save_state(path)
        self._write_metrics()
        # The run's own command with the state to resume from: pasted as printed, it continues this run.
        command = shlex.join([*self.command, "--set", f"resume={path}"])
        raise Interrupted(
            f"stopped by {signal_name or 'a signal'} after step {self.state.global_step}; state saved to {path}",
            hint=f"continue with: {command}",
        )

    def _settle(self) -> None:
        """Read the last step's loss (a GPU sync point) and check it and the gradients before anything is saved.

        The checked record waits in `settled` until `_write_metrics`; the trackers and the progress line get it now.
        """
        if self.pending is None:
            return
        record, self.pending = self.pending, None
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
            scalars = {"loss": record["loss"], **{f"lr/{k}": v for k, v in record["lr"].items()}}
            self.accelerator.log(scalars, step=record["step"])
        self.progress.update(record)
        self.settled = record

    def _write_metrics(self) -> None:
        """Write the last step's line to metrics.jsonl, with the time spent saving and sampling after it."""
        self._settle()
        if self.settled is None:
            return
        record, self.settled = {**self.settled, **self._rounded_times()}, None
        if self.accelerator.is_main_process:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def _rounded_times(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.after_step_times.items()}

    # ------------------------------------------------------------------------------------------ saves and state
    def save_model(self, path: Path) -> Path | None:
        """Write the model (the EMA weights when use_ema) at `path`; rank 0 writes. Never writes non-finite weights."""
        from sdtool.train.distributed import full_weights
        from sdtool.train.saving import save_trained_model

        self._settle()  # checks the last step's loss and gradients before anything is written
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
            t_ztsnr = self.t.zero_terminal_snr
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
                # A model trained with zero_terminal_snr is sampled with that schedule: its files say so.
                scheduler_config={**model.scheduler_config, **({"rescale_betas_zero_snr": True} if t_ztsnr else {})},
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

    @contextlib.contextmanager
    def _encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the accelerator for a while (sampling), when cached outputs parked them on the CPU."""
        if not self.encoders_parked:
            yield
            return
        for te in self.text_encoders:
            te.to(self.accelerator.device)
        try:
            yield
        finally:
            for te in self.text_encoders:
                te.to("cpu")

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

        self._settle()
        if self.accelerator.is_main_process:
            self._check_weights_finite()
        last = {**self.settled, **self._rounded_times()} if self.settled is not None else None
        record = {
            "sdtool_version": _version(),
            "train_state": self.state.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "epoch_loss": list(self.epoch_loss),
            "total_steps": self.plan.total_steps,
            "num_processes": self.accelerator.num_processes,
            "ema": self.ema is not None,
            "validation": self.validator.state_dict() if self.validator is not None else None,
            "torch": torch.__version__,
            "model_family": self.model.family.name,
            "config": self._config_record(),
            "model": self.model_identity,
            # This step's metrics line: written after the save, so a run killed in between gets it back on resume.
            "metrics": last,
        }
        try:
            out = write_state(self.accelerator, path, record, self.ema)
        except (TypeError, ValueError) as exc:
            raise SdtoolError(f"cannot write the training state to {path}: {exc}") from exc
        self.last_state = (self.state.global_step, out)
        info(f"saved state {out}")
        return out

    def _config_record(self) -> dict[str, Any]:
        record = config_record(self.cfg)
        record["seed"] = self.plan.seed  # the effective seed, also when the config leaves it unset
        return record

    def _resume(self, path: Path) -> dict[str, Any] | None:
        """Load a state folder: weights, optimizer, scaler, RNGs, accumulation counter, schedule, EMA, position.

        Returns the metrics line of the state's step (None in states that did not record it).
        """
        saved = read_state(path)
        check_resume_config(saved["config"], self._config_record(), self.ema is not None, bool(saved.get("ema")))
        family = saved.get("model_family")
        if family is not None and family != self.model.family.name:  # weights of another shape: refuse by name
            from sdtool.models.families import NAMES, by_name

            was = by_name(family).title if family in NAMES else repr(family)
            raise ConfigError(
                f"resume: the state {path} was trained on an {was} model, but {self.t.pretrained_model_name_or_path} "
                f"is {self.model.family.title}",
                hint="resume with the model the state was saved from (see its sdtool_state.json)",
            )
        recorded_model = saved.get("model")
        if recorded_model is not None and recorded_model != self.model_identity:
            warn(f"the model's weights changed since {path} was saved: the run will not equal an uninterrupted one")
        if saved.get("num_processes", 1) != self.accelerator.num_processes:
            warn(
                f"the state was saved by {saved.get('num_processes')} processes, this run has "
                f"{self.accelerator.num_processes}: the data order from here on differs"
            )
        configured = [group.get("initial_lr", group["lr"]) for group in self.optimizer.param_groups]  # the config's
        try:
            self.accelerator.load_state(str(path))
            if self.ema is not None:
                self.ema.load(path / EMA_FILE)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise SdtoolError(
                f"resume: cannot load {path} ({_first_problem(exc)})",
                hint="a state only resumes the run (model and settings) it was saved from",
            ) from exc
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.state.load_state_dict(saved["train_state"])
        from sdtool.train.optim import apply_learning_rates

        for index, old, new in apply_learning_rates(self.optimizer, self.lr_scheduler, configured):
            info(
                f"learning rate of {self.group_names[index]}: {new:g} from the config replaces {old:g} from the "
                f"state, from step {self.state.global_step + 1} on"
            )
        self.epoch_loss = [float(saved["epoch_loss"][0]), int(saved["epoch_loss"][1])]
        if self.validator is not None and saved.get("validation"):
            self.validator.load_state_dict(saved["validation"])  # the best so far, for save_best
        info(
            f"resumed from {path} at step {self.state.global_step} of {self.plan.total_steps} "
            f"(epoch {self.state.epoch + 1})"
        )
        return saved.get("metrics")

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
        self._settle()
        model = self.model
        vae = model.vae if model.vae is not None else self._sampling_vae()
        try:
            with self._weights_for_output(), sampling_mode(self.hypernetwork), self._encoders_on_device():
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
        except Exception as exc:  # a sample is a by-product: it never ends the run (sampling restores every state)
            warn(f"the samples at step {step} failed and were skipped ({type(exc).__name__}: {exc}); training goes on")
            return
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
        if self.accelerator.is_main_process:
            from sdtool.report import write_report_after_training

            write_report_after_training(Path(self.t.output_dir))
        return out

    def close(self) -> None:
        """Stop the data loader's workers, close the metrics file and the trackers (also after an error)."""
        if getattr(self, "loader", None) is not None:
            from sdtool.train.distributed import stop_workers

            stop_workers(self.loader)
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "accelerator", None) is not None:
            self.accelerator.end_training()

    def _load_vae_for_saving(self) -> Any:
        from sdtool.models.vae import load_vae

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
        """setup → train → cleanup; from the first step to the end of the final save a signal is a stop request, so
        a save in progress always finishes first (see signals.py)."""
        try:
            self.setup()  # nothing to save yet: a signal here ends the process at once, as it always did
            with self.stop:
                self.train()
                out = self.cleanup()
        finally:
            self.close()
        if self.stop.requested:
            raise Interrupted(
                f"stopped by {self.stop.signal_name} at the end of the run, after the final save: {out}",
                hint="the run is complete; nothing to resume",
            )
        return out


def _first_problem(exc: BaseException) -> str:
    """The first line of a load error: torch lists every mismatched tensor, one is enough to say what is wrong."""
    text = " ".join(str(exc).split())
    for marker in ("size mismatch for ", "Missing key(s)", "Unexpected key(s)"):
        if marker in text:
            text = text[text.index(marker) :].split(". ", 1)[0]
            break
    return text if len(text) <= 300 else text[:297] + "..."


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
