"""What the loop eats: the latents' facts (from the Parquet schema) and streams of micro-batches.

A batch source is a function of the first epoch that yields ``(epoch, latents [B, C, H, W] scaled,
text [B, L, D])`` without end; caption dropout is drawn as batches are made, afresh every epoch,
from seeds of (run seed, rank, epoch), so a resumed run sees the epochs it would have seen.
``ray_batches`` streams a worker's shard with Ray Data (the job); ``tensor_batches`` slices tensors
already in memory (benchmarks and tests): both feed the same ``train_loop``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ldm import storage
from ldm.config.train import TrainConfig
from ldm.contract import (
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
)
from ldm.errors import DataError
from pipelines.train.recipe import caption_dropout, derived_seed

Batch = tuple[int, torch.Tensor, torch.Tensor]  # epoch, latents [B, C, H, W] scaled, text [B, L, D]
BatchSource = Callable[[int], Iterator[Batch]]  # first epoch -> endless micro-batches


@dataclass(frozen=True)
class LatentsFacts:
    """Read from the Parquet schema of ``latents/``; the scaling factor is never a literal (STYLE.md 7)."""

    scaling_factor: float
    latent_shape: tuple[int, int, int]  # C, H, W
    text_embedding_shape: tuple[int, int]  # L, D


def _tensor_shape(schema: Any, column: str, meta_key: bytes) -> tuple[int, ...]:
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
    return LatentsFacts(
        float(json.loads(metadata[META_SCALING_FACTOR])),
        (latent_shape[0], latent_shape[1], latent_shape[2]),
        (text_shape[0], text_shape[1]),
    )


def ray_batches(
    shard: Any,
    cfg: TrainConfig,
    facts: LatentsFacts,
    empty_embedding: torch.Tensor,
    rank: int,
    device: torch.device,
) -> BatchSource:
    """Micro-batches of a Ray Data shard (``ray.train.get_dataset_shard``): each epoch reshuffles rows
    within the shuffle buffer and draws caption dropout afresh."""

    def stream(first_epoch: int) -> Iterator[Batch]:
        epoch = first_epoch
        while True:
            dropout = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 1))
            shuffle_seed = derived_seed(cfg.seed, rank, epoch, 2) % 2**31 if cfg.shuffle_buffer else None
            batches = shard.iter_torch_batches(
                batch_size=cfg.micro_batch_size,
                dtypes=torch.float32,
                device=device,
                drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                local_shuffle_seed=shuffle_seed,
            )
            seen = 0
            for batch in batches:
                seen += 1
                latents = batch[COL_LATENT] * facts.scaling_factor
                text = caption_dropout(
                    batch[COL_TEXT_EMBEDDING], empty_embedding, cfg.caption_dropout, dropout
                )
                yield epoch, latents, text
            if seen == 0:
                raise DataError(
                    f"a worker's shard holds fewer rows than its micro-batch of {cfg.micro_batch_size}: "
                    "add data or lower batch_size"
                )
            epoch += 1

    return stream


def tensor_batches(
    latents: torch.Tensor,
    text: torch.Tensor,
    cfg: TrainConfig,
    empty_embedding: torch.Tensor,
    rank: int = 0,
) -> BatchSource:
    """Micro-batches of tensors already in memory (``latents`` scaled, on the training device): each
    epoch a fresh permutation and caption dropout, seeded as ``ray_batches`` seeds them."""
    rows, size = latents.shape[0], cfg.micro_batch_size
    if rows < size:
        raise DataError(f"{rows} rows are fewer than a micro-batch of {size}: add data or lower batch_size")

    def stream(first_epoch: int) -> Iterator[Batch]:
        epoch = first_epoch
        while True:
            dropout = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 1))
            shuffle = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 2))
            order = torch.randperm(rows, generator=shuffle).to(latents.device)
            for start in range(0, rows - size + 1, size):
                index = order[start : start + size]
                yield (
                    epoch,
                    latents[index],
                    caption_dropout(text[index], empty_embedding, cfg.caption_dropout, dropout),
                )
            epoch += 1

    return stream
