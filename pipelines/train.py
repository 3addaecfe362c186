"""`ldm train`: train the text-conditioned U-Net on Ray Train, track it in MLflow, export and register it.

The job is a short recipe run by the driver (``run_train``):

1. read the latents' facts from the Parquet schema (scaling factor, latent and text-embedding shapes);
2. precompute the empty-prompt embedding (caption dropout) with the run's text encoder;
3. open the MLflow run: full config as params and YAML, the data manifest as the run's input;
4. fit a ``TorchTrainer``: ``train_loop_per_worker`` on each worker, DDP over gloo on CPU, each worker
   reading its shard of the latents with Ray Data;
5. export the last checkpoint as a diffusers pipeline folder and register it (alias ``candidate``).

The training loop reads top to bottom in one function (STYLE.md 1). What watches it (MLflow metrics,
sample grids) lives in ``RankZeroMonitor`` and never changes training state; an MLflow failure only
warns. Checkpoints hold the U-Net (``save_pretrained``, safetensors), the optimizer state (safetensors +
JSON: nothing here unpickles), the step and the config; a run restarted under the same ``run_name``
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import warnings
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
from ldm.diffusion import make_noise_scheduler, training_loss
from ldm.errors import DataError
from ldm.unet import build_unet

log = logging.getLogger(__name__)

UNET_DIR = "unet"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


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
    folder: Path, unet, optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig, metrics: dict
) -> None:
    from safetensors.torch import save_file

    unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
    state = optimizer.state_dict()
    tensors = {
        f"{param_id}.{name}": value.detach().contiguous()
        for param_id, param_state in state["state"].items()
        for name, value in param_state.items()
        if torch.is_tensor(value)
    }
    save_file(tensors, str(folder / OPTIMIZER_WEIGHTS))
    (folder / OPTIMIZER_META).write_text(json.dumps({"param_groups": state["param_groups"]}))
    (folder / STATE_FILE).write_text(json.dumps({"step": step, **metrics}))
    (folder / CONFIG_FILE).write_text(cfg.to_yaml())


def load_checkpoint(folder: Path, unet, optimizer: torch.optim.Optimizer) -> int:
    """Load weights and optimizer state saved by ``save_checkpoint`` in place; returns the step."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / UNET_DIR / "diffusion_pytorch_model.safetensors"))
    unet.load_state_dict(weights)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / OPTIMIZER_WEIGHTS)).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    param_groups = json.loads((folder / OPTIMIZER_META).read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    return int(json.loads((folder / STATE_FILE).read_text())["step"])


# --- hooks that watch the loop ---------------------------------------------------------------------


class RankZeroMonitor:
    """MLflow metrics and sample grids from rank 0. Reads the model, never changes it; failures warn.

    After the first MLflow failure it stops logging (a tracking server that is down makes every call
    retry for minutes, TRAPS.md), so training goes on at full speed.
    """

    def __init__(self, cfg: TrainConfig, loop: dict[str, Any], enabled: bool):
        self.cfg = cfg
        self.run_id: str | None = loop["mlflow_run_id"] if enabled else None
        self.tracking_uri: str = loop["tracking_uri"]
        self.scaling_factor: float = loop["facts"]["scaling_factor"]
        self.prediction_type = cfg.prediction_type
        self.sample_parts: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _disable(self, what: str, error: Exception) -> None:
        warnings.warn(f"MLflow {what} failed, training goes on without tracking: {error}", stacklevel=2)
        self.run_id = None

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
        """A grid of the fixed prompts at a fixed seed, generated by a pipeline around the current U-Net."""
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
            self.sample_parts = load_first_stage(self.cfg, self.scaling_factor)
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


# --- the loop ------------------------------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then constant."""
    return cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))


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

    # Same initial weights on every rank (DDP also broadcasts rank 0's); different noise per rank.
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.unet, facts.latent_shape[1], facts.latent_shape[0], facts.text_embedding_shape[1])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            step = load_checkpoint(Path(folder), unet, optimizer)
    model = ray.train.torch.prepare_model(unet)  # to device, DistributedDataParallel when world_size > 1
    scheduler = make_noise_scheduler(cfg.prediction_type)
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + rank * 7919 + step)
    empty_embedding = torch.tensor(loop["empty_embedding"], dtype=torch.float32, device=device)  # [L, D]
    monitor = RankZeroMonitor(cfg, loop, enabled=rank == 0 and loop["mlflow_run_id"] is not None)
    shard = ray.train.get_dataset_shard("train")
    per_worker_batch = cfg.batch_size // world_size

    started = window_start = time.monotonic()
    window_loss, window_steps, loss_value, stop = 0.0, 0, float("nan"), step >= cfg.max_steps
    while not stop:
        batches_this_epoch = 0
        batches = shard.iter_torch_batches(
            batch_size=per_worker_batch,
            dtypes=torch.float32,
            device=device,
            drop_last=True,
            local_shuffle_buffer_size=4 * per_worker_batch,
            local_shuffle_seed=cfg.seed + rank + step,
        )
        for batch in batches:
            batches_this_epoch += 1
            latents = batch[COL_LATENT] * facts.scaling_factor  # [B, C, H, W]
            text = batch[COL_TEXT_EMBEDDING]  # [B, L, D]
            # Caption dropout: train on the empty prompt with probability p so that classifier-free
            # guidance has an unconditional model to contrast with (Ho & Salimans 2022).
            dropped = torch.rand(text.shape[0], generator=generator, device=device) < cfg.caption_dropout
            text = torch.where(dropped[:, None, None], empty_embedding, text)

            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            loss = training_loss(
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
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1

            # Every rank must agree on stopping (DDP would hang otherwise): all-reduce the loss and the
            # out-of-time flag together.
            out_of_time = cfg.max_minutes is not None and time.monotonic() - started >= 60 * cfg.max_minutes
            agreed = torch.tensor([loss.item(), float(out_of_time)], dtype=torch.float64)
            if world_size > 1:
                dist.all_reduce(agreed)
            loss_value = agreed[0].item() / world_size
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}")
            stop = step >= cfg.max_steps or agreed[1].item() > 0
            window_loss, window_steps = window_loss + loss_value, window_steps + 1

            if step % cfg.log_every == 0 or stop:
                elapsed = time.monotonic() - window_start
                monitor.log_metrics(
                    step,
                    {
                        "loss": window_loss / window_steps,
                        "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_second": window_steps * cfg.batch_size / max(elapsed, 1e-9),
                        "seconds_per_step": elapsed / window_steps,
                    },
                )
                window_loss, window_steps, window_start = 0.0, 0, time.monotonic()
            if step % cfg.sample_every == 0 or stop:
                monitor.log_samples(step, unet)
            if step % cfg.checkpoint_every == 0 or stop:
                report_checkpoint(rank, unet, optimizer, step, cfg, {"loss": loss_value, "step": step})
            if stop:
                break
        if batches_this_epoch == 0:
            raise DataError(
                f"a worker's shard holds fewer rows than its batch of {per_worker_batch}: add data or lower batch_size"
            )


def report_checkpoint(
    rank: int, unet, optimizer, step: int, cfg: TrainConfig, metrics: dict[str, float]
) -> None:
    """Every rank calls ``ray.train.report`` (it is a barrier); only rank 0 writes a checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="ldm-ckpt-") as folder:
        save_checkpoint(Path(folder), unet, optimizer, step, cfg, metrics)
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


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, export and register; returns run id, model version, final loss, export folder, checkpoint."""
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
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

    fs, latents_path = storage.filesystem(latents_uri)
    dataset = ray.data.read_parquet(latents_path, filesystem=fs, columns=[COL_LATENT, COL_TEXT_EMBEDDING])
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "facts": asdict(facts),
            "empty_embedding": empty_embedding.tolist(),
            "mlflow_run_id": tracking.run_id,
            "tracking_uri": tracking.tracking_uri,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            # Half a CPU each by default: workers that reserve every CPU starve Ray Data (TRAPS.md).
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        run_config=RunConfig(
            storage_path=str(work.runs),
            name=run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
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

    # Export the last checkpoint as a diffusers pipeline; the driver does it, not a worker, so the
    # export sees exactly what was checkpointed.
    from diffusers import UNet2DConditionModel

    export_dir = work.exports / (tracking.run_id or run_name)
    with result.checkpoint.as_directory() as folder:
        unet = UNet2DConditionModel.from_pretrained(
            Path(folder) / UNET_DIR, local_files_only=True, use_safetensors=True
        )
        checkpoint_state = json.loads((Path(folder) / STATE_FILE).read_text())
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
    }


def _register(export_dir: Path, cfg: TrainConfig, tracking: DriverTracking) -> str | None:
    """Register the exported folder as a new version of ``cfg.model_name`` with alias ``candidate``."""
    if tracking.run_id is None:
        warnings.warn("no MLflow run: the model is exported but not registered", stacklevel=2)
        return None
    from ldm.registry import register_pipeline
    from ldm.tracking import ALIAS_CANDIDATE

    return register_pipeline(
        export_dir, name=cfg.model_name, run_id=tracking.run_id, aliases=(ALIAS_CANDIDATE,)
    )
