"""The diffusion objective (ldm/diffusion.py) against hand computations in float64."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldm.diffusion import (
    make_noise_scheduler,
    min_snr_weights,
    sample_timesteps,
    signal_to_noise_ratio,
    training_loss,
    training_loss_terms,
    training_target,
)


def hand_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's scaled_linear schedule, written out: betas linear in sqrt(beta)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class ZeroNetwork(torch.nn.Module):
    """Predicts zeros: the loss is then the mean square of the target, which the test recomputes."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_schedule_matches_the_hand_written_one_and_the_pipeline_keys():
    scheduler = make_noise_scheduler("epsilon")
    # diffusers keeps alphas_cumprod in float32: agree to float32 rounding of a 1000-term product.
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), hand_alphas_cumprod(), rtol=1e-4, atol=1e-7)
    assert scheduler.config.steps_offset == 1
    assert scheduler.config.clip_sample is False
    assert scheduler.config.set_alpha_to_one is False
    assert make_noise_scheduler("v_prediction").config.prediction_type == "v_prediction"


def test_v_target_identity():
    """v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022), and x0 = sqrt(ab) x_t - sqrt(1-ab) v."""
    scheduler = make_noise_scheduler("v_prediction")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([0, 10, 500, 999])
    alpha_bar = hand_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)

    v = training_target(scheduler, latents, noise, timesteps, "v_prediction")
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)

    noisy = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(
        noisy, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * v, latents, rtol=1e-5, atol=1e-5
    )
    assert training_target(scheduler, latents, noise, timesteps, "epsilon") is noise


def test_min_snr_weights_against_hand_computation():
    scheduler = make_noise_scheduler()
    timesteps = torch.tensor([0, 100, 300, 999])
    alpha_bar = hand_alphas_cumprod()[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(
        signal_to_noise_ratio(scheduler, timesteps), snr, rtol=1e-6, atol=0.0
    )  # float64

    gamma = 5.0
    # Written out per timestep: low t has SNR >> gamma (weight gamma / SNR), t=999 has SNR << gamma.
    assert snr[0] > 1000 and snr[3] < 0.01
    expected_epsilon = [gamma / snr[0], gamma / snr[1], min(snr[2].item(), gamma) / snr[2], 1.0]
    weights = min_snr_weights(snr, gamma, "epsilon")
    torch.testing.assert_close(
        weights, torch.tensor([float(w) for w in expected_epsilon], dtype=torch.float64)
    )
    weights_v = min_snr_weights(snr, gamma, "v_prediction")
    expected_v = torch.clamp(snr, max=gamma) / (snr + 1)
    torch.testing.assert_close(weights_v, expected_v)
    assert weights_v[3].item() == pytest.approx(snr[3].item() / (snr[3].item() + 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("loss_weighting", ["none", "min_snr"])
def test_training_loss_equals_hand_computed_mse_for_a_zero_network(prediction_type, loss_weighting):
    scheduler = make_noise_scheduler(prediction_type)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(6, 16, 32)
    loss = training_loss(
        ZeroNetwork(),
        latents,
        text,
        scheduler,
        prediction_type=prediction_type,
        loss_weighting=loss_weighting,
        snr_gamma=5.0,
        generator=torch.Generator().manual_seed(7),
    )
    # Replay the same random draws: noise first, then timesteps.
    replay = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=replay)
    timesteps = torch.randint(0, 1000, (6,), generator=replay)
    alpha_bar = hand_alphas_cumprod()[timesteps]
    if prediction_type == "epsilon":
        target = noise.double()
    else:
        ab = alpha_bar.view(-1, 1, 1, 1)
        target = ab.sqrt() * noise.double() - (1 - ab).sqrt() * latents.double()
    per_sample = (target**2).mean(dim=(1, 2, 3))
    if loss_weighting == "min_snr":
        snr = alpha_bar / (1 - alpha_bar)
        per_sample = per_sample * (
            torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
        )
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-4)


def test_training_loss_is_reproducible_and_has_gradients():
    from ldm.testing import tiny_components

    unet = tiny_components()["unet"].train()
    scheduler = make_noise_scheduler()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))

    def loss_with(seed: int) -> torch.Tensor:
        return training_loss(
            unet, latents, text, scheduler, noise_offset=0.1, generator=torch.Generator().manual_seed(seed)
        )

    first, again, other = loss_with(3), loss_with(3), loss_with(4)
    assert torch.isfinite(first) and first.item() > 0
    assert first.item() == again.item()
    assert first.item() != other.item()
    first.backward()
    assert unet.conv_out.weight.grad is not None and unet.conv_out.weight.grad.abs().sum() > 0


def test_logit_normal_sampling_moves_the_timesteps_where_its_mean_says():
    def draw(**options) -> torch.Tensor:
        return sample_timesteps(20_000, 1000, generator=torch.Generator().manual_seed(0), **options)

    uniform = draw()
    assert uniform.dtype == torch.long and 0 <= uniform.min() and uniform.max() <= 999
    assert 0.45 < (uniform >= 500).float().mean() < 0.55
    assert 0.08 < (uniform < 100).float().mean() < 0.12
    centred = draw(sampling="logit_normal")
    assert 0.45 < (centred >= 500).float().mean() < 0.55
    assert (centred < 100).float().mean() < 0.03  # sigmoid(N(0, 1)) < 0.1 has p ~ 0.014
    noisy = draw(sampling="logit_normal", logit_mean=1.0)
    assert 0.8 < (noisy >= 500).float().mean() < 0.88  # P(N(1, 1) > 0) ~ 0.84
    assert 0 <= noisy.min() and noisy.max() <= 999


def test_training_loss_trains_on_the_timesteps_it_sampled():
    scheduler = make_noise_scheduler()
    latents, text = torch.randn(64, 4, 8, 8), torch.zeros(64, 16, 32)
    terms = training_loss_terms(
        ZeroNetwork(),
        latents,
        text,
        scheduler,
        timestep_sampling="logit_normal",
        timestep_logit_mean=4.0,
        timestep_logit_std=0.5,
        generator=torch.Generator().manual_seed(7),
    )
    # Replay: noise first, then the normal draw behind the timesteps.
    replay = torch.Generator().manual_seed(7)
    torch.randn(latents.shape, generator=replay)
    expected = (torch.sigmoid(4.0 + 0.5 * torch.randn((64,), generator=replay)) * 1000).long()
    assert torch.equal(terms.timesteps, expected)
    assert terms.timesteps.min() >= 750  # sigmoid(4 - 0.5 * 5.8) is still above 0.75


def test_unknown_modes_raise():
    scheduler = make_noise_scheduler()
    latents, text = torch.zeros(1, 4, 8, 8), torch.zeros(1, 16, 32)
    with pytest.raises(ValueError, match="prediction_type"):
        make_noise_scheduler("sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction_type"):
        training_loss(ZeroNetwork(), latents, text, scheduler, prediction_type="x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss_weighting"):
        training_loss(ZeroNetwork(), latents, text, scheduler, loss_weighting="p2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="snr_gamma"):
        min_snr_weights(torch.ones(2), 0.0, "epsilon")
    with pytest.raises(ValueError, match="timestep_sampling"):
        training_loss(ZeroNetwork(), latents, text, scheduler, timestep_sampling="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timestep_logit_std"):
        sample_timesteps(4, 1000, sampling="logit_normal", logit_std=0.0)


@pytest.mark.parametrize("loss_weighting", ["none", "min_snr"])
def test_at_a_zero_terminal_snr_the_last_step_is_pure_noise_and_its_v_target_is_the_image(loss_weighting):
    from ldm.sd_format import NoiseSchedule

    scheduler = NoiseSchedule(prediction_type="v_prediction", zero_terminal_snr=True).make_scheduler()
    generator = torch.Generator().manual_seed(3)
    latents, noise = torch.randn(2, 2, 4, 4, 4, generator=generator)
    last = torch.tensor([999, 999])
    assert torch.equal(scheduler.add_noise(latents, noise, last), noise)  # nothing of the image is left
    target = training_target(scheduler, latents, noise, last, "v_prediction")
    torch.testing.assert_close(target, -latents)  # v = sqrt(ab) eps - sqrt(1 - ab) x0 = -x0
    # SD's schedule leaves 0.069 of the image in the last step's input: what the model learns to read.
    assert 0.06 < make_noise_scheduler("v_prediction").alphas_cumprod[-1].sqrt().item() < 0.075
    loss = training_loss(
        ZeroNetwork(),
        latents,
        torch.randn(2, 16, 32),
        scheduler,
        prediction_type="v_prediction",
        loss_weighting=loss_weighting,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(loss)
