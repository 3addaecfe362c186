"""The one data contract between `pipelines/` (which writes latents) and `ldm/` (which trains on them).

Column names, dtypes, Parquet metadata keys and the work-directory layout are defined here once and
imported by both sides: nothing else in the code base retypes them as literals.

Latents are stored *unscaled* (the autoencoder's posterior mean, fp16); the scaling factor that
training multiplies them by lives in the Parquet schema metadata (``META_SCALING_FACTOR``), written by
ingest from the autoencoder's own config. Training reads it from there, never from a constant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ldm import storage

# --- latents/ : one row per accepted pair -------------------------------------------------------
COL_KEY = "key"  # string, stable across re-runs (derived from the input row, not from run order)
COL_URL = "url"
COL_CAPTION = "caption"
COL_CLIP_SCORE = "clip_score"  # float32
COL_LATENT = "latent"  # arrow.fixed_shape_tensor<float16>[C, H, W], unscaled posterior mean
COL_TEXT_EMBEDDING = "text_embedding"  # arrow.fixed_shape_tensor<float16>[L, D], text encoder output
COL_WIDTH = "width"  # int32, original image width (before any resize)
COL_HEIGHT = "height"  # int32, original image height
COL_SHA256 = "sha256"  # string, hash of the downloaded image bytes
COL_SPLIT = "split"  # string: SPLIT_HOLDOUT for ingest's hold-out rows, which training never reads
SPLIT_HOLDOUT = "holdout"

# int32 [L]: the caption's token ids (the text encoder's tokenizer, padded to its model_max_length),
# beside or instead of the text embedding (`store_text_embeddings: false`): at SD size an embedding
# (77 x 768 fp16, 118 KB) is ~4x the latent, the ids are 308 bytes. Training reads either.
COL_INPUT_IDS = "input_ids"
COL_SPLIT = "split"  # string: SPLIT_TRAIN or SPLIT_HOLDOUT (see `holdout_split`)

LATENT_DTYPE = "float16"
TEXT_EMBEDDING_DTYPE = "float16"
INPUT_IDS_DTYPE = "int32"

SPLIT_TRAIN = "train"
SPLIT_HOLDOUT = "holdout"

# --- rejects/ : one row per rejected input row ----------------------------------------------------
REJ_KEY = "key"
REJ_URL = "url"
REJ_CAPTION = "caption"
REJ_STAGE = "stage"  # where the row was dropped: guard, download, filter, score
REJ_REASON = "reason"  # short machine-readable code (`pipelines.filters` lists them)
REJ_DETAIL = "detail"  # human-readable: why, with the value that failed
REJECT_COLUMNS = (REJ_KEY, REJ_URL, REJ_CAPTION, REJ_STAGE, REJ_REASON, REJ_DETAIL)

# --- Parquet schema metadata of latents/ (bytes keys, JSON-encoded values) ------------------------
META_SCALING_FACTOR = b"ldm.scaling_factor"  # float: multiply stored latents by this for training
META_LATENT_SHAPE = b"ldm.latent_shape"  # [C, H, W]
META_TEXT_EMBEDDING_SHAPE = b"ldm.text_embedding_shape"  # [L, D]
META_AUTOENCODER = b"ldm.autoencoder"  # identity (path/name + digest) of the autoencoder
META_TEXT_ENCODER = b"ldm.text_encoder"  # identity of the text encoder
META_CLIP = b"ldm.clip"  # identity of the CLIP scorer
META_INPUT_IDS_SHAPE = b"ldm.input_ids_shape"  # [L], when input_ids are stored
META_PAD_TOKEN_ID = b"ldm.pad_token_id"  # int: the id that pads input_ids (the tokenizer's own)
META_CARRIED_COLUMNS = b"ldm.carried_columns"  # [names]: input columns carried through unchanged

# --- data directory layout (local path or s3:// prefix) -------------------------------------------
LATENTS_DIR = "latents"
REJECTS_DIR = "rejects"
MANIFEST_FILE = "manifest.json"


# --- hold-out split ---------------------------------------------------------------------------------
def holdout_split(key: str, fraction: float) -> str:
    """`SPLIT_HOLDOUT` for a deterministic ``fraction`` of keys, `SPLIT_TRAIN` for the rest.

    Decided by a hash of the key alone, so the same row lands in the same split in every re-run,
    on every worker, whatever the order or sharding; no global pass is needed.
    """
    if fraction <= 0.0:
        return SPLIT_TRAIN
    value = int.from_bytes(hashlib.sha256(f"holdout\x1f{key}".encode()).digest()[:8], "big")
    return SPLIT_HOLDOUT if value < fraction * 2**64 else SPLIT_TRAIN


def train_rows(table: Any) -> Any:
    """The rows of a latents table (pyarrow Table or RecordBatch) that training may read.

    Training never reads hold-out rows: call this on every batch read from ``latents/`` (or pass
    `TRAIN_ROWS_FILTER` to the Parquet reader). A table without a ``split`` column (written before
    the split existed) is all training data.
    """
    import pyarrow.compute as pc

    if COL_SPLIT not in table.schema.names:
        return table
    return table.filter(pc.equal(table.column(COL_SPLIT), SPLIT_TRAIN))


def train_rows_filter() -> Any:
    """The same rule as a pyarrow dataset expression, for ``ray.data.read_parquet(..., filter=...)``
    or ``pyarrow.parquet.read_table(..., filters=...)`` (only for data that has the column)."""
    import pyarrow.dataset as ds

    return ds.field(COL_SPLIT) == SPLIT_TRAIN


# --- manifest.json: what ingest made, read by train, retrain, demo and the notebooks -------------------
class _Record(BaseModel):
    # Frozen; unknown keys are ignored so that a manifest written by a newer version still reads.
    model_config = ConfigDict(frozen=True, extra="ignore", protected_namespaces=())


class Counts(_Record):
    """Rows per stage of the funnel: ``input == accepted + rejected`` (the ingest invariant)."""

    input: int
    accepted: int
    rejected: int = 0
    rejected_by_stage: dict[str, int] = Field(default_factory=dict)
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)


class FunnelStep(_Record):
    step: str
    rows: int


class ModelIdentity(_Record):
    spec: str = ""
    sha256: str


class Models(_Record):
    clip: ModelIdentity | None = None
    autoencoder: ModelIdentity
    text_encoder: ModelIdentity


class HoldoutInfo(_Record):
    """The hold-out split of the accepted rows (column `COL_SPLIT` of latents/, rule `holdout_split`)."""

    fraction: float = 0.0
    train: int = 0
    holdout: int = 0


class ManifestPart(_Record):
    """One ingest output inside a union (`pipelines.retrain.build_union`)."""

    data: str
    input: str
    dataset_digest: str
    accepted: int


class Manifest(_Record):
    """``manifest.json`` beside latents/ and rejects/: written last, so its presence says they are complete.

    ``kind="union"`` is the training set `ldm retrain` gathers from several ingest outputs (``parts``).
    """

    kind: Literal["ingest", "union"] = "ingest"
    created: str = ""
    input: str = ""
    output: str = ""
    counts: Counts
    funnel: list[FunnelStep] = Field(default_factory=list)
    # sum mod 2^256 of sha256(key, content hash) over the accepted rows, 64 hex digits: same data, same
    # digest, whatever the order or sharding (`pipelines.ingest_write.dataset_digest`)
    dataset_digest: str
    models: Models
    scaling_factor: float
    latent_shape: list[int]
    text_embedding_shape: list[int] | None = None  # None when store_text_embeddings is false
    input_ids_shape: list[int] | None = None  # None when input_ids are not stored
    carried_columns: list[str] = Field(default_factory=list)
    split: HoldoutInfo = Field(default_factory=HoldoutInfo)
    clip_cutoff: float | None = None
    shards: int = 0  # input shards written (each latents/ and rejects/ file pair is one)
    seconds: float = 0.0
    rows_per_second: float | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # the IngestConfig as dumped (a union: {})
    parts: list[ManifestPart] = Field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)


def read_manifest(uri: str) -> Manifest:
    """The manifest at ``uri`` (a ``manifest.json`` file, or the folder holding one; local or s3://)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, MANIFEST_FILE)
    return Manifest.model_validate_json(storage.read_bytes(uri))


def write_manifest(manifest: Manifest, folder_uri: str) -> str:
    """Write ``manifest`` as ``<folder_uri>/manifest.json``; returns its URI."""
    uri = storage.join(folder_uri, MANIFEST_FILE)
    storage.write_bytes(uri, manifest.to_json().encode())
    return uri


class WorkDir:
    """Where every command keeps its state (default ``./ldm-demo``).

    One place that names the paths, so that `ldm bootstrap` writes the models exactly where
    `ldm ingest` and `ldm train` look for them.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # synthetic source
    @property
    def synth(self) -> Path:
        return self.root / "synth"

    @property
    def pairs(self) -> Path:
        """The pairs file (url, caption) of the synthetic source."""
        return self.synth / "pairs.parquet"

    # first-stage models made by `ldm bootstrap`
    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def clip(self) -> Path:
        return self.models / "clip"

    @property
    def autoencoder(self) -> Path:
        return self.models / "autoencoder"

    @property
    def text_encoder(self) -> Path:
        """A transformers CLIPTextModel folder, with its CLIPTokenizer in ``tokenizer/`` beside it."""
        return self.models / "text_encoder"

    @property
    def tokenizer(self) -> Path:
        return self.models / "tokenizer"

    # ingest output
    @property
    def data(self) -> Path:
        return self.root / "data"

    # training
    @property
    def runs(self) -> Path:
        """Ray Train storage_path (checkpoints, results)."""
        return self.root / "runs"

    @property
    def exports(self) -> Path:
        """Exported diffusers pipeline folders."""
        return self.root / "exports"

    # tracking
    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"
