"""The diffusion training objective: the one place where the noise schedule and the loss are defined.

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 4):

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,     eps ~ N(0, I)

The network is trained to predict one of two targets (``PredictionType``):

- ``"epsilon"``: the noise ``eps`` (Ho et al. 2020, eq. 14, the "simple" loss).
- ``"v_prediction"``: the velocity ``v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x_0``
  (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", sec. 4).

and the per-sample squared error may be re-weighted (``LossWeighting``):

- ``"none"``: plain mean squared error.
- ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
  Strategy", eq. 9 ff.). With ``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)`` the weight on the x_0 loss
  is ``min(SNR, gamma)``; expressed on the epsilon loss that is ``min(SNR, gamma) / SNR`` and on the v
  loss ``min(SNR, gamma) / (SNR + 1)``.

Which timesteps a batch trains on (``TimestepSampling``):

- ``"uniform"``: t uniform over the schedule (Ho et al. 2020).
- ``"logit_normal"``: t / T = sigmoid(n), n ~ N(mean, std) (Esser et al. 2024, "Scaling Rectified Flow
  Transformers", sec. 3.1, Stable Diffusion 3). More of each batch lands in the middle of the schedule
  (mean 0) or, with mean > 0, at high noise. The weights above are not divided by the sampling density:
  like SD3, the sampling is part of the objective, not only a variance reduction.

The schedule is diffusers' ``DDPMScheduler`` (its ``add_noise`` and ``get_velocity`` implement the two
equations above), so the exported pipeline samples with exactly the schedule that training used.
The named schedule below never changes once shipped: a new schedule gets a new name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported lazily below: configs import the Literal types without loading diffusers
    from diffusers import DDPMScheduler

PredictionType = Literal["epsilon", "v_prediction"]
LossWeighting = Literal["none", "min_snr"]
TimestepSampling = Literal["uniform", "logit_normal"]

# Stable Diffusion's schedule: "scaled_linear" betas (linear in sqrt(beta)) from 0.00085 to 0.012 over
# 1000 steps. steps_offset=1, clip_sample=False and set_alpha_to_one=False are what the diffusers
# pipelines expect; without them StableDiffusionPipeline rewrites the config with a warning (docs/TRAPS.md).
SCHEDULE_SD_SCALED_LINEAR: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def check_prediction_type(value: str) -> PredictionType:
    if value not in get_args(PredictionType):
        raise ValueError(f"unknown prediction_type {value!r}; expected one of {get_args(PredictionType)}")
    return value  # type: ignore[return-value]


def check_loss_weighting(value: str) -> LossWeighting:
    if value not in get_args(LossWeighting):
        raise ValueError(f"unknown loss_weighting {value!r}; expected one of {get_args(LossWeighting)}")
    return value  # type: ignore[return-value]


def make_noise_scheduler(prediction_type: PredictionType = "epsilon") -> DDPMScheduler:
    """The training schedule (and the config every inference scheduler of the pipeline derives from)."""
    from diffusers import DDPMScheduler

    # from_config, not the constructor: set_alpha_to_one is a DDIM-only key that DDPMScheduler's
    # constructor rejects, but it must stay in the saved config for the DDIM sampler built from it.
    config = {**SCHEDULE_SD_SCALED_LINEAR, "prediction_type": check_prediction_type(prediction_type)}
    return DDPMScheduler.from_config(config)


def signal_to_noise_ratio(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), computed in float64, returned as float64 [B].

    The cumulative product is redone in float64 from the betas: diffusers keeps ``alphas_cumprod`` in
    float32, whose rounding reaches ~3e-5 relative error at large t.
    """
    alphas_cumprod = torch.cumprod(
        1.0 - scheduler.betas.to(dtype=torch.float64, device=timesteps.device), dim=0
    )
    alpha_bar = alphas_cumprod[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) for the loss on the given prediction target."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    clipped = torch.clamp(snr, max=gamma)
    if check_prediction_type(prediction_type) == "epsilon":
        return clipped / snr
    return clipped / (snr + 1.0)


def check_timestep_sampling(value: str) -> TimestepSampling:
    if value not in get_args(TimestepSampling):
        raise ValueError(f"unknown timestep_sampling {value!r}; expected one of {get_args(TimestepSampling)}")
    return value  # type: ignore[return-value]


def sample_timesteps(
    batch: int,
    num_train_timesteps: int,
    *,
    sampling: TimestepSampling = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[batch] long timesteps in [0, num_train_timesteps), drawn as ``sampling`` says (module docstring)."""
    if check_timestep_sampling(sampling) == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device).long()
    if logit_std <= 0:
        raise ValueError(f"timestep_logit_std must be > 0, got {logit_std}")
    normal = torch.randn((batch,), generator=generator, device=device)
    fraction = torch.sigmoid(logit_mean + logit_std * normal)  # in (0, 1)
    return (fraction * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def training_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """What the network should output for ``x_t`` built from ``latents`` and ``noise``."""
    if check_prediction_type(prediction_type) == "epsilon":
        return noise
    return scheduler.get_velocity(latents, noise, timesteps)


@dataclass(frozen=True)
class LossTerms:
    """The per-sample pieces of one loss estimate, for the loss and for the per-timestep metrics."""

    per_sample: torch.Tensor  # [B] float32, weighted squared error of each sample (with gradients)
    timesteps: torch.Tensor  # [B] long, the timestep each sample was noised to

    @property
    def loss(self) -> torch.Tensor:
        return self.per_sample.mean()


def training_loss_terms(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    prediction_type: PredictionType = "epsilon",
    loss_weighting: LossWeighting = "none",
    snr_gamma: float = 5.0,
    noise_offset: float = 0.0,
    timestep_sampling: TimestepSampling = "uniform",
    timestep_logit_mean: float = 0.0,
    timestep_logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> LossTerms:
    """One Monte-Carlo estimate of the diffusion loss for a batch, kept per sample.

    ``latents`` [B, C, H, W] are already multiplied by the autoencoder's scaling factor;
    ``text_embeddings`` [B, L, D] are the text encoder's last hidden state (the U-Net's cross-attention
    context). ``noise_offset`` adds a per-channel constant to the noise (the "offset noise" trick that
    lets the model shift an image's mean brightness); 0 disables it. Randomness (timesteps, noise)
    comes only from ``generator`` so that a seeded call is reproducible.
    """
    check_prediction_type(prediction_type)
    check_loss_weighting(loss_weighting)
    batch, channels = latents.shape[:2]
    device = latents.device

    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((batch, channels, 1, 1), generator=generator, device=device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    timesteps = sample_timesteps(
        batch,
        scheduler.config.num_train_timesteps,
        sampling=timestep_sampling,
        logit_mean=timestep_logit_mean,
        logit_std=timestep_logit_std,
        generator=generator,
        device=device,
    )

    noisy_latents = scheduler.add_noise(latents, noise, timesteps)  # x_t, Ho et al. eq. 4
    target = training_target(scheduler, latents, noise, timesteps, prediction_type)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample

    # The error is taken in float32 even under bf16 autocast: the loss is a small difference of
    # large numbers at low t.
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # [B]
    if loss_weighting == "min_snr":
        weights = min_snr_weights(signal_to_noise_ratio(scheduler, timesteps), snr_gamma, prediction_type)
        per_sample = per_sample * weights.to(per_sample.dtype)
    return LossTerms(per_sample=per_sample, timesteps=timesteps)


def training_loss(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    scheduler: DDPMScheduler,
    *,
    prediction_type: PredictionType = "epsilon",
    loss_weighting: LossWeighting = "none",
    snr_gamma: float = 5.0,
    noise_offset: float = 0.0,
    timestep_sampling: TimestepSampling = "uniform",
    timestep_logit_mean: float = 0.0,
    timestep_logit_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The batch mean of ``training_loss_terms``: a scalar tensor with gradients."""
    return training_loss_terms(
        unet,
        latents,
        text_embeddings,
        scheduler,
        prediction_type=prediction_type,
        loss_weighting=loss_weighting,
        snr_gamma=snr_gamma,
        noise_offset=noise_offset,
        timestep_sampling=timestep_sampling,
        timestep_logit_mean=timestep_logit_mean,
        timestep_logit_std=timestep_logit_std,
        generator=generator,
    ).loss


def timestep_bucket_sums(
    per_sample: torch.Tensor, timesteps: torch.Tensor, num_buckets: int, num_train_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of the per-sample losses in ``num_buckets`` equal ranges of t, float64 [K] each.

    Sums and counts (not means) so that they add up over micro-batches and over DDP ranks; bucket k
    holds t in [k * T / K, (k + 1) * T / K). The loss at high t (mostly noise) and at low t (fine
    detail) move differently during training: one mean hides which end is not learning.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    bucket = (timesteps * num_buckets) // num_train_timesteps  # [B] in 0..K-1
    sums = torch.zeros(num_buckets, dtype=torch.float64, device=per_sample.device)
    counts = torch.zeros(num_buckets, dtype=torch.float64, device=per_sample.device)
    sums.index_add_(0, bucket, per_sample.detach().double())
    counts.index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float64))
    return sums, counts


def timestep_bucket_names(num_buckets: int, num_train_timesteps: int = 1000) -> list[str]:
    """Metric names of the buckets: ``loss_t000-249`` ... for 4 buckets of 1000 steps."""
    width = len(str(num_train_timesteps - 1))
    edges = [k * num_train_timesteps // num_buckets for k in range(num_buckets + 1)]
    return [f"loss_t{edges[k]:0{width}d}-{edges[k + 1] - 1:0{width}d}" for k in range(num_buckets)]
