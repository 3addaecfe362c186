"""`ldm train`: train the text-conditioned U-Net on Ray Train, track it in MLflow, export and register it.

The job is a short recipe run by the driver (``run_train``):

1. read the latents' facts from the Parquet schema (scaling factor, latent and text-embedding shapes);
2. precompute the empty-prompt embedding (caption dropout) with the run's text encoder;
3. open the MLflow run: full config as params and YAML, the data manifest as the run's input;
4. with ``init_from``, resolve the model whose U-Net starts training (fine-tuning);
5. fit a ``TorchTrainer``: ``train_loop_per_worker`` on each worker, DDP (gloo on CPU, NCCL on GPU),
   each worker streaming its shard of the latents with Ray Data; ``FailureConfig(max_failures)``
   restarts a failed worker group from the last checkpoint;
6. export the last checkpoint's EMA U-Net as a diffusers pipeline folder and register it, linked to
   the run (alias ``candidate``).

The training loop reads top to bottom in one function (STYLE.md 1), one numbered step per part of the
recipe: micro-batches with caption dropout drawn at load time, bf16 autocast on GPU, gradient
accumulation, clipping, a NaN/inf guard naming the step, AdamW with warm-up and cosine decay, EMA.
What watches it (MLflow metrics, system metrics, sample grids) lives in ``RankZeroMonitor`` and never
changes training state; an MLflow failure only warns. Checkpoints hold the U-Net and its EMA
(``save_pretrained``, safetensors), the optimizer state (safetensors + JSON: nothing here unpickles),
step, epoch and config (the LR schedule is a function of step and config); a run restarted under the
same ``run_name`` resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ldm import storage
from ldm.config.train import TrainConfig
from ldm.contract import (
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    WorkDir,
)
from ldm.diffusion import (
    make_noise_scheduler,
    timestep_bucket_names,
    timestep_bucket_sums,
    training_loss_terms,
)
from ldm.errors import DataError
from ldm.unet import build_unet

log = logging.getLogger(__name__)

UNET_DIR = "unet"
EMA_UNET_DIR = "ema_unet"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
# Test hook (fault-tolerance test): "RANK:STEP" makes that worker SIGKILL itself once, see inject_fault.
FAULT_ENV = "LDM_FAULT_KILL_WORKER"


# --- what the data says about itself --------------------------------------------------------------


@dataclass(frozen=True)
class LatentsFacts:
    """Read from the Parquet schema of ``latents/``; the scaling factor is never a literal (STYLE.md 7)."""

    scaling_factor: float
    latent_shape: tuple[int, int, int]  # C, H, W
    text_embedding_shape: tuple[int, int]  # L, D


def _tensor_shape(schema, column: str, meta_key: bytes) -> tuple[int, ...]:
    metadata = schema.metadata or {}
    if meta_key in metadata:
        return tuple(json.loads(metadata[meta_key]))
    field_type = schema.field(column).type
    if hasattr(field_type, "shape"):  # arrow.fixed_shape_tensor
        return tuple(field_type.shape)
    raise DataError(
        f"latents: column {column!r} is not a fixed-shape tensor and metadata has no {meta_key!r}"
    )


def read_latents_facts(latents_uri: str) -> LatentsFacts:
    """Scaling factor and tensor shapes from the schema of the first Parquet file under ``latents_uri``."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(latents_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(
        info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet")
    )
    if not files:
        raise DataError(f"no Parquet files under {latents_uri}: run `ldm ingest` first or pass --data")
    schema = pq.read_schema(files[0], filesystem=fs)
    for column in (COL_LATENT, COL_TEXT_EMBEDDING):
        if column not in schema.names:
            raise DataError(f"{files[0]}: missing column {column!r}")
    metadata = schema.metadata or {}
    if META_SCALING_FACTOR not in metadata:
        raise DataError(f"{files[0]}: schema metadata has no {META_SCALING_FACTOR!r} (latent scaling factor)")
    latent_shape = _tensor_shape(schema, COL_LATENT, META_LATENT_SHAPE)
    text_shape = _tensor_shape(schema, COL_TEXT_EMBEDDING, META_TEXT_EMBEDDING_SHAPE)
    if len(latent_shape) != 3 or latent_shape[1] != latent_shape[2] or len(text_shape) != 2:
        raise DataError(
            f"latents: expected square [C, H, W] latents and [L, D] embeddings, got {latent_shape}, {text_shape}"
        )
    return LatentsFacts(float(json.loads(metadata[META_SCALING_FACTOR])), latent_shape, text_shape)  # type: ignore[arg-type]


# --- checkpoints: safetensors + JSON, nothing pickled ---------------------------------------------


def save_checkpoint(
    folder: Path,
    unet,
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    metrics: dict,
    *,
    ema_unet=None,
    epoch: int = 0,
) -> None:
    """U-Net (and its EMA) via ``save_pretrained``, optimizer state, step, epoch and config.

    The learning-rate schedule is a pure function of (step, config), so step + config restore it.
    """
    from safetensors.torch import save_file

    unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    if ema_unet is not None:
        ema_unet.save_pretrained(folder / EMA_UNET_DIR, safe_serialization=True)
    state = optimizer.state_dict()
    tensors = {
        f"{param_id}.{name}": value.detach().cpu().contiguous()
        for param_id, param_state in state["state"].items()
        for name, value in param_state.items()
        if torch.is_tensor(value)
    }
    save_file(tensors, str(folder / OPTIMIZER_WEIGHTS))
    (folder / OPTIMIZER_META).write_text(json.dumps({"param_groups": state["param_groups"]}))
    (folder / STATE_FILE).write_text(
        json.dumps({"step": step, "epoch": epoch, "lr": learning_rate(max(step - 1, 0), cfg), **metrics})
    )
    (folder / CONFIG_FILE).write_text(cfg.to_yaml())


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint: step, epoch, lr and the metrics reported with it."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def load_checkpoint(folder: Path, unet, optimizer: torch.optim.Optimizer, *, ema_unet=None) -> int:
    """Load weights and optimizer state saved by ``save_checkpoint`` in place; returns the step."""
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(str(folder / UNET_DIR / WEIGHTS_FILE)))
    if ema_unet is not None:
        # A checkpoint written without EMA (ema_decay was None) starts the EMA from the weights.
        ema_source = folder / EMA_UNET_DIR if (folder / EMA_UNET_DIR).is_dir() else folder / UNET_DIR
        ema_unet.load_state_dict(load_file(str(ema_source / WEIGHTS_FILE)))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / OPTIMIZER_WEIGHTS)).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    param_groups = json.loads((folder / OPTIMIZER_META).read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    return int(read_checkpoint_state(folder)["step"])


# --- the recipe's pieces (each one a visible step in the loop) ------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup_steps``, then
    constant or a half cosine from ``lr`` down to ``min_lr_ratio * lr`` at ``max_steps``
    (Loshchilov & Hutter 2017, "SGDR", eq. 5, without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay for the update after ``step`` optimizer steps: min(max_decay, (1 + step) / (10 + step)),
    the warm-up that diffusers' ``EMAModel`` uses by default, so early weights fade out fast."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema_unet: torch.nn.Module, unet: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, in place.

    Hand-written rather than ``diffusers.training_utils.EMAModel`` because the EMA is kept as a whole
    U-Net module: it samples, checkpoints and exports with ``save_pretrained`` exactly like the
    trained one, with no second state format.
    """
    ema_params = list(ema_unet.parameters())
    params = [p.detach().to(e.dtype) for e, p in zip(ema_params, unet.parameters(), strict=True)]
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


def batch_stream(
    shard,
    cfg: TrainConfig,
    facts: LatentsFacts,
    empty_embedding: torch.Tensor,
    rank: int,
    first_epoch: int,
    device: torch.device,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Endless (epoch, latents [B, C, H, W] scaled, text [B, L, D]) micro-batches of this worker's shard.

    Each epoch reshuffles rows within the shuffle buffer and draws caption dropout afresh, both from
    seeds derived from (run seed, rank, epoch): a resumed run sees the same epochs it would have seen.
    """
    epoch = first_epoch
    while True:
        dropout_generator = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 1))
        batches = shard.iter_torch_batches(
            batch_size=cfg.micro_batch_size,
            dtypes=torch.float32,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=derived_seed(cfg.seed, rank, epoch, 2) % 2**31 if cfg.shuffle_buffer else None,
        )
        seen = 0
        for batch in batches:
            seen += 1
            latents = batch[COL_LATENT] * facts.scaling_factor
            text = caption_dropout(
                batch[COL_TEXT_EMBEDDING], empty_embedding, cfg.caption_dropout, dropout_generator
            )
            yield epoch, latents, text
        if seen == 0:
            raise DataError(
                f"a worker's shard holds fewer rows than its micro-batch of {cfg.micro_batch_size}: "
                "add data or lower batch_size"
            )
        epoch += 1


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


# --- hooks that watch the loop ---------------------------------------------------------------------


class RankZeroMonitor:
    """MLflow metrics, system metrics and sample grids from rank 0. Reads the model, never changes it;
    failures warn.

    After the first MLflow failure it stops logging (a tracking server that is down makes every call
    retry for minutes, TRAPS.md), so training goes on at full speed.
    """

    def __init__(self, cfg: TrainConfig, loop: dict[str, Any], enabled: bool, device: torch.device):
        self.cfg = cfg
        self.run_id: str | None = loop["mlflow_run_id"] if enabled else None
        self.tracking_uri: str = loop["tracking_uri"]
        self.scaling_factor: float = loop["facts"]["scaling_factor"]
        self.prediction_type = cfg.prediction_type
        self.device = device
        self.sample_parts: dict[str, Any] | None = None
        self.system_monitor = None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _disable(self, what: str, error: Exception) -> None:
        warnings.warn(f"MLflow {what} failed, training goes on without tracking: {error}", stacklevel=2)
        self.run_id = None
        self.stop()

    def start(self, resumed_from: int | None) -> None:
        """System metrics in a background thread; a resumed attempt notes where it started again."""
        if not self.active:
            return
        try:
            if resumed_from is not None:
                self._client().log_metric(self.run_id, "resumed_from_step", resumed_from, step=resumed_from)
            if self.cfg.system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.system_monitor = SystemMetricsMonitor(
                    self.run_id,
                    sampling_interval=self.cfg.system_metrics_interval,
                    resume_logging=resumed_from is not None,
                    tracking_uri=self.tracking_uri,
                )
                self.system_monitor.start()
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self._disable("start", error)

    def stop(self) -> None:
        if self.system_monitor is not None:
            self.system_monitor.finish()
            self.system_monitor = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        try:
            entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
            self._client().log_batch(self.run_id, metrics=entries)
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            self._disable("metric logging", error)

    @torch.no_grad()
    def log_samples(self, step: int, unet: torch.nn.Module) -> None:
        """A grid of the fixed prompts at a fixed seed, generated by a pipeline around ``unet``."""
        if not self.active or not self.cfg.sample_prompts:
            return
        from ldm.pipeline import generate, make_grid

        was_training = unet.training
        unet.eval()
        try:
            grid = make_grid(self._generate(unet, generate), rows=1, cols=len(self.cfg.sample_prompts))
            self._client().log_image(self.run_id, grid, key="samples", step=step)
        except Exception as error:  # noqa: BLE001 - a failed sample grid must not stop training
            self._disable("sample grid", error)
        finally:
            unet.train(was_training)

    def _generate(self, unet: torch.nn.Module, generate) -> list:
        from ldm.pipeline import assemble_pipeline

        if self.sample_parts is None:  # loaded once, on first use, on rank 0 only
            parts = load_first_stage(self.cfg, self.scaling_factor)
            parts["vae"].to(self.device)
            parts["text_encoder"].to(self.device)
            self.sample_parts = parts
        parts = self.sample_parts
        pipe = assemble_pipeline(
            unet,
            parts["vae"],
            parts["text_encoder"],
            parts["tokenizer"],
            make_noise_scheduler(self.prediction_type),
        )
        result = generate(
            pipe,
            self.cfg.sample_prompts,
            num_inference_steps=self.cfg.sample_steps,
            guidance_scale=self.cfg.sample_guidance,
            seed=self.cfg.sample_seed,
        )
        return result.images


def load_first_stage(cfg: TrainConfig, scaling_factor: float) -> dict[str, Any]:
    """The frozen autoencoder, text encoder and tokenizer of this run."""
    from ldm.first_stage.autoencoder import load_autoencoder
    from ldm.first_stage.text_encoder import load_text_encoder

    work = WorkDir(cfg.workdir)
    vae = load_autoencoder(cfg.autoencoder or str(work.autoencoder))
    # The pipeline decodes with latents / vae.config.scaling_factor: it must be the factor the U-Net
    # was trained with, i.e. the one the data was written with.
    if not math.isclose(vae.config.scaling_factor, scaling_factor, rel_tol=1e-4):
        warnings.warn(
            f"autoencoder scaling_factor {vae.config.scaling_factor} differs from the data's {scaling_factor}; "
            "using the data's",
            stacklevel=2,
        )
        vae.register_to_config(scaling_factor=scaling_factor)
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder or str(work.models))
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def inject_fault(loop: dict[str, Any], rank: int, step: int, resumed: bool) -> None:
    """Test hook: the worker of rank R kills itself with SIGKILL after step S of a fresh (not resumed)
    attempt, when the driver ran with ``LDM_FAULT_KILL_WORKER=R:S`` (see ``run_train``).

    A real process death, as a lost node would cause: Ray Train notices the dead worker, restarts the
    worker group and resumes from the last checkpoint (``max_failures``).
    """
    fault = loop.get("fault")
    if fault is not None and not resumed and (rank, step) == tuple(fault):
        os.kill(os.getpid(), signal.SIGKILL)


# --- the loop ------------------------------------------------------------------------------------


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: DDP training on this worker's shard of the latents."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = TrainConfig.model_validate(loop["cfg"])
    facts = LatentsFacts(**loop["facts"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.torch_threads)
    device = ray.train.torch.get_device()

    # Model, EMA and optimizer. Same initial weights on every rank (DDP also broadcasts rank 0's):
    # seeded, or the U-Net of `init_from` (fine-tuning); a checkpoint of this run overrides both.
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.unet, facts.latent_shape[1], facts.latent_shape[0], facts.text_embedding_shape[1])
    if loop["init_weights"] is not None:
        unet.load_state_dict(ray.get(loop["init_weights"]))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema_unet = copy.deepcopy(unet).requires_grad_(False) if cfg.ema_decay is not None else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, epoch = 0, 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            step = load_checkpoint(Path(folder), unet, optimizer, ema_unet=ema_unet)
            epoch = int(read_checkpoint_state(Path(folder)).get("epoch", 0)) + 1  # resume on a fresh epoch
    model = ray.train.torch.prepare_model(unet)  # to device, DistributedDataParallel when world_size > 1
    if ema_unet is not None:
        ema_unet.to(device).eval()
    scheduler = make_noise_scheduler(cfg.prediction_type)
    generator = torch.Generator(device=device).manual_seed(derived_seed(cfg.seed, rank, step))
    empty_embedding = torch.tensor(loop["empty_embedding"], dtype=torch.float32, device=device)  # [L, D]
    stream = batch_stream(
        ray.train.get_dataset_shard("train"), cfg, facts, empty_embedding, rank, epoch, device
    )
    monitor = RankZeroMonitor(
        cfg, loop, enabled=rank == 0 and loop["mlflow_run_id"] is not None, device=device
    )
    monitor.start(resumed_from=step if resume is not None else None)
    buckets = timestep_bucket_names(cfg.timestep_buckets, scheduler.config.num_train_timesteps)
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP only

    started = window_start = time.monotonic()
    window = torch.zeros(2 + 2 * cfg.timestep_buckets, dtype=torch.float64)  # loss, data wait, buckets
    window_steps, stop = 0, step >= cfg.max_steps
    while not stop:
        # 1. Forward and backward over grad_accum_steps micro-batches; DDP all-reduces on the last.
        # sums: [loss, out-of-time flag, loss per t bucket..., samples per t bucket...], summed over ranks.
        sums = torch.zeros(2 + 2 * cfg.timestep_buckets, dtype=torch.float64, device=device)
        data_wait = 0.0
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
                        prediction_type=cfg.prediction_type,
                        loss_weighting=cfg.loss_weighting,
                        snr_gamma=cfg.snr_gamma,
                        noise_offset=cfg.noise_offset,
                        generator=generator,
                    )
                (terms.loss / cfg.grad_accum_steps).backward()
            bucket_sums, bucket_counts = timestep_bucket_sums(
                terms.per_sample, terms.timesteps, cfg.timestep_buckets, scheduler.config.num_train_timesteps
            )
            sums[0] += terms.loss.detach().double() / cfg.grad_accum_steps
            sums[2:] += torch.cat([bucket_sums, bucket_counts])

        # 2. All ranks agree on the loss and on stopping (DDP would hang if one rank left alone).
        sums[1] = float(cfg.max_minutes is not None and time.monotonic() - started >= 60 * cfg.max_minutes)
        if world_size > 1:
            dist.all_reduce(sums)
        loss_value = sums[0].item() / world_size

        # 3. Clip, guard against NaN/inf before the weights take the step, then step.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise FloatingPointError(
                f"non-finite training at step {step + 1}: loss {loss_value}, grad norm {grad_norm} "
                "(lower lr, check the data for NaN, or raise grad_clip's strictness)"
            )
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 4. EMA of the weights: what samples and the export use.
        if ema_unet is not None:
            update_ema(ema_unet, unet, ema_decay_at(step, cfg.ema_decay))
        step += 1
        stop = step >= cfg.max_steps or sums[1].item() > 0

        # Hooks: watch, never change training state.
        window += torch.cat([torch.tensor([loss_value, data_wait], dtype=torch.float64), sums[2:].cpu()])
        window_steps += 1
        if step % cfg.log_every == 0 or stop:
            elapsed = max(time.monotonic() - window_start, 1e-9)
            per_bucket = window[2 : 2 + cfg.timestep_buckets] / window[2 + cfg.timestep_buckets :].clamp(
                min=1
            )
            monitor.log_metrics(
                step,
                {
                    "loss": window[0].item() / window_steps,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "epoch": epoch,
                    "samples_per_second": window_steps * cfg.batch_size / elapsed,
                    "seconds_per_step": elapsed / window_steps,
                    "data_wait_fraction": window[1].item() / elapsed,
                    **{name: per_bucket[k].item() for k, name in enumerate(buckets)},
                },
            )
            window.zero_()
            window_steps, window_start = 0, time.monotonic()
        if step % cfg.sample_every == 0 or stop:
            monitor.log_samples(step, ema_unet if ema_unet is not None else unet)
        if step % cfg.checkpoint_every == 0 or stop:
            replicas = gather_replicas(unet, rank, world_size) if stop else None
            report_checkpoint(
                rank,
                unet,
                ema_unet,
                optimizer,
                step,
                epoch,
                cfg,
                {"loss": loss_value, "step": step},
                replicas,
            )
        inject_fault(loop, rank, step, resumed=resume is not None)
    monitor.stop()


def gather_replicas(unet: torch.nn.Module, rank: int, world_size: int) -> list[dict[str, Any]]:
    """Each rank's node and weight fingerprint, gathered on every rank (a collective: all ranks call it).

    Stored in the last checkpoint: after DDP, every fingerprint must be the same.
    """
    import ray
    import torch.distributed as dist

    mine = {
        "rank": rank,
        "node": ray.get_runtime_context().get_node_id(),
        "sha256": replica_fingerprint(unet),
    }
    if world_size == 1:
        return [mine]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def report_checkpoint(
    rank: int,
    unet,
    ema_unet,
    optimizer,
    step: int,
    epoch: int,
    cfg: TrainConfig,
    metrics: dict[str, float],
    replicas: list[dict[str, Any]] | None = None,
) -> None:
    """Every rank calls ``ray.train.report`` (it is a barrier); only rank 0 writes a checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="ldm-ckpt-") as folder:
        extra = {"replicas": replicas} if replicas is not None else {}
        save_checkpoint(
            Path(folder), unet, optimizer, step, cfg, {**metrics, **extra}, ema_unet=ema_unet, epoch=epoch
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# --- the driver ----------------------------------------------------------------------------------


class DriverTracking:
    """The MLflow run of this job as seen from the driver; every call warns instead of failing."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.run_id: str | None = None
        self.tracking_uri: str = ""

    def _guard(self, what: str, fn, *args, **kwargs):
        if self.run_id is None and what != "start":
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - tracking must never stop training
            warnings.warn(f"MLflow {what} failed, going on without it: {error}", stacklevel=3)
            return None

    def start(self, cfg: TrainConfig, run_name: str, data_uri: str, facts: LatentsFacts) -> None:
        def start() -> None:
            import mlflow

            from ldm import tracking

            experiment_id = tracking.experiment(cfg.experiment, self.workdir)
            self.tracking_uri = mlflow.get_tracking_uri()
            run = mlflow.MlflowClient().create_run(
                experiment_id, run_name=run_name, tags={"ldm.job": "train"}
            )
            self.run_id = run.info.run_id

        self._guard("start", start)
        self._guard("params", self._log_config, cfg, data_uri, facts)

    def _log_config(self, cfg: TrainConfig, data_uri: str, facts: LatentsFacts) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient()
        params = {**cfg.flat(), "data.uri": data_uri, **{f"data.{k}": v for k, v in asdict(facts).items()}}
        client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in params.items()])
        client.log_text(self.run_id, cfg.to_yaml(), "config/train.yaml")
        self._log_manifest(client, data_uri)

    def _log_manifest(self, client, data_uri: str) -> None:
        """The data manifest as an artifact and as the run's dataset input."""
        import hashlib

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        manifest_uri = storage.join(data_uri, MANIFEST_FILE)
        if not storage.exists(manifest_uri):
            warnings.warn(f"no {MANIFEST_FILE} in {data_uri}: the run has no dataset input", stacklevel=2)
            return
        text = storage.read_bytes(manifest_uri).decode()
        client.log_text(self.run_id, text, f"data/{MANIFEST_FILE}")
        manifest = json.loads(text)
        digest = str(
            manifest.get("dataset_digest")
            or manifest.get("digest")
            or hashlib.sha256(text.encode()).hexdigest()
        )
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the same
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(data_uri)
        dataset = MetaDataset(source=source, name="latents", digest=digest[:36])
        entity = dataset._to_mlflow_entity()
        client.log_inputs(
            self.run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "train")])]
        )

    def log_final(self, metrics: dict[str, float], export: Path) -> None:
        from mlflow import MlflowClient

        def log() -> None:
            client = MlflowClient()
            for key, value in metrics.items():
                client.log_metric(self.run_id, key, float(value))
            client.set_tag(self.run_id, "ldm.export", str(export))

        self._guard("final metrics", log)

    def end(self, status: str) -> None:
        from mlflow import MlflowClient

        self._guard("end", lambda: MlflowClient().set_terminated(self.run_id, status=status))


def load_init_unet(uri: str, cfg: TrainConfig, facts: LatentsFacts) -> dict[str, torch.Tensor]:
    """The U-Net weights of model ``uri`` (a pipeline folder, ``s3://`` or ``models:/``/``runs:/``), checked
    against this run's architecture and data shapes; fine-tuning starts from them."""
    from diffusers import UNet2DConditionModel

    with tempfile.TemporaryDirectory(prefix="ldm-init-") as tmp:
        if uri.startswith(("models:/", "runs:/")):
            from ldm.registry import resolve_model_uri

            folder, _, _ = resolve_model_uri(uri, dst_path=tmp)
        else:
            folder = storage.materialize(uri)
        if not (Path(folder) / UNET_DIR).is_dir():
            raise DataError(f"init_from {uri}: no {UNET_DIR}/ folder (expected a diffusers pipeline)")
        weights = UNet2DConditionModel.from_pretrained(
            Path(folder) / UNET_DIR, local_files_only=True, use_safetensors=True
        ).state_dict()
    unet = build_unet(cfg.unet, facts.latent_shape[1], facts.latent_shape[0], facts.text_embedding_shape[1])
    try:
        unet.load_state_dict(weights)
    except RuntimeError as error:
        raise DataError(
            f"init_from {uri}: its U-Net does not match this run's `unet` config and data shapes: "
            f"{str(error).splitlines()[0]}"
        ) from error
    return {name: value.detach().clone() for name, value in unet.state_dict().items()}


def _fault_from_env() -> tuple[int, int] | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    rank, _, step = value.partition(":")
    if not (rank.isdigit() and step.isdigit()):
        raise ValueError(f"{FAULT_ENV}={value!r}: expected RANK:STEP, e.g. 1:5")
    return int(rank), int(step)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, export and register; returns run id, model version, final loss, steps, export folder,
    checkpoint, and each rank's node and weight fingerprint at the end (``replicas``)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ldm.pipeline import assemble_pipeline, save_pipeline
    from ldm.runtime import ensure_ray
    from ldm.text import encode_captions

    work = WorkDir(cfg.workdir)
    data_uri = cfg.data or str(work.data)
    latents_uri = storage.join(data_uri, LATENTS_DIR)
    facts = read_latents_facts(latents_uri)

    # The empty prompt, encoded exactly as the pipeline will encode it at inference (caption dropout).
    first_stage = load_first_stage(cfg, facts.scaling_factor)
    empty_embedding = encode_captions(first_stage["tokenizer"], first_stage["text_encoder"], [""])[0]
    if tuple(empty_embedding.shape) != facts.text_embedding_shape:
        raise DataError(
            f"text encoder gives embeddings of shape {tuple(empty_embedding.shape)} but the data holds "
            f"{facts.text_embedding_shape}: train with the text encoder that ingest used"
        )

    ensure_ray(cfg.ray_address, cfg.num_cpus)
    run_name = cfg.run_name or time.strftime("train-%Y%m%d-%H%M%S")
    tracking = DriverTracking(cfg.workdir)
    tracking.start(cfg, run_name, data_uri, facts)
    # Fine-tuning: the driver resolves the model once; workers get the weights from the object store
    # (a worker on another node cannot read the driver's disk).
    init_weights = ray.put(load_init_unet(cfg.init_from, cfg, facts)) if cfg.init_from else None

    fs, latents_path = storage.filesystem(latents_uri)
    dataset = ray.data.read_parquet(latents_path, filesystem=fs).select_columns(
        [COL_LATENT, COL_TEXT_EMBEDDING]
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "facts": asdict(facts),
            "empty_embedding": empty_embedding.tolist(),
            "init_weights": init_weights,
            "mlflow_run_id": tracking.run_id,
            "tracking_uri": tracking.tracking_uri,
            "fault": _fault_from_env(),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,  # True: NCCL between workers, bf16 autocast (mixed_precision="auto")
            # Half a CPU each by default: workers that reserve every CPU starve Ray Data (TRAPS.md).
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=str(work.runs),
            name=run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": dataset},
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end("FAILED")
        raise
    if result.checkpoint is None:
        tracking.end("FAILED")
        raise RuntimeError(f"training run {run_name} reported no checkpoint")

    # Export the last checkpoint as a diffusers pipeline, with the EMA weights when the run kept them;
    # the driver does it, not a worker, so the export sees exactly what was checkpointed.
    from diffusers import UNet2DConditionModel

    export_dir = work.exports / (tracking.run_id or run_name)
    with result.checkpoint.as_directory() as folder:
        weights = Path(folder) / (EMA_UNET_DIR if (Path(folder) / EMA_UNET_DIR).is_dir() else UNET_DIR)
        unet = UNet2DConditionModel.from_pretrained(weights, local_files_only=True, use_safetensors=True)
        checkpoint_state = read_checkpoint_state(Path(folder))
    pipe = assemble_pipeline(
        unet.eval(),
        first_stage["vae"],
        first_stage["text_encoder"],
        first_stage["tokenizer"],
        make_noise_scheduler(cfg.prediction_type),
    )
    save_pipeline(pipe, export_dir)

    final_loss = float(result.metrics.get("loss", checkpoint_state.get("loss", float("nan"))))
    version = _register(export_dir, cfg, tracking)
    tracking.log_final({"final_loss": final_loss, "final_step": checkpoint_state["step"]}, export_dir)
    tracking.end("FINISHED")
    return {
        "run_id": tracking.run_id,
        "model_name": cfg.model_name,
        "model_version": version,
        "final_loss": final_loss,
        "steps": checkpoint_state["step"],
        "export": str(export_dir),
        "checkpoint": result.checkpoint.path,
        "exported_weights": weights.name,
        "replicas": checkpoint_state.get("replicas", []),
    }


def _register(export_dir: Path, cfg: TrainConfig, tracking: DriverTracking) -> str | None:
    """Register the exported folder as a new version of ``cfg.model_name`` with alias ``candidate``,
    linked to this run. A registry that is down only warns: the export folder is still there."""
    if tracking.run_id is None:
        warnings.warn("no MLflow run: the model is exported but not registered", stacklevel=2)
        return None
    from ldm.registry import register_pipeline
    from ldm.tracking import ALIAS_CANDIDATE

    try:
        return register_pipeline(
            export_dir, name=cfg.model_name, run_id=tracking.run_id, aliases=(ALIAS_CANDIDATE,)
        )
    except Exception as error:  # noqa: BLE001 - tracking must never lose a finished training run
        warnings.warn(f"registering {export_dir} failed, the export is kept: {error}", stacklevel=2)
        return None
