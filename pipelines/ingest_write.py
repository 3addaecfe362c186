"""Writing the ingest outputs: the latents schema (with its metadata), latents/, rejects/, and the checks.

Latents are written with pyarrow on the driver, not with ``Dataset.write_parquet``: every file must
carry the schema metadata (scaling factor, shapes, model identities) and Ray's writer has no hook
for it. Each accepted row gets its hold-out split here (`ldm.contract.holdout_split`, by key hash).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ldm import storage
from ldm.config.ingest import IngestConfig
from ldm.contract import (
    COL_CAPTION,
    COL_CLIP_SCORE,
    COL_HEIGHT,
    COL_INPUT_IDS,
    COL_KEY,
    COL_LATENT,
    COL_SHA256,
    COL_SPLIT,
    COL_TEXT_EMBEDDING,
    COL_URL,
    COL_WIDTH,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_AUTOENCODER,
    META_CARRIED_COLUMNS,
    META_CLIP,
    META_INPUT_IDS_SHAPE,
    META_LATENT_SHAPE,
    META_PAD_TOKEN_ID,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    META_TEXT_ENCODER,
    REJECTS_DIR,
    holdout_split,
)
from pipelines.ingest_read import rejects_schema


class IngestAccountingError(RuntimeError):
    """Some input row is missing from both latents/ and rejects/, or is in them more than once."""


# --- model identities and the latents schema -------------------------------------------------------
def model_identity(spec: str, subfolders: tuple[str, ...] = ()) -> dict[str, str]:
    """Where a model came from and a digest of its files (so a manifest pins the exact weights).

    ``subfolders`` limits the digest to those folders of ``spec`` (the text encoder lives in a models
    folder beside the other models).
    """
    path = spec.split("@", 1)[1] if spec.startswith("open_clip:") else spec
    local = storage.materialize(path)
    roots = [local / sub for sub in subfolders] if subfolders else [local]
    files = sorted(p for root in roots for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if file.name == ".complete":  # storage.materialize's cache marker
            continue
        digest.update(str(file.relative_to(local if local.is_dir() else local.parent)).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return {"spec": spec, "sha256": digest.hexdigest()[:16]}


def latents_schema(
    cfg: IngestConfig, models: dict[str, dict[str, str]], carried: pa.Schema | None = None
) -> pa.Schema:
    """The schema of latents/, with shapes and the scaling factor read from the models' own configs.

    ``text_embedding`` and ``input_ids`` are there as ``store_text_embeddings``/``store_input_ids``
    say; ``carried`` (the input's other columns) comes last.
    """
    from ldm.first_stage.autoencoder import load_autoencoder
    from ldm.first_stage.text_encoder import load_text_encoder

    vae = load_autoencoder(cfg.autoencoder_spec)
    vae_config = vae.config
    downsample = 2 ** (len(vae_config.block_out_channels) - 1)
    latent_shape = [vae_config.latent_channels, cfg.image_size // downsample, cfg.image_size // downsample]
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder_spec)
    length = int(tokenizer.model_max_length)
    text_shape = [length, int(text_encoder.config.hidden_size)]
    carried = carried or pa.schema([])
    metadata = {
        META_SCALING_FACTOR: json.dumps(float(vae_config.scaling_factor)),
        META_LATENT_SHAPE: json.dumps(latent_shape),
        META_AUTOENCODER: json.dumps(models["autoencoder"]),
        META_TEXT_ENCODER: json.dumps(models["text_encoder"]),
        META_CLIP: json.dumps(models["clip"]),
        META_CARRIED_COLUMNS: json.dumps(carried.names),
    }
    fields = [
        (COL_KEY, pa.string()),
        (COL_URL, pa.string()),
        (COL_CAPTION, pa.string()),
        (COL_CLIP_SCORE, pa.float32()),
        (COL_WIDTH, pa.int32()),
        (COL_HEIGHT, pa.int32()),
        (COL_SHA256, pa.string()),
        (COL_SPLIT, pa.string()),
        (COL_LATENT, pa.fixed_shape_tensor(pa.float16(), latent_shape)),
    ]
    if cfg.store_text_embeddings:
        metadata[META_TEXT_EMBEDDING_SHAPE] = json.dumps(text_shape)
        fields.append((COL_TEXT_EMBEDDING, pa.fixed_shape_tensor(pa.float16(), text_shape)))
    if cfg.store_input_ids:
        metadata[META_INPUT_IDS_SHAPE] = json.dumps([length])
        metadata[META_PAD_TOKEN_ID] = json.dumps(int(tokenizer.pad_token_id))
        fields.append((COL_INPUT_IDS, pa.fixed_shape_tensor(pa.int32(), [length])))
    return pa.schema([*(pa.field(n, t) for n, t in fields), *carried], metadata=metadata)


# --- write ---------------------------------------------------------------------------------------
def _fresh_dir(uri: str) -> None:
    """Delete the folder at ``uri`` (a re-run rewrites the outputs) and create it empty."""
    fs, path = storage.filesystem(uri)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)


def _remove_manifest(output_uri: str) -> None:
    fs, path = storage.filesystem(storage.join(output_uri, MANIFEST_FILE))
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def _latent_batch_table(batch: dict[str, np.ndarray], schema: pa.Schema, holdout_fraction: float) -> pa.Table:
    batch = dict(batch)
    batch[COL_SPLIT] = np.array(
        [holdout_split(str(k), holdout_fraction) for k in batch[COL_KEY]], dtype=object
    )
    columns = []
    for field in schema:
        values = batch[field.name]
        if isinstance(field.type, pa.FixedShapeTensorType):
            expected = tuple(field.type.shape)
            if tuple(values.shape[1:]) != expected:
                raise ValueError(f"{field.name} has shape {values.shape[1:]}, the schema says {expected}")
            columns.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values)))
        else:
            columns.append(pa.array(values.tolist(), type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def write_latents(
    batches, output_uri: str, schema: pa.Schema, rows_per_file: int, holdout_fraction: float = 0.0
) -> pa.Table:
    """Stream encoded batches into ``latents/part-NNNNN.parquet``; returns their (key, sha256, split)."""
    folder = storage.join(output_uri, LATENTS_DIR)
    _fresh_dir(folder)
    fs, base = storage.filesystem(folder)
    written: list[pa.Table] = [
        pa.table({name: pa.array([], pa.string()) for name in (COL_KEY, COL_SHA256, COL_SPLIT)})
    ]
    writer, rows_in_file, part = None, 0, 0
    for batch in batches:
        table = _latent_batch_table(batch, schema, holdout_fraction)
        while table.num_rows:
            if writer is None or rows_in_file >= rows_per_file:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(f"{base}/part-{part:05d}.parquet", schema, filesystem=fs)
                rows_in_file, part = 0, part + 1
            piece = table.slice(0, rows_per_file - rows_in_file)
            writer.write_table(piece)
            written.append(piece.select([COL_KEY, COL_SHA256, COL_SPLIT]))
            rows_in_file += piece.num_rows
            table = table.slice(piece.num_rows)
    if writer is None:  # no accepted row: still leave one (empty) file that carries the schema
        pq.write_table(schema.empty_table(), f"{base}/part-00000.parquet", filesystem=fs)
    else:
        writer.close()
    return pa.concat_tables(written)


def write_rejects(rejects: list[pa.Table], output_uri: str, carried: pa.Schema | None = None) -> pa.Table:
    schema = rejects_schema(carried)
    table = pa.concat_tables([schema.empty_table(), *(r.select(schema.names).cast(schema) for r in rejects)])
    folder = storage.join(output_uri, REJECTS_DIR)
    _fresh_dir(folder)
    fs, base = storage.filesystem(folder)
    pq.write_table(table, f"{base}/part-00000.parquet", filesystem=fs)
    return table


def dataset_digest(accepted: pa.Table) -> str:
    """sha256 over the sorted (key, content hash) pairs of the accepted rows: same data, same digest."""
    digest = hashlib.sha256()
    pairs = sorted(
        zip(accepted.column(COL_KEY).to_pylist(), accepted.column(COL_SHA256).to_pylist(), strict=True)
    )
    for key, content in pairs:
        digest.update(f"{key}\t{content}\n".encode())
    return digest.hexdigest()


def check_accounting(input_keys: list[str], accepted_keys: list[str], rejected_keys: list[str]) -> None:
    """Every input row exactly once in latents/ or rejects/: raise `IngestAccountingError` otherwise."""
    seen = Counter(accepted_keys) + Counter(rejected_keys)
    expected = Counter(input_keys)
    if seen == expected:
        return
    missing = sorted((expected - seen).keys())
    extra = sorted((seen - expected).keys())
    raise IngestAccountingError(
        f"ingest lost or duplicated rows: {len(input_keys)} in, {len(accepted_keys)} accepted + "
        f"{len(rejected_keys)} rejected; missing {len(missing)} (e.g. {missing[:3]}), "
        f"extra or repeated {len(extra)} (e.g. {extra[:3]})"
    )
