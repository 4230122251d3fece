"""Noise, targets and loss weights against diffusers' scheduler and the formulas written out."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from sdtool.train.loss import SD_SCHEDULE, DiffusionObjective, LossOptions


def objective(**opts) -> DiffusionObjective:
    return DiffusionObjective(dict(SD_SCHEDULE), LossOptions(**opts))


def test_noisy_inputs_and_targets_match_diffusers():
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = DDPMScheduler(**SD_SCHEDULE)
    for v in (False, True):
        obj = objective(v_prediction=v)
        noisy, t, target = obj.noisy_inputs(latents, torch.Generator().manual_seed(1))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(noisy, ref.add_noise(latents, noise, t))
        torch.testing.assert_close(target, ref.get_velocity(latents, noise, t) if v else noise)


def test_timestep_range():
    obj = objective(min_timestep=100, max_timestep=110)
    _, t, _ = obj.noisy_inputs(torch.zeros(256, 4, 2, 2), torch.Generator().manual_seed(0))
    assert t.min() >= 100 and t.max() < 110 and len(t.unique()) == 10


def test_zero_terminal_snr_rescales_before_the_snr_weights():
    plain = objective(min_snr_gamma=5, v_prediction=True)
    zero = objective(min_snr_gamma=5, v_prediction=True, zero_terminal_snr=True)
    rescaled = DDPMScheduler(**SD_SCHEDULE, rescale_betas_zero_snr=True).alphas_cumprod
    torch.testing.assert_close(zero.snr, rescaled / (1 - rescaled))
    assert zero.snr[-1] < 1e-6 < plain.snr[-1]
    t = torch.tensor([900])
    assert not torch.allclose(zero.weights(t), plain.weights(t))
    assert torch.isfinite(zero.weights(torch.tensor([999]))).all()


def test_min_snr_and_debiased_weights():
    t = torch.tensor([10, 500, 990])
    for v in (False, True):
        obj = objective(v_prediction=v, min_snr_gamma=5.0)
        snr = obj.snr[t]
        want = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if v else snr)
        torch.testing.assert_close(obj.weights(t), want)
        deb = objective(v_prediction=v, debiased_estimation_loss=True)
        torch.testing.assert_close(deb.weights(t), 1 / (snr + 1) if v else 1 / snr.sqrt())
    assert objective().weights(t) is None


def test_loss_types():
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([100, 800])
    torch.testing.assert_close(objective().loss(pred, target, t), torch.nn.functional.mse_loss(pred, target))
    torch.testing.assert_close(objective(loss_type="l1").loss(pred, target, t), (pred - target).abs().mean())
    c = 0.3
    huber = objective(loss_type="huber", huber_schedule="constant", huber_c=c)
    want = (2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)).mean()
    torch.testing.assert_close(huber.loss(pred, target, t), want)


def test_noise_offset_shifts_channel_means():
    obj = objective(noise_offset=1.0)
    latents = torch.zeros(64, 4, 16, 16)
    _noisy, _t, target = obj.noisy_inputs(latents, torch.Generator().manual_seed(0))
    # the target noise carries a per-(sample, channel) offset: channel means spread far beyond plain noise
    assert target.mean(dim=(2, 3)).std() > 0.5
    plain = objective().noisy_inputs(latents, torch.Generator().manual_seed(0))[2]
    assert plain.mean(dim=(2, 3)).std() < 0.2
