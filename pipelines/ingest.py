"""The ingest job (`ldm ingest`): caption-image pairs -> latents/, rejects/ and manifest.json.

The recipe (`run_ingest`): read the pairs and key them, guard the URLs, download (img2dataset,
one Ray task per shard), filter (plain functions), CLIP-score (an actor pool), judge the scores (the
cut and near-duplicates need every score, so they run once scoring is done), encode (an actor
pool), write; then the funnel goes to MLflow (`pipelines.ingest_report`). Every input row ends in exactly one of ``latents/`` (accepted) or
``rejects/`` (with the stage and reason that dropped it); the job checks that at the end and fails
loudly otherwise. A re-run into the same output reuses finished download shards and rewrites the
final outputs, so nothing is duplicated.

Latents are written with pyarrow on the driver, not with ``Dataset.write_parquet``: every file must
carry the schema metadata (scaling factor, shapes, model identities) and Ray's writer has no hook
for it. The rows are small (a 4x16x16 fp16 latent is 2 KB), so the funnel is not the bottleneck of
this job; the downloads and the model stages are.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import Counter
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ldm import storage
from ldm.config.ingest import IngestConfig
from ldm.contract import (
    COL_CAPTION,
    COL_CLIP_SCORE,
    COL_HEIGHT,
    COL_KEY,
    COL_LATENT,
    COL_SHA256,
    COL_TEXT_EMBEDDING,
    COL_URL,
    COL_WIDTH,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_AUTOENCODER,
    META_CLIP,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    META_TEXT_ENCODER,
    REJ_REASON,
    REJ_STAGE,
    REJECT_COLUMNS,
    REJECTS_DIR,
    Counts,
    Manifest,
    Models,
    write_manifest,
)
from ldm.first_stage.text_encoder import TEXT_ENCODER_DIR, TOKENIZER_DIR
from ldm.runtime import ensure_ray
from pipelines import download, filters, ingest_report, urlguard
from pipelines.stages import ClipScorer, LatentEncoder

EXPERIMENT = "ingest"
REJECTS_SCHEMA = pa.schema([(name, pa.string()) for name in REJECT_COLUMNS])


class IngestAccountingError(RuntimeError):
    """Some input row is missing from both latents/ and rejects/, or is in them more than once."""


# --- read ----------------------------------------------------------------------------------------
def read_pairs(uri: str, url_col: str = "url", caption_col: str = "caption") -> pa.Table:
    """The input as (key, url, caption) strings; Parquet (file or folder), CSV or TSV, local or s3://."""
    fs, path = storage.filesystem(uri)
    name = path.lower().removesuffix(".gz")
    if name.endswith(".csv") or name.endswith(".tsv"):
        delimiter = "\t" if name.endswith(".tsv") else ","
        with fs.open_input_stream(path, compression="detect") as stream:
            table = pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    else:  # Parquet: a file or a folder of files
        table = pq.read_table(path, filesystem=fs)
    missing = [c for c in (url_col, caption_col) if c not in table.column_names]
    if missing:
        raise ValueError(f"{uri}: missing column(s) {missing}; it has {table.column_names}")
    urls = _as_text(table.column(url_col))
    captions = _as_text(table.column(caption_col))
    keys = [filters.row_key(i, u, c) for i, (u, c) in enumerate(zip(urls, captions, strict=True))]
    return pa.table({COL_KEY: keys, COL_URL: urls, COL_CAPTION: captions})


def _as_text(column: pa.ChunkedArray) -> list[str]:
    """A column as strings; nulls become "". Bytes that are not UTF-8 (pyarrow reads such a CSV
    column as binary) are decoded with U+FFFD for the bad bytes: the row stays, with a visible scar."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return ["" if v is None else v.decode("utf-8", errors="replace") for v in column.to_pylist()]
    return ["" if v is None else str(v) for v in column.to_pylist()]


# --- guard and caption check (before any byte is fetched) ------------------------------------------
def _reject_table(
    rows: pa.Table, mask: list[bool], stage: str, reasons: list[str], details: list[str]
) -> pa.Table:
    picked = rows.filter(pa.array(mask))
    return pa.table(
        {
            COL_KEY: picked.column(COL_KEY),
            COL_URL: picked.column(COL_URL),
            COL_CAPTION: picked.column(COL_CAPTION),
            filters.COL_STAGE: [stage] * picked.num_rows,
            filters.COL_REASON: [r for r, m in zip(reasons, mask, strict=True) if m],
            filters.COL_DETAIL: [d for d, m in zip(details, mask, strict=True) if m],
        },
        schema=REJECTS_SCHEMA,
    )


def guard_and_check_captions(rows: pa.Table, cfg: IngestConfig) -> tuple[pa.Table, list[pa.Table]]:
    """(rows worth downloading, [rejects of the guard, rejects of the caption check])."""
    verdicts = [urlguard.check_url(url, cfg.allowed_hosts) for url in rows.column(COL_URL).to_pylist()]
    blocked = [not v.allowed for v in verdicts]
    blocked_rejects = _reject_table(
        rows,
        blocked,
        filters.STAGE_GUARD,
        [filters.REASON_BLOCKED] * len(blocked),
        [v.detail for v in verdicts],
    )
    rows = rows.filter(pa.array([not b for b in blocked]))
    problems = [
        filters.caption_problem(c, cfg.filters.min_caption_chars)
        for c in rows.column(COL_CAPTION).to_pylist()
    ]
    short = [p is not None for p in problems]
    caption_rejects = _reject_table(
        rows, short, filters.STAGE_FILTER, [filters.REASON_CAPTION] * len(short), [p or "" for p in problems]
    )
    return rows.filter(pa.array([not s for s in short])), [blocked_rejects, caption_rejects]


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


def latents_schema(cfg: IngestConfig, models: dict[str, dict[str, str]]) -> pa.Schema:
    """The schema of latents/, with shapes and the scaling factor read from the models' own configs."""
    from ldm.first_stage.autoencoder import load_autoencoder
    from ldm.first_stage.text_encoder import load_text_encoder

    vae = load_autoencoder(cfg.autoencoder_spec)
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = [vae.config.latent_channels, cfg.image_size // downsample, cfg.image_size // downsample]
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder_spec)
    text_shape = [tokenizer.model_max_length, text_encoder.config.hidden_size]
    metadata = {
        META_SCALING_FACTOR: json.dumps(float(vae.config.scaling_factor)),
        META_LATENT_SHAPE: json.dumps(latent_shape),
        META_TEXT_EMBEDDING_SHAPE: json.dumps(text_shape),
        META_AUTOENCODER: json.dumps(models["autoencoder"]),
        META_TEXT_ENCODER: json.dumps(models["text_encoder"]),
        META_CLIP: json.dumps(models["clip"]),
    }
    return pa.schema(
        [
            (COL_KEY, pa.string()),
            (COL_URL, pa.string()),
            (COL_CAPTION, pa.string()),
            (COL_CLIP_SCORE, pa.float32()),
            (COL_WIDTH, pa.int32()),
            (COL_HEIGHT, pa.int32()),
            (COL_SHA256, pa.string()),
            (COL_LATENT, pa.fixed_shape_tensor(pa.float16(), latent_shape)),
            (COL_TEXT_EMBEDDING, pa.fixed_shape_tensor(pa.float16(), text_shape)),
        ],
        metadata=metadata,
    )


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


def _latent_batch_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
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


def write_latents(batches, output_uri: str, schema: pa.Schema, rows_per_file: int) -> pa.Table:
    """Stream encoded batches into ``latents/part-NNNNN.parquet``; returns their (key, sha256) columns."""
    folder = storage.join(output_uri, LATENTS_DIR)
    _fresh_dir(folder)
    fs, base = storage.filesystem(folder)
    written: list[pa.Table] = [
        pa.table({COL_KEY: pa.array([], pa.string()), COL_SHA256: pa.array([], pa.string())})
    ]
    writer, rows_in_file, part = None, 0, 0
    for batch in batches:
        table = _latent_batch_table(batch, schema)
        while table.num_rows:
            if writer is None or rows_in_file >= rows_per_file:
                if writer is not None:
                    writer.close()
                writer = pq.ParquetWriter(f"{base}/part-{part:05d}.parquet", schema, filesystem=fs)
                rows_in_file, part = 0, part + 1
            piece = table.slice(0, rows_per_file - rows_in_file)
            writer.write_table(piece)
            written.append(piece.select([COL_KEY, COL_SHA256]))
            rows_in_file += piece.num_rows
            table = table.slice(piece.num_rows)
    if writer is None:  # no accepted row: still leave one (empty) file that carries the schema
        pq.write_table(schema.empty_table(), f"{base}/part-00000.parquet", filesystem=fs)
    else:
        writer.close()
    return pa.concat_tables(written)


def write_rejects(rejects: list[pa.Table], output_uri: str) -> pa.Table:
    table = (
        pa.concat_tables([r.cast(REJECTS_SCHEMA) for r in rejects])
        if rejects
        else REJECTS_SCHEMA.empty_table()
    )
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


# --- the Ray Data stages --------------------------------------------------------------------------
def judge_downloads(shard_uris: list[str], output_uri: str, cfg: IngestConfig):
    """Downloaded shards -> a materialized Dataset of filter verdicts (plus model-ready images)."""
    import ray.data

    # duplicates need a global view of the content hashes; the other filters are per row
    fs, _ = storage.filesystem(output_uri)
    paths = [storage.filesystem(uri)[1] for uri in shard_uris]
    hashes = pq.ParquetDataset(paths, filesystem=fs).read(columns=[COL_KEY, COL_SHA256, download.COL_STATUS])
    ok = hashes.filter(pc.equal(hashes.column(download.COL_STATUS), "success"))
    duplicates = filters.duplicate_keys(ok.column(COL_KEY).to_pylist(), ok.column(COL_SHA256).to_pylist())
    return (
        ray.data.read_parquet(paths, filesystem=fs)
        .map_batches(
            filters.filter_downloads,
            fn_kwargs={"filters": cfg.filters, "image_size": cfg.image_size, "duplicates": duplicates},
            batch_size=cfg.filter_batch_size,
        )
        .materialize()
    )


def _worker_env() -> dict:
    """``runtime_env`` for model actors: the S3 settings, so they can read ``s3://`` models."""
    env = storage.s3_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def score(judged, cfg: IngestConfig):
    """The accepted rows of ``judged`` with their CLIP score and image embedding (materialized)."""
    import ray.data

    return (
        judged.map_batches(filters.keep_accepted, batch_size=None)
        .map_batches(
            ClipScorer,
            fn_constructor_kwargs={
                "spec": cfg.clip_spec,
                "threshold": None,  # judged below, once every score is known (see judge_scores)
                "use_gpu": cfg.score.num_gpus > 0,
                "torch_threads": cfg.torch_threads,
            },
            batch_size=cfg.score.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.score.concurrency),
            num_gpus=cfg.score.num_gpus,
            num_cpus=cfg.score.num_cpus,
            **_worker_env(),
        )
        .materialize()
    )


def judge_scores(scored, cfg: IngestConfig) -> tuple[object, np.ndarray, float]:
    """Apply the CLIP cut and the near-duplicate filter to ``scored``.

    Both need a global view (a quantile of all scores, similarities between all images), so the
    keys, scores and embeddings (no pixels: ~2 KB per row with ViT-B/32) come to the driver first.
    Returns (the judged Dataset, materialized; every score; the cutoff).
    """
    keys: list[str] = []
    scores: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    columns = [COL_KEY, COL_CLIP_SCORE, filters.COL_IMAGE_EMBEDDING]
    for batch in scored.select_columns(columns).iter_batches(batch_format="numpy", batch_size=None):
        keys.extend(str(k) for k in batch[COL_KEY])
        scores.append(batch[COL_CLIP_SCORE])
        embeddings.append(np.asarray(batch[filters.COL_IMAGE_EMBEDDING]).reshape(len(batch[COL_KEY]), -1))
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    cutoff = filters.clip_cutoff(all_scores, cfg.filters)
    near: dict[str, str] = {}
    threshold = cfg.filters.near_duplicate_threshold
    if threshold is not None and keys:
        kept = all_scores >= cutoff  # near-duplicates only among rows that pass the score cut
        vectors = np.concatenate(embeddings)[kept]
        near = filters.near_duplicate_keys(
            [k for k, m in zip(keys, kept, strict=True) if m], vectors, threshold
        )
    if cfg.filters.clip_mode == "threshold":
        how = f"threshold {cfg.filters.clip_threshold}"
    else:
        how = f"top {cfg.filters.clip_keep_fraction:.0%} cut"
    judged = scored.map_batches(
        filters.judge_scores,
        fn_kwargs={"cutoff": cutoff, "near_duplicates": near, "cutoff_detail": how},
        batch_size=cfg.filter_batch_size,
    ).materialize()
    return judged, all_scores, cutoff


def encode(scored, cfg: IngestConfig):
    """The accepted rows of ``scored`` with latents and text embeddings (lazy: streamed to the writer)."""
    import ray.data

    return scored.map_batches(filters.keep_accepted, batch_size=None).map_batches(
        LatentEncoder,
        fn_constructor_kwargs={
            "autoencoder_spec": cfg.autoencoder_spec,
            "text_encoder_spec": cfg.text_encoder_spec,
            "use_gpu": cfg.encode.num_gpus > 0,
            "torch_threads": cfg.torch_threads,
        },
        batch_size=cfg.encode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.encode.concurrency),
        num_gpus=cfg.encode.num_gpus,
        num_cpus=cfg.encode.num_cpus,
        **_worker_env(),
    )


def collect_rejects(dataset) -> pa.Table:
    """The rejected rows of a judged or scored Dataset, as a ledger table (small: no pixels)."""
    parts = [
        pa.Table.from_pydict({name: batch[name].tolist() for name in REJECT_COLUMNS}, schema=REJECTS_SCHEMA)
        for batch in dataset.map_batches(filters.keep_rejected, batch_size=None).iter_batches(
            batch_format="numpy", batch_size=None
        )
    ]
    return pa.concat_tables([REJECTS_SCHEMA.empty_table(), *parts])


# --- the job -------------------------------------------------------------------------------------
def run_ingest(cfg: IngestConfig) -> Manifest:
    """Run the ingest job; returns the manifest (also written to ``<output>/manifest.json``)."""
    started = time.time()
    storage.configure_s3(cfg.s3_endpoint, cfg.s3_region)  # before Ray starts: workers inherit it
    ensure_ray(cfg.ray_address, cfg.num_cpus)
    output = cfg.output_uri
    _remove_manifest(output)  # written last: its presence says the outputs beside it are complete
    models = {
        "clip": model_identity(cfg.clip_spec),
        "autoencoder": model_identity(cfg.autoencoder_spec),
        "text_encoder": model_identity(cfg.text_encoder_spec, subfolders=(TEXT_ENCODER_DIR, TOKENIZER_DIR)),
    }
    schema = latents_schema(cfg, models)

    rows = read_pairs(cfg.input_uri, cfg.url_col, cfg.caption_col)
    to_download, rejects = guard_and_check_captions(rows, cfg)
    encoded_batches: list = []
    shard_uris: list[str] = []
    scores, cutoff = np.zeros(0, np.float32), filters.clip_cutoff(np.zeros(0), cfg.filters)
    if to_download.num_rows:
        shard_uris = download.download_all(to_download, output, cfg.download, cfg.allowed_hosts)
        judged = judge_downloads(shard_uris, output, cfg)
        rejects.append(collect_rejects(judged))
        scored, scores, cutoff = judge_scores(score(judged, cfg), cfg)
        rejects.append(collect_rejects(scored))
        encoded_batches = encode(scored, cfg).iter_batches(batch_format="numpy", batch_size=None)
    accepted = write_latents(encoded_batches, output, schema, cfg.rows_per_file)
    rejected = write_rejects(rejects, output)

    input_keys = rows.column(COL_KEY).to_pylist()
    check_accounting(input_keys, accepted.column(COL_KEY).to_pylist(), rejected.column(COL_KEY).to_pylist())
    manifest = build_manifest(cfg, models, schema, len(input_keys), accepted, rejected, time.time() - started)
    manifest = manifest.model_copy(update={"clip_cutoff": cutoff if np.isfinite(cutoff) else None})
    write_manifest(manifest, output)
    if cfg.log_mlflow:
        log_to_mlflow(cfg, manifest, scores=scores, rejected=rejected, shard_uris=shard_uris)
    return manifest


def build_manifest(
    cfg: IngestConfig,
    models: dict[str, dict[str, str]],
    schema: pa.Schema,
    num_input: int,
    accepted: pa.Table,
    rejected: pa.Table,
    seconds: float,
) -> Manifest:
    metadata = schema.metadata
    by_reason = dict(sorted(Counter(rejected.column(REJ_REASON).to_pylist()).items()))
    return Manifest(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        input=cfg.input_uri,
        output=cfg.output_uri,
        counts=Counts(
            input=num_input,
            accepted=accepted.num_rows,
            rejected=rejected.num_rows,
            rejected_by_stage=dict(sorted(Counter(rejected.column(REJ_STAGE).to_pylist()).items())),
            rejected_by_reason=by_reason,
        ),
        funnel=ingest_report.funnel(num_input, by_reason),
        dataset_digest=dataset_digest(accepted),
        models=Models.model_validate(models),
        scaling_factor=json.loads(metadata[META_SCALING_FACTOR]),
        latent_shape=json.loads(metadata[META_LATENT_SHAPE]),
        text_embedding_shape=json.loads(metadata[META_TEXT_EMBEDDING_SHAPE]),
        seconds=round(seconds, 3),
        rows_per_second=round(num_input / seconds, 3) if seconds > 0 else None,
        config=cfg.to_dict(),
    )


def log_to_mlflow(
    cfg: IngestConfig,
    manifest: Manifest,
    scores: np.ndarray | None = None,
    rejected: pa.Table | None = None,
    shard_uris: list[str] | None = None,
) -> str:
    """One MLflow run in experiment "ingest": config as params, counts as metrics, the manifest as
    an artifact and as the run's input dataset, and the funnel as pictures: ``funnel.png``,
    ``clip_scores.png`` (with the cut marked) and ``rejects/<reason>.png``. Returns the run id."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from ldm import tracking

    experiment_id = tracking.experiment(EXPERIMENT, cfg.workdir)
    counts = manifest.counts
    metrics: dict[str, float] = {
        "input_rows": counts.input,
        "accepted_rows": counts.accepted,
        "rejected_rows": counts.rejected,
        "holdout_rows": manifest.split.holdout,
    }
    metrics |= {f"rejected_{reason}": n for reason, n in counts.rejected_by_reason.items()}
    metrics |= {"seconds": manifest.seconds, "rows_per_second": manifest.rows_per_second or 0.0}
    if manifest.clip_cutoff is not None:
        metrics["clip_cutoff"] = manifest.clip_cutoff
    with mlflow.start_run(experiment_id=experiment_id, run_name="ingest") as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in cfg.flat().items()})
        mlflow.log_metrics(metrics)
        mlflow.log_text(manifest.to_json(), MANIFEST_FILE)
        mlflow.set_tag("dataset_digest", manifest.dataset_digest)
        mlflow.log_figure(ingest_report.funnel_figure(manifest.funnel), "funnel.png")
        if scores is not None and len(scores):
            how = cfg.filters.clip_mode if cfg.filters.clip_mode == "threshold" else "top fraction"
            figure = ingest_report.score_histogram(scores, manifest.clip_cutoff, how)
            mlflow.log_figure(figure, "clip_scores.png")
        if rejected is not None:
            samples = ingest_report.reject_samples(
                rejected, shard_uris or [], cfg.rejected_samples_per_reason
            )
            for reason, items in sorted(samples.items()):
                mlflow.log_figure(ingest_report.sample_grid(reason, items), f"rejects/{reason}.png")
        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(storage.join(cfg.output_uri, LATENTS_DIR))
        dataset = MetaDataset(
            source=source,
            name="latents",
            digest=manifest.dataset_digest[:16],
        )
        mlflow.log_input(dataset, context="ingest_output")
        return run.info.run_id
