"""Where the training loop runs: its rank, the world's size, and the few collective operations it needs.

``train_loop`` knows its launcher only through this object (as nanoGPT's loop knows only a rank and a
world size): ``RayWorld`` is a Ray Train worker (DDP, ``ray.train.report``), ``LocalWorld`` is one
process (benchmarks, unit tests) that keeps its checkpoints in a folder.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

WriteCheckpoint = Callable[[Path], None]  # fills a folder with a checkpoint


class World(Protocol):
    rank: int
    size: int
    device: torch.device

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module placed on the device, wrapped for data parallelism when size > 1."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over all ranks, in place."""

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (a collective: every rank calls it)."""

    def node_id(self) -> str:
        """The node this rank runs on."""

    def last_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The folder of the last checkpoint to resume from, if any."""

    def report(self, metrics: dict[str, Any], write: WriteCheckpoint | None) -> None:
        """Report ``metrics``; rank 0 also writes a checkpoint with ``write`` (every rank calls it)."""


class LocalWorld:
    """One process, no Ray: checkpoints go to ``checkpoint_dir/checkpoint_NNNNNN`` when it is given."""

    rank = 0
    size = 1

    def __init__(self, device: torch.device | str = "cpu", checkpoint_dir: Path | None = None):
        self.device = torch.device(device)
        self.checkpoint_dir = checkpoint_dir
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        return None  # one rank: the sum is the tensor

    def all_gather(self, value: Any) -> list[Any]:
        return [value]

    def node_id(self) -> str:
        return socket.gethostname()

    @contextlib.contextmanager
    def last_checkpoint(self) -> Iterator[Path | None]:
        folders = sorted(self.checkpoint_dir.glob("checkpoint_*")) if self.checkpoint_dir else []
        yield folders[-1] if folders else None

    def report(self, metrics: dict[str, Any], write: WriteCheckpoint | None) -> None:
        self.reports.append(dict(metrics))
        if write is not None and self.checkpoint_dir is not None:
            folder = self.checkpoint_dir / f"checkpoint_{len(self.reports):06d}"
            partial = folder.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            write(partial)
            partial.rename(folder)  # a crash mid-write never leaves a folder that looks complete


class RayWorld:
    """A Ray Train worker: DDP through ``ray.train.torch``, checkpoints through ``ray.train.report``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank: int = context.get_world_rank()
        self.size: int = context.get_world_size()
        self.device: torch.device = ray.train.torch.get_device()

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # to device, DistributedDataParallel when size > 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.size > 1:
            dist.all_reduce(tensor)

    def all_gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    @contextlib.contextmanager
    def last_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], write: WriteCheckpoint | None) -> None:
        import ray.train

        if self.rank != 0 or write is None:
            ray.train.report(metrics, checkpoint=None)  # a barrier: every rank reports
            return
        with tempfile.TemporaryDirectory(prefix="ldm-ckpt-") as folder:
            write(Path(folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
