"""The training loop: one function that reads top to bottom (STYLE.md 1), and knows no Ray.

``train_loop(inputs, batches, world, hooks)`` runs under Ray Train (``RayWorld``, the job), in one
process (``LocalWorld``: benchmarks, unit tests) from this one copy. Each numbered step is a part of
the recipe: micro-batches (caption dropout already drawn by the batch source), bf16 autocast on GPU,
gradient accumulation, one all-reduce on which all ranks agree to stop, clipping, AdamW with warm-up
and cosine decay, EMA. Hooks (``pipelines/train/hooks.py``: NaN guard, logging, sample grids,
checkpoints, fault injection) watch ``LoopState`` and never change it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.config.train import TrainConfig
from ldm.diffusion import (
    timestep_bucket_names,
    timestep_bucket_sums,
    training_loss_terms,
)
from ldm.lora import add_lora
from ldm.optim import adamw
from ldm.sd_format import NoiseSchedule
from ldm.unet import build_unet
from pipelines.train.checkpoint import load_checkpoint, read_checkpoint_state
from pipelines.train.data import Batch, BatchSource, LatentsFacts
from pipelines.train.joint import split_pair, with_trained_text_encoder
from pipelines.train.recipe import autocast, derived_seed, ema_decay_at, learning_rate, update_ema
from pipelines.train.world import World


@dataclass(frozen=True)
class LoopInputs:
    """Everything the loop needs besides its data and its world."""

    cfg: TrainConfig
    facts: LatentsFacts
    init_weights: Mapping[str, torch.Tensor] | None = None  # fine-tuning: the U-Net to start from
    # init_from's diffusers U-Net config (the architecture); None: built from cfg.unet
    unet_config: Mapping[str, Any] | None = None
    # init_from's; None: SD's schedule with cfg.prediction_type and cfg.zero_terminal_snr
    schedule: NoiseSchedule | None = None
    # train_text_encoder: the encoder that starts training (the run's); batches then carry token ids
    text_encoder: Any = None

    @property
    def noise_schedule(self) -> NoiseSchedule:
        if self.schedule is not None:
            return self.schedule
        cfg = self.cfg
        return NoiseSchedule(cfg.prediction_type or "epsilon", zero_terminal_snr=bool(cfg.zero_terminal_snr))


class MetricsWindow:
    """Sums over the steps since the last log line; ``summary`` turns them into means and rates."""

    def __init__(self, bucket_names: list[str], batch_size: int):
        self.bucket_names, self.batch_size = bucket_names, batch_size
        self.reset()

    def reset(self) -> None:
        self.steps, self.loss, self.data_wait = 0, 0.0, 0.0
        self.bucket_loss = torch.zeros(len(self.bucket_names), dtype=torch.float64)
        self.bucket_samples = torch.zeros(len(self.bucket_names), dtype=torch.float64)
        self.started = time.monotonic()

    def add(
        self, loss: float, data_wait: float, bucket_loss: torch.Tensor, bucket_samples: torch.Tensor
    ) -> None:
        self.steps += 1
        self.loss += loss
        self.data_wait += data_wait
        self.bucket_loss += bucket_loss.cpu()
        self.bucket_samples += bucket_samples.cpu()

    def summary(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        steps = max(self.steps, 1)
        per_bucket = self.bucket_loss / self.bucket_samples.clamp(min=1)
        return {
            "loss": self.loss / steps,
            "samples_per_second": self.steps * self.batch_size / elapsed,
            "seconds_per_step": elapsed / steps,
            "data_wait_fraction": self.data_wait / elapsed,
            **{name: per_bucket[k].item() for k, name in enumerate(self.bucket_names)},
        }


@dataclass
class LoopState:
    """What hooks see. Only ``train_loop`` writes it."""

    cfg: TrainConfig
    world: World
    # the trained weights (not the DDP wrapper); with train_text_encoder a joint.TextEncoderAndUNet
    unet: torch.nn.Module
    ema_unet: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    window: MetricsWindow
    step: int  # optimizer steps done
    epoch: int
    resumed_from: int | None  # the checkpoint's step when this attempt resumed
    loss: float = math.nan  # of the last step, mean over ranks
    grad_norm: float = math.nan
    lr: float = math.nan
    data_wait: float = 0.0  # seconds this rank waited for the last step's batches
    stop: bool = False
    started: float = field(default_factory=time.monotonic)
    schedule: NoiseSchedule = NoiseSchedule()  # the objective's (samples are drawn with it)

    @property
    def sample_unet(self) -> torch.nn.Module:
        """What samples and the export use: the EMA when the run keeps one."""
        return self.ema_unet if self.ema_unet is not None else self.unet


class Hook:
    """Watches the loop (mosaicml/composer's callbacks); may raise, never changes the state."""

    def on_start(self, state: LoopState) -> None: ...

    def on_gradients(self, state: LoopState) -> None:
        """After backward and clipping, before the weights take the step."""

    def on_step_end(self, state: LoopState) -> None: ...

    def on_end(self, state: LoopState) -> None:
        """After the last step, or when the loop raises."""


@dataclass(frozen=True)
class StepSums:
    epoch: int
    loss: torch.Tensor  # float64 scalar, this rank's mean over micro-batches
    buckets: torch.Tensor  # float64 [2 * timestep_buckets]: loss sums, then sample counts
    data_wait: float


def train_loop(
    inputs: LoopInputs, batches: BatchSource, world: World, hooks: Sequence[Hook] = ()
) -> LoopState:
    """Train ``inputs.cfg.max_steps`` optimizer steps (or until ``max_minutes``); returns the final state."""
    cfg, device = inputs.cfg, world.device
    # 1. Model, EMA and optimizer, the same on every rank: seeded, or `init_from`'s U-Net (fine-tuning);
    #    this run's last checkpoint overrides both, and the run resumes on a fresh epoch.
    unet, ema_unet, optimizer = build_training_state(inputs)
    with world.last_checkpoint() as folder:
        step, epoch = resume(folder, unet, optimizer, ema_unet)
        resumed_from = step if folder is not None else None
    model = world.prepare_model(unet)  # DDP when world.size > 1
    if ema_unet is not None:
        ema_unet.to(device).eval()
    scheduler: Any = inputs.noise_schedule.make_scheduler()  # Any: diffusers' config is dynamic
    generator = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, world.rank, step))
    stream = batches(epoch)
    buckets = timestep_bucket_names(cfg.timestep_buckets, scheduler.config.num_train_timesteps)
    window = MetricsWindow(buckets, cfg.batch_size)
    state = LoopState(cfg, world, unet, ema_unet, optimizer, window, step, epoch, resumed_from)
    state.schedule = inputs.noise_schedule
    state.stop = step >= cfg.max_steps
    try:
        for hook in hooks:
            hook.on_start(state)
        while not state.stop:
            # 2. Forward and backward over grad_accum_steps micro-batches; DDP all-reduces on the last.
            sums = forward_backward(model, stream, scheduler, generator, cfg, device)

            # 3. All ranks agree on the loss, on stopping (DDP would hang if one rank left alone) and on
            #    the time spent (the mean of their clocks: lr_horizon "steps_or_time" must give every
            #    rank the same learning rate, or their weights drift apart).
            time_used = (
                (time.monotonic() - state.started) / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
            )
            flags = torch.tensor([float(time_used >= 1.0), time_used], dtype=torch.float64, device=device)
            totals = torch.cat([sums.loss.reshape(1), flags, sums.buckets])  # [3 + 2 * buckets]
            world.all_reduce(totals)
            state.loss = totals[0].item() / world.size

            # 4. Clip; hooks see the gradients before the weights take the step (the NaN guard); AdamW.
            state.grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip or math.inf
            ).item()
            for hook in hooks:
                hook.on_gradients(state)
            state.lr = learning_rate(state.step, cfg, time_used=totals[2].item() / world.size)
            for group in optimizer.param_groups:
                group["lr"] = state.lr * group.get("lr_scale", 1.0)  # older checkpoints: one group
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # 5. EMA of the weights: what samples and the export use.
            if ema_unet is not None and cfg.ema_decay is not None:
                update_ema(ema_unet, unet, ema_decay_at(state.step, cfg.ema_decay))

            # 6. Advance; the hooks log, sample, checkpoint.
            state.step, state.epoch, state.data_wait = state.step + 1, sums.epoch, sums.data_wait
            state.stop = state.step >= cfg.max_steps or totals[1].item() > 0
            window.add(state.loss, sums.data_wait, *totals[3:].cpu().chunk(2))
            for hook in hooks:
                hook.on_step_end(state)
    finally:
        for hook in hooks:
            hook.on_end(state)
    return state


def build_training_state(
    inputs: LoopInputs,
) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.optim.Optimizer]:
    """The U-Net (seeded, or the fine-tuning weights; with ``lora`` frozen under an adapter; with
    ``train_text_encoder`` paired with the encoder, ``pipelines/train/joint.py``), its EMA copy, and
    AdamW over what trains (the whole U-Net, or only the adapter; and the encoder)."""
    from ldm.positional_unet import unet_class_for

    cfg, facts = inputs.cfg, inputs.facts
    torch.manual_seed(cfg.seed)
    unet: Any  # diffusers' U-Net: its PeftAdapterMixin methods are untyped
    if inputs.unet_config is not None:
        unet = unet_class_for(inputs.unet_config).from_config(dict(inputs.unet_config))
    else:
        unet = build_unet(cfg.unet, facts.latent_shape[1], facts.latent_shape[0], facts.text_width)
    if inputs.init_weights is not None:
        unet.load_state_dict(dict(inputs.init_weights))
    if cfg.lora.enabled:
        add_lora(unet, cfg.lora, seed=cfg.seed)  # freezes the U-Net; only the adapter trains
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.train_text_encoder:  # one module from here on: DDP, clipping, AdamW and EMA see both
        if inputs.text_encoder is None or inputs.facts.pad_token_id is None:
            raise ValueError("train_text_encoder needs LoopInputs.text_encoder and the ids' pad id")
        unet = with_trained_text_encoder(unet, inputs.text_encoder, inputs.facts.pad_token_id)
    # With LoRA the copy's base weights stay equal to the U-Net's: update_ema moves the adapter only.
    ema_unet = copy.deepcopy(unet).requires_grad_(False) if cfg.ema_decay is not None else None
    optimizer = adamw(parameter_groups(unet, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return unet, ema_unet, optimizer


def parameter_groups(module: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW's groups of what trains: one, or with ``train_text_encoder`` the U-Net's and the encoder's,
    the second scaled to ``text_encoder_lr`` (``lr_scale``, applied wherever the loop sets the rate)."""
    unet, text_encoder = split_pair(module)
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr_scale": 1.0}]
    if text_encoder is not None:
        scale = (cfg.text_encoder_lr or cfg.lr) / cfg.lr
        groups.append(
            {"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr_scale": scale}
        )
    return groups


def resume(
    folder: Path | None, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, ema_unet: Any
) -> tuple[int, int]:
    """(step, first epoch) after loading the checkpoint in ``folder``; (0, 0) without one."""
    if folder is None:
        return 0, 0
    step = load_checkpoint(folder, unet, optimizer, ema_unet=ema_unet)
    return step, int(read_checkpoint_state(folder).get("epoch", 0)) + 1  # resume on a fresh epoch


def forward_backward(
    model: torch.nn.Module,
    stream: Iterator[Batch],
    scheduler: Any,
    generator: torch.Generator,
    cfg: TrainConfig,
    device: torch.device,
) -> StepSums:
    """Gradients of one optimizer step, accumulated over ``grad_accum_steps`` micro-batches."""
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP only: no all-reduce before the last
    num_timesteps = scheduler.config.num_train_timesteps
    loss = torch.zeros((), dtype=torch.float64, device=device)
    buckets = torch.zeros(2 * cfg.timestep_buckets, dtype=torch.float64, device=device)
    data_wait, epoch = 0.0, 0
    for micro in range(cfg.grad_accum_steps):
        waiting = time.monotonic()
        epoch, latents, text = next(stream)
        data_wait += time.monotonic() - waiting
        last = micro == cfg.grad_accum_steps - 1
        with contextlib.nullcontext() if last else no_sync():
            with autocast(cfg, device):
                terms = training_loss_terms(
                    model,
                    latents,
                    text,
                    scheduler,
                    prediction_type=scheduler.config.prediction_type,
                    loss_weighting=cfg.loss_weighting,
                    snr_gamma=cfg.snr_gamma,
                    noise_offset=cfg.noise_offset,
                    timestep_sampling=cfg.timestep_sampling,
                    timestep_logit_mean=cfg.timestep_logit_mean,
                    timestep_logit_std=cfg.timestep_logit_std,
                    generator=generator,
                )
            (terms.loss / cfg.grad_accum_steps).backward()
        bucket_loss, bucket_samples = timestep_bucket_sums(
            terms.per_sample, terms.timesteps, cfg.timestep_buckets, num_timesteps
        )
        loss += terms.loss.detach().double() / cfg.grad_accum_steps
        buckets += torch.cat([bucket_loss, bucket_samples]).to(buckets)
    return StepSums(epoch, loss, buckets, data_wait)
