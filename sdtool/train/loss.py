"""Noise, timesteps, targets and the loss of diffusion training (kohya's formulas, without its ordering bug).

Every random draw takes an explicit `torch.Generator`, so a step is reproducible from (seed, step) alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# SD1/2's schedule, used when the model's scheduler config leaves a value out.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# Keeps min-SNR / debiased weights finite at the zero-SNR terminal step of `zero_terminal_snr`.
_MIN_SNR = 1e-3


@dataclass
class LossOptions:
    """The loss-related training keys (see TrainConfig for their meaning)."""

    v_prediction: bool = False
    zero_terminal_snr: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False


class DiffusionObjective:
    """The DDPM training objective of a model: `noisy_inputs` for the U-Net, then `loss` of its prediction."""

    def __init__(self, scheduler_config: dict[str, Any], options: LossOptions, device: Any = "cpu"):
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        schedule = {**SD_SCHEDULE, **{k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None}}
        # The betas are rescaled inside the scheduler's constructor, so the SNR table below already sees the
        # zero-terminal-SNR schedule (kohya computes its SNR table before rescaling).
        scheduler = DDPMScheduler(**schedule, clip_sample=False, rescale_betas_zero_snr=options.zero_terminal_snr)
        self.options = options
        self.num_train_timesteps = int(schedule["num_train_timesteps"])
        cumprod = scheduler.alphas_cumprod  # type: ignore[attr-defined]
        self.alphas_cumprod = cumprod.to(device=device, dtype=torch.float32)
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        self.t_min = options.min_timestep or 0
        self.t_max = options.max_timestep if options.max_timestep is not None else self.num_train_timesteps

    def noisy_inputs(self, latents: Any, generator: Any) -> tuple[Any, Any, Any]:
        """(noisy latents, timesteps, target) for scaled latents x0."""
        opts = self.options
        b = latents.shape[0]
        rand = _Random(generator, latents.device)
        noise = rand.randn(latents.shape)
        if opts.noise_offset:
            offset = torch.full((b, 1, 1, 1), opts.noise_offset, device=latents.device)
            if opts.noise_offset_random_strength:
                offset = offset * rand.rand((b, 1, 1, 1))
            if opts.adaptive_noise_scale is not None:
                mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
                offset = (offset + opts.adaptive_noise_scale * mean).clamp(min=0)
            noise = noise + offset * rand.randn((b, latents.shape[1], 1, 1))
        elif opts.multires_noise_iterations:
            noise = self._pyramid(noise, rand)
        t = torch.randint(self.t_min, self.t_max, (b,), device=latents.device, generator=generator)
        input_noise = noise
        if opts.ip_noise_gamma:
            gamma = opts.ip_noise_gamma
            if opts.ip_noise_gamma_random_strength:
                gamma = gamma * rand.rand((b, 1, 1, 1))
            input_noise = noise + gamma * rand.randn(latents.shape)  # the target stays `noise`
        noisy = self._noised(latents, input_noise, t)
        return noisy.to(latents.dtype), t, self._target(latents, noise, t)

    def noisy_at(self, latents: Any, noise: Any, t: Any) -> tuple[Any, Any]:
        """(noisy latents, target) for scaled latents x0 with the given `noise` at timesteps `t`: plain DDPM noising,
        none of the training-only extra noise (offset, pyramid, input perturbation). Used by validation."""
        return self._noised(latents, noise, t), self._target(latents, noise, t)

    def _noised(self, latents: Any, noise: Any, t: Any) -> Any:
        ac = self.alphas_cumprod[t].view(latents.shape[0], 1, 1, 1)
        return ac.sqrt() * latents.float() + (1 - ac).sqrt() * noise

    def _target(self, latents: Any, noise: Any, t: Any) -> Any:
        if not self.options.v_prediction:
            return noise
        ac = self.alphas_cumprod[t].view(latents.shape[0], 1, 1, 1)
        return ac.sqrt() * noise - (1 - ac).sqrt() * latents.float()

    def _pyramid(self, noise: Any, rand: _Random) -> Any:
        b, c, h, w = noise.shape
        for i in range(self.options.multires_noise_iterations or 0):
            r = float(rand.rand(())) * 2 + 2
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            small = rand.randn((b, c, hn, wn))
            noise = noise + torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear") * (
                self.options.multires_noise_discount**i
            )
            if hn == 1 or wn == 1:
                break
        return noise / noise.std()

    def loss(self, pred: Any, target: Any, t: Any) -> Any:
        """The batch loss: elementwise loss in fp32, mean over C·H·W, per-sample SNR weights, mean over the batch."""
        return self.per_sample_loss(pred, target, t).mean()

    def per_sample_loss(self, pred: Any, target: Any, t: Any) -> Any:
        """The loss of each sample: elementwise loss in fp32, mean over C·H·W, times its SNR weight."""
        opts = self.options
        pred, target = pred.float(), target.float()
        if opts.loss_type == "l2":
            per = torch.nn.functional.mse_loss(pred, target, reduction="none")
        elif opts.loss_type == "l1":
            per = torch.nn.functional.l1_loss(pred, target, reduction="none")
        else:
            c = self._huber_c(t)
            root = torch.sqrt((pred - target) ** 2 + c**2) - c
            per = 2 * c * root if opts.loss_type == "huber" else 2 * root
        per_sample = per.mean(dim=tuple(range(1, per.ndim)))
        weights = self.weights(t)
        if weights is not None:
            per_sample = per_sample * weights
        return per_sample

    def weights(self, t: Any) -> Any | None:
        """min-SNR-γ, v-pred-like scaling and debiased-estimation weights per sample, or None when none is on."""
        opts = self.options
        if not (opts.min_snr_gamma or opts.scale_v_pred_loss_like_noise_pred or opts.debiased_estimation_loss):
            return None
        snr = self.snr[t].clamp(min=_MIN_SNR)
        w = torch.ones_like(snr)
        if opts.min_snr_gamma:
            gamma_snr = torch.clamp(snr, max=opts.min_snr_gamma)
            w = w * (gamma_snr / (snr + 1) if opts.v_prediction else gamma_snr / snr)
        capped = snr.clamp(max=1000)
        if opts.scale_v_pred_loss_like_noise_pred:
            w = w * capped / (capped + 1)
        if opts.debiased_estimation_loss:
            w = w * (1 / (capped + 1) if opts.v_prediction else 1 / capped.sqrt())
        return w

    def _huber_c(self, t: Any) -> Any:
        opts = self.options
        if opts.huber_schedule == "constant":
            c = torch.full(t.shape, opts.huber_c * opts.huber_scale, device=t.device)
        elif opts.huber_schedule == "exponential":
            alpha = -math.log(opts.huber_c) / self.num_train_timesteps
            c = torch.exp(-alpha * t.float()) * opts.huber_scale
        else:
            ac = self.alphas_cumprod[t]
            sigma = ((1 - ac) / ac).sqrt()
            c = (1 - opts.huber_c) / (1 + sigma) ** 2 + opts.huber_c
        return c.view(-1, 1, 1, 1)


class _Random:
    """Draws from one generator on the latents' device."""

    def __init__(self, generator: Any, device: Any):
        self.generator = generator
        self.device = device

    def randn(self, shape: Any) -> Any:
        return torch.randn(shape, generator=self.generator, device=self.device)

    def rand(self, shape: Any) -> Any:
        return torch.rand(shape, generator=self.generator, device=self.device)
