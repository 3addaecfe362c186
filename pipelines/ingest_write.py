"""The ingest outputs' schema (with its metadata), model identities, the dataset digest and the
key-by-key accounting check (run only to explain a digest mismatch).

Latents are written by the workers of pass 3 (`pipelines.ingest_publish`) with pyarrow and this
schema: every file carries the metadata (scaling factor, shapes, model identities).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs

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
)


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


# --- the manifest and the accounting -------------------------------------------------------------
def _remove_manifest(output_uri: str) -> None:
    fs, path = storage.filesystem(storage.join(output_uri, MANIFEST_FILE))
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def dataset_digest(content_sum: int) -> str:
    """The accepted rows' digest: the sum mod 2^256 of sha256(key, tab, content hash) over the rows
    (`pipelines.ingest_publish.content_sum`, added up over shards), as 64 hex digits. Order-free, so
    the same accepted (key, content hash) pairs give the same digest however they were sharded."""
    return f"{content_sum:064x}"


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
