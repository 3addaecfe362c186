"""Config of `ldm ingest`: download caption-image pairs, filter them, CLIP-score them, encode them.

One frozen config per job. Paths left as ``None`` default to the work directory's
layout (`ldm.contract.WorkDir`): the synthetic pairs file as input, ``data/`` as output, and the
first-stage models that `ldm bootstrap` wrote. Stage resources are declared here and applied where
the job calls ``map_batches`` (`pipelines.ingest`).
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, model_validator

from ldm.config.base import ConfigBase
from ldm.contract import WorkDir


class DownloadConfig(ConfigBase):
    """img2dataset settings, per URL shard."""

    timeout_s: int = Field(10, ge=1)
    retries: int = Field(1, ge=0)
    thread_count: int = Field(16, ge=1)  # threads per shard task: downloading is I/O bound
    rows_per_shard: int = Field(1000, ge=1)  # the unit of work, of retry and of reuse on a re-run
    shard_concurrency: int = Field(2, ge=1)  # shard tasks running at once
    max_shard_attempts: int = Field(3, ge=1)  # a failed shard task is retried by Ray this many times
    # Opt-out: X-Robots-Tag directives that forbid using an image (img2dataset's own default list);
    # such rows are rejected as ``opted_out``. An empty list turns the check off.
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    user_agent_token: str | None = None  # names this crawler in User-Agent and in X-Robots-Tag "token:" rules


class ColumnPredicate(ConfigBase):
    """A predicate on one input column (LAION's ``punsafe``, ``pwatermark``, ``similarity``, ...).

    A row passes when its value is a number within [min, max] (either bound may be left out); a row
    whose value is missing or not a number fails. Failing rows are rejected as ``column_filter``.
    """

    column: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _has_a_bound(self) -> ColumnPredicate:
        if self.min is None and self.max is None:
            raise ValueError(f"filters.columns: {self.column!r} needs a min or a max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"filters.columns: {self.column!r} has min {self.min} > max {self.max}")
        return self


class FilterConfig(ConfigBase):
    """Row filters; sizes are checked on the *original* image, before any resize."""

    min_side: int = Field(32, ge=1)
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    max_pixels: int = Field(64_000_000, ge=1)  # decompression-bomb guard, checked from the header
    min_caption_chars: int = Field(3, ge=1)
    # CLIP score filter. "threshold": keep scores >= clip_threshold (LAION: 0.28 with ViT-B/32).
    # "top_fraction": keep the best clip_keep_fraction of the scored rows (DataComp's best: 0.3).
    clip_mode: Literal["threshold", "top_fraction"] = "threshold"
    clip_threshold: float = 0.2  # cosine similarity of the CLIP scorer; below it: low_clip_score
    clip_keep_fraction: float = Field(0.3, gt=0.0, le=1.0)
    # Near-duplicates: a row whose CLIP image embedding has cosine >= this with a row of lower key is
    # rejected as near_duplicate (LAION deduplicated on CLIP embeddings). None: off.
    near_duplicate_threshold: float | None = Field(None, gt=0.0, le=1.0)
    # Candidates come from random-hyperplane LSH buckets (bands x bits per band), compared exactly
    # inside each bucket; docs/DATA.md gives the chance of missing a pair (5e-5 at cosine 0.96).
    near_duplicate_bands: int = Field(40, ge=1)
    near_duplicate_band_bits: int = Field(16, ge=1, le=62)
    # Predicates on input columns, checked before any download (``column_filter``).
    columns: list[ColumnPredicate] = Field(default_factory=list)


class StageResources(ConfigBase):
    """Resources of one model stage (an actor pool), as passed to ``Dataset.map_batches``."""

    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)  # actors in the pool
    num_gpus: float = Field(0.0, ge=0.0)
    num_cpus: float = Field(1.0, gt=0.0)


class IngestConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    input: str | None = None  # Parquet/CSV/TSV with url and caption; default: the synthetic pairs
    output: str | None = None  # local folder or s3:// prefix; default: WorkDir.data
    # S3-compatible endpoint (MinIO, Ceph, moto) for every s3:// path; None: AWS_ENDPOINT_URL_S3 /
    # AWS_ENDPOINT_URL or AWS itself. Credentials always come from the environment, never from here.
    s3_endpoint: str | None = None
    s3_region: str | None = None
    url_col: str = "url"
    caption_col: str = "caption"
    # Hosts (names or literal addresses) allowed even though they resolve to private/loopback
    # addresses. When `input` is left to the synthetic default, its server's 127.0.0.1 is allowed.
    allow_hosts: list[str] = Field(default_factory=list)
    # model specs: local folders or s3:// prefixes; default: the folders written by `ldm bootstrap`
    clip: str | None = None
    autoencoder: str | None = None
    text_encoder: str | None = None  # a folder with text_encoder/ and tokenizer/ (bootstrap's or SD's)
    image_size: int = Field(64, ge=8)  # the models' input size; accepted images are resized to it
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    filter_batch_size: int = Field(256, ge=1)
    # The actor pool of the fused ScoreEncoder (CLIP score + autoencoder + text encoder in one actor).
    encode: StageResources = Field(default_factory=StageResources)
    # Deprecated: scoring and encoding were two actor pools before the streaming plan fused them.
    # Still accepted so that older configs load; ignored with a warning (``encode:`` sizes the pool).
    score: StageResources | None = None
    rows_per_file: int = Field(5000, ge=1)  # rows per latents/ Parquet file
    # What latents/ holds for the caption: the text encoder's output and/or the tokenizer's ids.
    # At SD size the embedding (77 x 768 fp16) is ~4x the latent: keep only the ids there.
    store_text_embeddings: bool = True
    store_input_ids: bool = True
    # Deterministic fraction of the accepted rows (by key hash, `ldm.contract.holdout_split`) marked
    # ``split = "holdout"``: training never reads them, evaluation may.
    holdout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    # Input columns other than url and caption are carried into latents/ and rejects/ (a name that
    # clashes with one of ours gets this prefix). False: drop them.
    carry_columns: bool = True
    torch_threads: int = Field(2, ge=1)  # intra-op threads of each model actor
    num_cpus: int | None = None  # for a local Ray; None: all cores
    ray_address: str | None = None
    log_mlflow: bool = True
    rejected_samples_per_reason: int = Field(8, ge=0)  # images per reason in the MLflow reject grids

    @model_validator(mode="after")
    def _score_is_deprecated(self) -> IngestConfig:
        if self.score is not None:
            warnings.warn(
                "ingest config: `score:` is ignored since scoring and encoding run in one actor pool; "
                "size it with `encode:` (batch_size, concurrency, num_gpus, num_cpus) and drop `score:`",
                FutureWarning,  # shown by default: the reader is the user of the config
                stacklevel=2,
            )
        return self

    @model_validator(mode="after")
    def _columns_differ(self) -> IngestConfig:
        if self.url_col == self.caption_col:
            raise ValueError(f"url_col and caption_col must differ, both are {self.url_col!r}")
        if not (self.store_text_embeddings or self.store_input_ids):
            raise ValueError(
                "store_text_embeddings and store_input_ids are both false: nothing holds the caption"
            )
        return self

    # --- resolved paths (the work directory's layout when left unset) -----------------------------
    @property
    def input_uri(self) -> str:
        return self.input or str(WorkDir(self.workdir).pairs)

    @property
    def output_uri(self) -> str:
        return self.output or str(WorkDir(self.workdir).data)

    @property
    def clip_spec(self) -> str:
        return self.clip or str(WorkDir(self.workdir).clip)

    @property
    def autoencoder_spec(self) -> str:
        return self.autoencoder or str(WorkDir(self.workdir).autoencoder)

    @property
    def text_encoder_spec(self) -> str:
        # load_text_encoder takes the folder that holds text_encoder/ and tokenizer/
        return self.text_encoder or str(WorkDir(self.workdir).models)

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """``allow_hosts``, plus the synthetic source's loopback host when reading the default input."""
        hosts = {host.lower().strip("[]") for host in self.allow_hosts}
        if self.input is None:
            hosts.add("127.0.0.1")
        return frozenset(hosts)
