"""The one data contract between `pipelines/` (which writes latents) and `ldm/` (which trains on them).

Column names, dtypes, Parquet metadata keys and the work-directory layout are defined here once and
imported by both sides (STYLE.md 7): nothing else in the code base retypes them as literals.

Latents are stored *unscaled* (the autoencoder's posterior mean, fp16); the scaling factor that
training multiplies them by lives in the Parquet schema metadata (``META_SCALING_FACTOR``), written by
ingest from the autoencoder's own config. Training reads it from there, never from a constant.
"""

from __future__ import annotations

from pathlib import Path

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

LATENT_DTYPE = "float16"
TEXT_EMBEDDING_DTYPE = "float16"

# --- rejects/ : one row per rejected input row ----------------------------------------------------
REJECT_COLUMNS = ("key", "url", "caption", "stage", "reason", "detail")

# --- Parquet schema metadata of latents/ (bytes keys, JSON-encoded values) ------------------------
META_SCALING_FACTOR = b"ldm.scaling_factor"  # float: multiply stored latents by this for training
META_LATENT_SHAPE = b"ldm.latent_shape"  # [C, H, W]
META_TEXT_EMBEDDING_SHAPE = b"ldm.text_embedding_shape"  # [L, D]
META_AUTOENCODER = b"ldm.autoencoder"  # identity (path/name + digest) of the autoencoder
META_TEXT_ENCODER = b"ldm.text_encoder"  # identity of the text encoder
META_CLIP = b"ldm.clip"  # identity of the CLIP scorer

# --- data directory layout (local path or s3:// prefix) -------------------------------------------
LATENTS_DIR = "latents"
REJECTS_DIR = "rejects"
MANIFEST_FILE = "manifest.json"


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
