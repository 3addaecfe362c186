"""What the loop eats: the latents' facts (from the Parquet schema) and streams of micro-batches.

A batch source is a function of the first epoch that yields ``(epoch, latents [B, C, H, W] scaled,
text [B, L, D])`` without end; caption dropout is drawn as batches are made, afresh every epoch,
from seeds of (run seed, rank, epoch), so a resumed run sees the epochs it would have seen. The
text comes from the stored caption column through a ``TextConditioning``
(``pipelines/train/conditioning.py``): the stored embedding, or the stored token ids encoded by the
frozen text encoder as the batch is made.
``ray_batches`` streams a worker's shard with Ray Data (the job); ``tensor_batches`` slices tensors
already in memory (benchmarks and tests): both feed the same ``train_loop``.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm import storage
from ldm.config.train import CaptionRepeat, TrainConfig
from ldm.contract import (
    COL_CAPTION,
    COL_INPUT_IDS,
    COL_KEY,
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    META_INPUT_IDS_SHAPE,
    META_LATENT_SHAPE,
    META_PAD_TOKEN_ID,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    META_TEXT_ENCODER,
)
from ldm.errors import DataError
from pipelines.train.conditioning import StoredEmbeddings, TextConditioning
from pipelines.train.recipe import derived_seed

# epoch, latents [B, C, H, W] scaled, text [B, L, D] (token ids [B, L] with train_text_encoder: joint.py)
Batch = tuple[int, torch.Tensor, torch.Tensor]
BatchSource = Callable[[int], Iterator[Batch]]  # first epoch -> endless micro-batches


@dataclass(frozen=True)
class LatentsFacts:
    """Read from the Parquet schema of ``latents/``; the scaling factor is never a literal (STYLE.md 7)."""

    scaling_factor: float
    latent_shape: tuple[int, int, int]  # C, H, W
    # L, D of the conditioning. None in what `read_latents_facts` returns for data holding token ids
    # only: the text encoder decides D (`conditioning.text_conditioning` fills it in).
    text_embedding_shape: tuple[int, int] | None
    text_column: str = COL_TEXT_EMBEDDING  # what training reads: the embedding when stored, else the ids
    input_ids_shape: tuple[int] | None = None  # L, when token ids are stored
    pad_token_id: int | None = None  # the id that pads them
    text_encoder: str | None = None  # the spec of the text encoder ingest used
    # The first stored caption and its stored embedding [L, D]: `conditioning.text_conditioning` checks
    # that the run's text encoder reproduces it before it trains on stored embeddings.
    probe: tuple[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def text_width(self) -> int:
        """D: the U-Net's cross-attention width."""
        if self.text_embedding_shape is None:
            raise DataError("the data holds token ids only: load the text encoder to know its width")
        return self.text_embedding_shape[1]


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


def _first_caption_and_embedding(
    parquet: Any, text_shape: tuple[int, ...]
) -> tuple[str, torch.Tensor] | None:
    """The first row's caption and text embedding [L, D] float32; None for a column layout other than
    ingest's tensor types (then only the shape is checked against the run's encoder)."""
    import numpy as np

    first = next(parquet.iter_batches(batch_size=1, columns=[COL_CAPTION, COL_TEXT_EMBEDDING]))
    column = first.column(COL_TEXT_EMBEDDING)
    try:
        if hasattr(column, "to_numpy_ndarray"):  # arrow.fixed_shape_tensor (what ingest writes)
            values = column.to_numpy_ndarray()[0]
        else:  # a (fixed-size) list, or Ray Data's own tensor type
            values = np.asarray(column.to_numpy(zero_copy_only=False)[0])
        embedding = np.asarray(values, dtype=np.float32).reshape(text_shape)
    except (TypeError, ValueError, AttributeError):
        return None
    return first.column(COL_CAPTION)[0].as_py(), torch.from_numpy(embedding)


def read_latents_facts(latents_uri: str) -> LatentsFacts:
    """Scaling factor, tensor shapes and the stored caption column (the embedding when there is one,
    else the token ids) from the schema of the first Parquet file under ``latents_uri``."""
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
    if COL_LATENT not in schema.names:
        raise DataError(f"{files[0]}: missing column {COL_LATENT!r}")
    if COL_TEXT_EMBEDDING not in schema.names and COL_INPUT_IDS not in schema.names:
        raise DataError(f"{files[0]}: missing column {COL_TEXT_EMBEDDING!r} (or {COL_INPUT_IDS!r})")
    metadata = schema.metadata or {}
    if META_SCALING_FACTOR not in metadata:
        raise DataError(f"{files[0]}: schema metadata has no {META_SCALING_FACTOR!r} (latent scaling factor)")
    latent_shape = _tensor_shape(schema, COL_LATENT, META_LATENT_SHAPE)
    text_shape = None
    if COL_TEXT_EMBEDDING in schema.names:
        text_shape = _tensor_shape(schema, COL_TEXT_EMBEDDING, META_TEXT_EMBEDDING_SHAPE)
    ids_shape, pad_token_id = None, None
    if COL_INPUT_IDS in schema.names:
        ids_shape = _tensor_shape(schema, COL_INPUT_IDS, META_INPUT_IDS_SHAPE)
        if META_PAD_TOKEN_ID not in metadata:
            raise DataError(f"{files[0]}: schema metadata has no {META_PAD_TOKEN_ID!r} (the ids' pad id)")
        pad_token_id = int(json.loads(metadata[META_PAD_TOKEN_ID]))
    if (
        len(latent_shape) != 3
        or latent_shape[1] != latent_shape[2]
        or (text_shape is not None and len(text_shape) != 2)
        or (ids_shape is not None and len(ids_shape) != 1)
    ):
        raise DataError(
            f"latents: expected square [C, H, W] latents, [L, D] embeddings and [L] ids, got "
            f"{latent_shape}, {text_shape}, {ids_shape}"
        )
    text_encoder = json.loads(metadata[META_TEXT_ENCODER]) if META_TEXT_ENCODER in metadata else None
    probe = None
    if text_shape is not None and COL_CAPTION in schema.names:
        # the first file that holds a row (a shard whose rows were all rejected writes an empty one)
        for file in files:
            parquet = pq.ParquetFile(file, filesystem=fs)
            if parquet.metadata.num_rows:
                probe = _first_caption_and_embedding(parquet, text_shape)
                break
    return LatentsFacts(
        float(json.loads(metadata[META_SCALING_FACTOR])),
        (latent_shape[0], latent_shape[1], latent_shape[2]),
        (text_shape[0], text_shape[1]) if text_shape is not None else None,
        text_column=COL_TEXT_EMBEDDING if text_shape is not None else COL_INPUT_IDS,
        input_ids_shape=(ids_shape[0],) if ids_shape is not None else None,
        pad_token_id=pad_token_id,
        text_encoder=text_encoder.get("spec") if isinstance(text_encoder, dict) else text_encoder,
        probe=probe,
    )


def parquet_bytes(latents_uri: str) -> int:
    """Total size of the Parquet files under ``latents_uri`` (local or ``s3://``), from one listing."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(latents_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def repeat_rows(table: Any, rules: Sequence[CaptionRepeat], seed: int) -> Any:
    """The rows of a latents table (pyarrow), each as many times as the first rule whose pattern its
    caption matches says (once when none does), in a random order within the table.

    The order is shuffled because the copies of a row would otherwise sit side by side, and a worker's
    shuffle buffer (``shuffle_buffer`` rows) would hand them out in the same few batches. Ray Data
    calls this on whole blocks (``training_dataset`` in ``pipelines/train/job.py``), so the copies spread over a
    block. The shuffle is seeded by ``seed`` and the block's first key: a re-run reads the same order.
    """
    import numpy as np
    import pyarrow as pa

    if not rules or table.num_rows == 0:
        return table
    if COL_CAPTION not in table.schema.names:
        raise DataError(f"caption_repeats needs the {COL_CAPTION!r} column in latents/; it is missing")
    compiled = [(re.compile(rule.pattern), rule.repeats) for rule in rules]
    captions = table.column(COL_CAPTION).to_pylist()
    counts = np.ones(len(captions), dtype=np.int64)
    for row, caption in enumerate(captions):
        for pattern, repeats in compiled:
            if caption is not None and pattern.search(caption):
                counts[row] = repeats
                break
    if counts.max() == 1:
        return table
    index = np.repeat(np.arange(len(captions)), counts)
    first_key = str(table.column(COL_KEY)[0].as_py()) if COL_KEY in table.schema.names else ""
    np.random.default_rng([seed, zlib.crc32(first_key.encode())]).shuffle(index)
    return table.take(pa.array(index))


def ray_batches(
    shard: Any,
    cfg: TrainConfig,
    facts: LatentsFacts,
    conditioning: TextConditioning,
    rank: int,
    device: torch.device,
) -> BatchSource:
    """Micro-batches of a Ray Data shard (``ray.train.get_dataset_shard``): each epoch reshuffles rows
    within the shuffle buffer and draws caption dropout afresh; ``conditioning`` (on ``device``)
    turns the stored caption column into the text the U-Net attends to."""

    def stream(first_epoch: int) -> Iterator[Batch]:
        epoch = first_epoch
        while True:
            dropout = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 1))
            shuffle_seed = derived_seed(cfg.seed, rank, epoch, 2) % 2**31 if cfg.shuffle_buffer else None
            batches = shard.iter_torch_batches(
                batch_size=cfg.micro_batch_size,
                dtypes={COL_LATENT: torch.float32, conditioning.column: conditioning.dtype},
                device=device,
                drop_last=True,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                local_shuffle_seed=shuffle_seed,
            )
            seen = 0
            for batch in batches:
                seen += 1
                latents = batch[COL_LATENT] * facts.scaling_factor
                text = conditioning(batch[conditioning.column], cfg.caption_dropout, dropout)
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
    conditioning: torch.Tensor | TextConditioning,
    rank: int = 0,
) -> BatchSource:
    """Micro-batches of tensors already in memory (``latents`` scaled, on the training device; ``text``
    the stored caption column ``conditioning`` reads, or embeddings when ``conditioning`` is the empty
    prompt's embedding): each epoch a fresh permutation and caption dropout, seeded as ``ray_batches``
    seeds them."""
    rows, size = latents.shape[0], cfg.micro_batch_size
    if rows < size:
        raise DataError(f"{rows} rows are fewer than a micro-batch of {size}: add data or lower batch_size")
    if isinstance(conditioning, torch.Tensor):
        conditioning = StoredEmbeddings(conditioning)
    encode = conditioning

    def stream(first_epoch: int) -> Iterator[Batch]:
        epoch = first_epoch
        while True:
            dropout = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 1))
            shuffle = torch.Generator().manual_seed(derived_seed(cfg.seed, rank, epoch, 2))
            order = torch.randperm(rows, generator=shuffle).to(latents.device)
            for start in range(0, rows - size + 1, size):
                index = order[start : start + size]
                yield epoch, latents[index], encode(text[index], cfg.caption_dropout, dropout)
            epoch += 1

    return stream
