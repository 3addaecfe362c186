"""`ldm train`: train the text-conditioned U-Net on Ray Train, track it in MLflow, export and register it.

The job is a short recipe run by the driver (``run_train``):

1. make every local path in the config absolute (Ray Train runs each worker in a working directory
   of its own, so a relative ``./ldm-demo`` would name another folder there);
2. read the latents' facts from the Parquet schema (scaling factor, latent and text-embedding shapes);
3. precompute the empty-prompt embedding (caption dropout) with the run's text encoder (with
   ``train_text_encoder`` the workers train a copy of it with the U-Net, ``pipelines/train/joint.py``);
4. open the MLflow run: full config as params and YAML, the data manifest as the run's input;
5. with ``init_from`` (any diffusers SD pipeline folder, ``ldm/sd_format.py``), resolve the model whose
   U-Net config is the architecture and whose scheduler is the objective's default; its weights start
   training (or, ``from_scratch``, seeded ones); ``lora`` trains an adapter on them;
6. fit a ``TorchTrainer`` whose workers run ``train_loop`` (``pipelines/train/loop.py``) in a
   ``RayWorld``: DDP (gloo on CPU, NCCL on GPU), each worker streaming its shard with Ray Data;
   ``FailureConfig(max_failures)`` restarts a failed worker group from the last checkpoint;
7. export the last checkpoint's EMA U-Net (or adapter) as a diffusers pipeline folder and register
   it, linked to the run (alias ``candidate``).

Checkpoints go to ``storage_path`` (default ``<workdir>/runs``; ``s3://`` through a pyarrow filesystem).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm import storage
from ldm.config.train import TrainConfig
from ldm.contract import COL_LATENT, LATENTS_DIR, WorkDir, train_rows
from ldm.sd_format import NoiseSchedule
from pipelines.train.conditioning import TextConditioning, TrainedIds, text_conditioning
from pipelines.train.data import LatentsFacts, parquet_bytes, ray_batches, read_latents_facts, repeat_rows
from pipelines.train.export import export_checkpoint, register
from pipelines.train.hooks import fault_from_env, standard_hooks
from pipelines.train.loop import LoopInputs, train_loop
from pipelines.train.monitor import WorkerTracking
from pipelines.train.source import InitSource, load_first_stage, resolve_init
from pipelines.train.tracking import DriverTracking
from pipelines.train.world import RayWorld

PATH_FIELDS = ("workdir", "data", "autoencoder", "text_encoder", "init_from", "storage_path")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every local path made absolute against the driver's working directory; URIs
    (``s3://``, ``models:/``, ``runs:/``) stay as they are."""
    updates: dict[str, str] = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value and ":/" not in value:
            updates[name] = str(Path(value).expanduser().resolve())
    return cfg.model_copy(update=updates)


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every training worker."""

    cfg: TrainConfig
    facts: LatentsFacts
    conditioning: TextConditioning  # stored embeddings, or stored ids and the run's text encoder
    init_weights: Any  # ray.ObjectRef of the fine-tuning U-Net's state dict, or None
    unet_config: dict[str, Any] | None  # init_from's U-Net config (the architecture), or None
    schedule: NoiseSchedule  # the objective's noise schedule and prediction type
    run_id: str | None
    tracking_uri: str
    fault: tuple[int, int] | None  # test hook, see pipelines/train/hooks.py FaultInjection


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the ``TorchTrainer``: one Ray Train worker runs the loop."""
    import ray
    import ray.train

    args: WorkerArgs = config["args"]
    torch.set_num_threads(args.cfg.torch_threads)
    world = RayWorld()
    conditioning = args.conditioning.to(world.device)
    shard = ray.train.get_dataset_shard("train")
    batches = ray_batches(shard, args.cfg, args.facts, conditioning, world.rank, world.device)
    init_weights = ray.get(args.init_weights) if args.init_weights is not None else None
    tracking = None
    if world.rank == 0 and args.run_id is not None:
        tracking = WorkerTracking(args.run_id, args.tracking_uri)
    hooks = standard_hooks(world.rank, tracking, args.facts.scaling_factor, args.fault)
    trained_text_encoder = (
        args.conditioning.text_encoder if isinstance(args.conditioning, TrainedIds) else None
    )
    inputs = LoopInputs(
        args.cfg, args.facts, init_weights, args.unet_config, args.schedule, trained_text_encoder
    )
    train_loop(inputs, batches, world, hooks)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, export and register; returns run id, model version, final loss, steps, export folder,
    checkpoint, each rank's node and weight fingerprint at the end (``replicas``), and whether the data
    was read once into the object store (``dataset_cached``, see ``cache_max_mb``)."""
    import ray

    from ldm.runtime import ensure_ray

    cfg = absolute_paths(cfg)
    work = WorkDir(cfg.workdir)
    data_uri = cfg.data or str(work.data)
    latents_uri = storage.join(data_uri, LATENTS_DIR)
    facts = read_latents_facts(latents_uri)

    # The text conditioning as the pipeline computes it at inference: stored embeddings (and the empty
    # prompt's, for caption dropout), or stored ids the workers encode (frozen, or train_text_encoder).
    first_stage = load_first_stage(cfg, facts.scaling_factor)
    facts, conditioning = text_conditioning(
        facts, first_stage["tokenizer"], first_stage["text_encoder"], train=cfg.train_text_encoder
    )
    run_name = cfg.run_name or time.strftime("train-%Y%m%d-%H%M%S")
    # Fine-tuning: the driver resolves the model once; workers get the weights from the object store
    # (a worker on another node cannot read the driver's disk). The objective's prediction type is
    # the folder's unless the config names one: resolved here, so params and checkpoints record it.
    init = resolve_init(cfg, facts, work.root / "init" / run_name)
    schedule = init.schedule
    cfg = cfg.model_copy(
        update={"prediction_type": schedule.prediction_type, "zero_terminal_snr": schedule.zero_terminal_snr}
    )
    ensure_ray(cfg.ray_address, cfg.num_cpus)
    tracking = DriverTracking(cfg.workdir)
    tracking.start(cfg, run_name, data_uri, facts)
    data_bytes = parquet_bytes(latents_uri)
    cached = data_bytes <= cfg.cache_max_mb * 2**20
    tracking.log_params(
        {
            **parameter_counts(cfg, init, first_stage["text_encoder"]),
            "data_parquet_mb": round(data_bytes / 2**20, 1),
            "dataset_cached": cached,
        }
    )
    args = WorkerArgs(
        cfg,
        facts,
        conditioning,
        ray.put(init.weights) if init.weights is not None else None,
        init.unet_config,
        init.schedule,
        tracking.run_id,
        tracking.tracking_uri,
        fault_from_env(),
    )
    try:
        dataset = training_dataset(cfg, latents_uri, conditioning.column, cached)
        if cached:  # the rows of an epoch, caption_repeats' copies included (free once materialized)
            tracking.log_params({"data_rows_per_epoch": dataset.count()})
        result = _fit(args, dataset, work, run_name)
    except BaseException:
        tracking.end("FAILED")
        raise

    export_dir = work.exports / (tracking.run_id or run_name)
    with result.checkpoint.as_directory() as folder:
        exported, state = export_checkpoint(Path(folder), first_stage, cfg, export_dir, init)
    final_loss = float(result.metrics.get("loss", state.get("loss", float("nan"))))
    version = register(export_dir, cfg, tracking)
    tracking.log_final({"final_loss": final_loss, "final_step": state["step"]}, export_dir)
    tracking.end("FINISHED")
    return {
        "run_id": tracking.run_id,
        "model_name": cfg.model_name,
        "model_version": version,
        "final_loss": final_loss,
        "steps": state["step"],
        "export": str(export_dir),
        "checkpoint": result.checkpoint.path,
        "exported_weights": exported,
        "replicas": state.get("replicas", []),
        "dataset_cached": cached,
    }


def parameter_counts(cfg: TrainConfig, init: InitSource, text_encoder: Any) -> dict[str, int]:
    """The U-Net's trainable and total weights, and how many of the text encoder's train: all but
    the token table with ``train_text_encoder`` (``pipelines/train/joint.py``), else none."""
    text_trainable = 0
    if cfg.train_text_encoder:
        table = text_encoder.get_input_embeddings().weight.numel()
        text_trainable = sum(parameter.numel() for parameter in text_encoder.parameters()) - table
    return {
        "trainable_params": init.counts.trainable,
        "total_params": init.counts.total,
        "text_encoder_trainable_params": text_trainable,
    }


def training_dataset(cfg: TrainConfig, latents_uri: str, text_column: str, cached: bool) -> Any:
    """The Ray Dataset the workers split: the training rows of ``latents/`` (hold-out rows are for
    ``ldm eval`` only), each as often as ``cfg.caption_repeats`` says, with the latent and
    ``text_column``; read once into the object store when ``cached``."""
    import ray.data

    fs, latents_path = storage.filesystem(latents_uri)
    dataset = ray.data.read_parquet(latents_path, filesystem=fs).map_batches(
        train_rows, batch_format="pyarrow"
    )
    if cfg.caption_repeats:
        # batch_size None: whole blocks, so that the copies of a row are shuffled over a whole block.
        repeat = functools.partial(repeat_rows, rules=cfg.caption_repeats, seed=cfg.seed)
        dataset = dataset.map_batches(repeat, batch_format="pyarrow", batch_size=None)
    dataset = dataset.select_columns([COL_LATENT, text_column])
    if cached:
        # Read once: without it every epoch re-runs the read, the split filter and a new streaming
        # split, which on a busy small cluster stalls each epoch's first step for seconds.
        dataset = dataset.materialize()
    return dataset


def _fit(args: WorkerArgs, dataset: Any, work: WorkDir, run_name: str) -> Any:
    """Run the ``TorchTrainer`` on ``dataset`` (``training_dataset``); returns its ``Result`` (with a
    checkpoint, or it raises)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = args.cfg
    # Checkpoints on s3:// need no shared volume: Ray Train writes through the pyarrow filesystem
    # (which carries the endpoint and credentials to the workers when pickled).
    checkpoints_fs, checkpoints_path = storage.filesystem(cfg.storage_path or str(work.runs))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,  # True: NCCL between workers, bf16 autocast (mixed_precision="auto")
            # Half a CPU each by default: workers that reserve every CPU starve Ray Data (docs/TRAINING.md).
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            storage_path=checkpoints_path,
            storage_filesystem=checkpoints_fs if storage.is_remote(cfg.storage_path or "") else None,
            name=run_name,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} reported no checkpoint")
    return result
