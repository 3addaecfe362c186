"""The pieces of the training recipe that the loop calls as visible steps: learning-rate schedule, EMA,
caption dropout, seeds, autocast, and the weight fingerprint that checks DDP replicas agree."""

from __future__ import annotations

import math

import torch

from ldm.config.train import TrainConfig


def learning_rate(step: int, cfg: TrainConfig, time_used: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant or a half cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``max_steps``
    (Loshchilov & Hutter 2017, "SGDR", eq. 5, without restarts).

    ``time_used`` is the fraction of ``max_minutes`` spent; with ``lr_horizon: steps_or_time`` the
    cosine is as far along as the further of the two budgets, so it reaches the floor when either ends.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_horizon == "steps_or_time":
        progress = max(progress, time_used)
    progress = min(1.0, progress)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay for the update after ``step`` optimizer steps: min(max_decay, (1 + step) / (10 + step)),
    the warm-up that diffusers' ``EMAModel`` uses by default, so early weights fade out fast."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema_unet: torch.nn.Module, unet: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, in place, for the weights that train (with LoRA: the
    adapter only; the frozen base is the same in both).

    Hand-written rather than ``diffusers.training_utils.EMAModel`` because the EMA is kept as a whole
    U-Net module: it samples, checkpoints and exports with ``save_pretrained`` exactly like the
    trained one, with no second state format.
    """
    pairs = [(e, p) for e, p in zip(ema_unet.parameters(), unet.parameters(), strict=True) if p.requires_grad]
    ema_params: list[torch.Tensor] = [e for e, _ in pairs]
    params = [p.detach().to(e.dtype) for e, p in pairs]
    # One fused multi-tensor kernel instead of one per parameter (hundreds of launches a step on GPU).
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def caption_dropout(
    text: torch.Tensor, empty_embedding: torch.Tensor, p: float, generator: torch.Generator
) -> torch.Tensor:
    """Replace each row of ``text`` [B, L, D] by ``empty_embedding`` [L, D] with probability ``p``.

    Training on the empty prompt part of the time gives classifier-free guidance an unconditional
    model to contrast with (Ho & Salimans 2022). ``generator`` is a CPU generator: the draw does not
    depend on the device.
    """
    dropped = torch.rand(text.shape[0], generator=generator) < p  # [B]
    return torch.where(dropped.to(text.device)[:, None, None], empty_embedding.to(text.dtype), text)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (run seed, rank, epoch...), well mixed by numpy's SeedSequence."""
    import numpy as np

    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on GPU (``mixed_precision="auto"``), or wherever ``"bf16"`` asks for it."""
    enabled = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def replica_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all DDP ranks when they hold identical weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
