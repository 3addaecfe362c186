"""`ldm train` as a package around a training loop that needs no Ray.

- ``loop``: ``train_loop(inputs, batches, world, hooks)``, ``LoopInputs``, ``LoopState``, ``MetricsWindow``
- ``world``: ``World`` (rank, size, all-reduce, checkpoint reporting), ``RayWorld``, ``LocalWorld``
- ``hooks``: NaN guard, metrics and progress line, sample grids, checkpoints, fault injection
- ``monitor``: rank 0's MLflow calls, retried, counted and shown
- ``recipe``: learning-rate schedule, EMA, caption dropout, seeds, autocast
- ``data``: latents facts, batch sources (Ray Data shard, tensors in memory)
- ``checkpoint``: checkpoint folders (safetensors + JSON)
- ``source``: first-stage models and the ``init_from`` U-Net
- ``tracking``: the driver's MLflow run (config, dataset input, final metrics)
- ``export``: pipeline export and registration
- ``job``: ``run_train``, the Ray Train job
"""

from pipelines.train.checkpoint import load_checkpoint, read_checkpoint_state, save_checkpoint
from pipelines.train.data import LatentsFacts, ray_batches, read_latents_facts, tensor_batches
from pipelines.train.hooks import FAULT_ENV, NanGuard, StepTimes, standard_hooks
from pipelines.train.job import absolute_paths, run_train
from pipelines.train.loop import Hook, LoopInputs, LoopState, MetricsWindow, train_loop
from pipelines.train.recipe import (
    autocast,
    caption_dropout,
    derived_seed,
    ema_decay_at,
    learning_rate,
    replica_fingerprint,
    update_ema,
)
from pipelines.train.source import InitSource, load_first_stage, resolve_init
from pipelines.train.world import LocalWorld, RayWorld, World

__all__ = [
    "FAULT_ENV",
    "Hook",
    "LatentsFacts",
    "LocalWorld",
    "LoopInputs",
    "LoopState",
    "MetricsWindow",
    "NanGuard",
    "RayWorld",
    "StepTimes",
    "World",
    "absolute_paths",
    "autocast",
    "caption_dropout",
    "derived_seed",
    "ema_decay_at",
    "learning_rate",
    "load_checkpoint",
    "load_first_stage",
    "resolve_init",
    "InitSource",
    "ray_batches",
    "read_checkpoint_state",
    "read_latents_facts",
    "replica_fingerprint",
    "run_train",
    "save_checkpoint",
    "standard_hooks",
    "tensor_batches",
    "train_loop",
    "update_ema",
]
