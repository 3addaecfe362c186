"""The autoencoder of the latent space: a diffusers ``AutoencoderKL``, 64 px images <-> 4 x 16 x 16 latents.

Ingest stores the *unscaled* posterior mean (`encode_images`); the scaling factor that makes the
latents roughly unit-variance for the U-Net is measured on training latents and kept in the model's
own config (``vae.config.scaling_factor``), where diffusers' pipelines read it.

`load_autoencoder` takes a bootstrap folder, any local or ``s3://`` folder written by
``save_pretrained``, or a Stable-Diffusion-layout folder whose autoencoder sits in ``vae/``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ldm.config.bootstrap import AutoencoderConfig
from ldm.first_stage.clip import check_images
from ldm.optim import adamw
from ldm.storage import materialize


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL; each block after the first halves the resolution."""
    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.image_size,
        # attention at the 16x16 bottleneck costs more than it gives on flat synthetic scenes
        mid_block_add_attention=False,
    )


def load_autoencoder(spec: str, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Load an AutoencoderKL in eval mode from a local or ``s3://`` folder (or its ``vae/`` subfolder)."""
    folder = materialize(str(spec))
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{spec} is not an autoencoder folder: no config.json (nor vae/config.json)")
    vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    return vae.to(device).eval()


def save_autoencoder(vae: AutoencoderKL, folder: str | Path) -> Path:
    """``save_pretrained`` in safetensors (the config carries the scaling factor)."""
    vae.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in -1..1, the range AutoencoderKL is trained on."""
    images = check_images(images)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(pixels: torch.Tensor) -> np.ndarray:
    """float NCHW in -1..1 -> uint8 NHWC (rounded, clipped)."""
    pixels = ((pixels.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Posterior mean of each image, UNSCALED, float32 [N, C, H/f, W/f] on the CPU."""
    device, dtype = vae.device, vae.dtype
    parts = []
    for start in range(0, len(images), batch_size):
        pixels = images_to_tensor(images[start : start + batch_size]).to(device, dtype)
        parts.append(vae.encode(pixels).latent_dist.mean.float().cpu())
    if not parts:
        raise ValueError("encode_images needs at least one image")
    return torch.cat(parts)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """UNSCALED latents [N, C, h, w] -> uint8 NHWC images."""
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(
            f"expected latents [N, {vae.config.latent_channels}, h, w], got shape {tuple(latents.shape)}"
        )
    device, dtype = vae.device, vae.dtype
    parts = []
    for start in range(0, len(latents), batch_size):
        pixels = vae.decode(latents[start : start + batch_size].to(device, dtype)).sample
        parts.append(tensor_to_images(pixels))
    return np.concatenate(parts)


def reconstruction_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    """PSNR in dB of encode -> decode over ``images``, from the MSE pooled over all pixels (0..255)."""
    restored = decode_latents(vae, encode_images(vae, images))
    mse = np.mean((restored.astype(np.float64) - images.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * math.log10(255.0**2 / mse))


def latent_scaling_factor(vae: AutoencoderKL, images: np.ndarray) -> float:
    """1 / std of the unscaled latents of ``images``: makes the U-Net's inputs roughly unit-variance."""
    return float(1.0 / encode_images(vae, images).std().item())


def gradient_difference(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the two images' horizontal and vertical pixel differences.

    The gradient difference loss of Mathieu et al. (2016), written here because it is four lines and
    neither diffusers nor torch ships it. Pixel MSE weighs a 1-px star arm by its area, which is tiny,
    so a round blob costs little more than the star; the differences weigh it by its edges.
    """

    def differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (rx, ry), (tx, ty) = differences(reconstruction), differences(target)
    return F.mse_loss(rx, tx) + F.mse_loss(ry, ty)


def train_autoencoder(
    vae: AutoencoderKL,
    images: np.ndarray,
    cfg: AutoencoderConfig,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Reconstruction (MSE) + a tiny KL term on random training batches; returns the loss per step.

    No perceptual or adversarial loss: the scenes are flat shapes on a plain background, where pixel
    MSE already gives sharp edges at this resolution.
    """
    vae.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = adamw(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    # cosine decay: the last steps at a small learning rate buy a good part of the final PSNR
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr * 0.05)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(cfg.steps):
        index = torch.randint(len(images), (cfg.batch_size,), generator=generator).numpy()
        pixels = images_to_tensor(images[index]).to(vae.device)  # [B, 3, 64, 64] in -1..1
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator)  # [B, 4, 16, 16]
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, pixels) + cfg.kl_weight * posterior.kl().mean()
        if cfg.edge_loss_weight:
            loss = loss + cfg.edge_loss_weight * gradient_difference(reconstruction, pixels)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"autoencoder loss is {losses[-1]} at step {step}")
        if step % 100 == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - started
            log(f"[autoencoder] step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} ({elapsed:.0f}s)")
    vae.eval()
    return losses
