"""The ingest job (`ldm ingest`): caption-image pairs -> latents/, rejects/ and manifest.json.

The recipe (`run_ingest`): read the pairs and key them, check what needs no download (URL guard,
caption, column predicates: `pipelines.ingest_read`), download (img2dataset, one Ray task per
shard, `pipelines.download`), filter (plain functions), CLIP-score (an actor pool), judge the scores
(the cut and near-duplicates need every score, so they run once scoring is done), encode (an actor
pool), write (`pipelines.ingest_write`); then the funnel goes to MLflow (`pipelines.ingest_report`).
Every input row ends in exactly one of ``latents/`` (accepted) or ``rejects/`` (with the stage and
reason that dropped it); the job checks that at the end and fails loudly otherwise. A re-run into
the same output reuses finished download shards and rewrites the final outputs, so nothing is
duplicated. docs/DATA.md says what this plan holds on the driver and where it stops scaling.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldm import storage
from ldm.config.ingest import IngestConfig
from ldm.contract import (
    COL_CLIP_SCORE,
    COL_KEY,
    COL_SHA256,
    COL_SPLIT,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_CARRIED_COLUMNS,
    META_INPUT_IDS_SHAPE,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    REJ_REASON,
    REJ_STAGE,
    REJECT_COLUMNS,
    SPLIT_HOLDOUT,
    Counts,
    HoldoutInfo,
    Manifest,
    Models,
    write_manifest,
)
from ldm.first_stage.text_encoder import TEXT_ENCODER_DIR, TOKENIZER_DIR
from ldm.runtime import ensure_ray
from pipelines import download, filters, ingest_report
from pipelines.ingest_read import carried_columns, check_before_download, read_pairs, rejects_schema
from pipelines.ingest_write import (
    IngestAccountingError,
    _remove_manifest,
    check_accounting,
    dataset_digest,
    latents_schema,
    model_identity,
    write_latents,
    write_rejects,
)
from pipelines.stages import ClipScorer, LatentEncoder

EXPERIMENT = "ingest"
__all__ = ["IngestAccountingError", "check_accounting", "read_pairs", "run_ingest", "log_to_mlflow"]


# --- the Ray Data stages --------------------------------------------------------------------------
def judge_downloads(shard_uris: list[str], output_uri: str, cfg: IngestConfig, carried: list[str]):
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
            fn_kwargs={
                "filters": cfg.filters,
                "image_size": cfg.image_size,
                "duplicates": duplicates,
                "carried": carried,
            },
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
        near = filters.near_duplicate_keys_lsh(
            [k for k, m in zip(keys, kept, strict=True) if m],
            vectors,
            threshold,
            bands=cfg.filters.near_duplicate_bands,
            bits_per_band=cfg.filters.near_duplicate_band_bits,
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


def encode(scored, cfg: IngestConfig, carried: list[str]):
    """The accepted rows of ``scored`` with latents and the caption's text embedding and/or token ids
    (lazy: streamed to the writer)."""
    import ray.data

    return scored.map_batches(filters.keep_accepted, batch_size=None).map_batches(
        LatentEncoder,
        fn_constructor_kwargs={
            "autoencoder_spec": cfg.autoencoder_spec,
            "text_encoder_spec": cfg.text_encoder_spec,
            "use_gpu": cfg.encode.num_gpus > 0,
            "torch_threads": cfg.torch_threads,
            "store_text_embeddings": cfg.store_text_embeddings,
            "store_input_ids": cfg.store_input_ids,
            "carried": carried,
        },
        batch_size=cfg.encode.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.encode.concurrency),
        num_gpus=cfg.encode.num_gpus,
        num_cpus=cfg.encode.num_cpus,
        **_worker_env(),
    )


def collect_rejects(dataset, schema: pa.Schema) -> pa.Table:
    """The rejected rows of a judged or scored Dataset, as a ledger table of ``schema`` (no pixels)."""
    carried = schema.names[len(REJECT_COLUMNS) :]
    parts = [
        pa.Table.from_pydict({name: batch[name].tolist() for name in schema.names}, schema=schema)
        for batch in dataset.map_batches(
            filters.keep_rejected, fn_kwargs={"carried": carried}, batch_size=None
        ).iter_batches(batch_format="numpy", batch_size=None)
    ]
    return pa.concat_tables([schema.empty_table(), *parts])


# --- the job -------------------------------------------------------------------------------------
def run_ingest(cfg: IngestConfig) -> Manifest:
    """Run the ingest job; returns the manifest (also written to ``<output>/manifest.json``)."""
    started = time.time()
    storage.configure_s3(cfg.s3_endpoint, cfg.s3_region)  # before Ray starts: workers inherit it
    output = cfg.output_uri
    _remove_manifest(output)  # written last: its presence says the outputs beside it are complete
    models = {
        "clip": model_identity(cfg.clip_spec),
        "autoencoder": model_identity(cfg.autoencoder_spec),
        "text_encoder": model_identity(cfg.text_encoder_spec, subfolders=(TEXT_ENCODER_DIR, TOKENIZER_DIR)),
    }
    rows = read_pairs(cfg.input_uri, cfg.url_col, cfg.caption_col, carry=cfg.carry_columns)
    run_id = start_progress_run(cfg) if cfg.log_mlflow else None
    with _marks_run_failed(cfg, run_id):  # a run left "RUNNING" by a crash would read as alive
        carried = carried_columns(rows)
        carried_schema = rows.select(carried).schema
        schema = latents_schema(cfg, models, carried_schema)
        ledger_schema = rejects_schema(carried_schema)

        to_download, rejects = check_before_download(rows, cfg)
        encoded_batches: list = []
        shard_uris: list[str] = []
        scores, cutoff = np.zeros(0, np.float32), filters.clip_cutoff(np.zeros(0), cfg.filters)
        if to_download.num_rows:  # Ray only when there is something to fetch
            ensure_ray(cfg.ray_address, cfg.num_cpus)
            shard_uris = download.download_all(
                to_download, output, cfg.download, cfg.allowed_hosts, on_progress=_progress_logger(cfg, run_id)
            )
            judged = judge_downloads(shard_uris, output, cfg, carried)
            rejects.append(collect_rejects(judged, ledger_schema))
            scored, scores, cutoff = judge_scores(score(judged, cfg), cfg)
            rejects.append(collect_rejects(scored, ledger_schema))
            encoded = encode(scored, cfg, carried)
            encoded_batches = encoded.iter_batches(batch_format="numpy", batch_size=None)
        accepted = write_latents(encoded_batches, output, schema, cfg.rows_per_file, cfg.holdout_fraction)
        rejected = write_rejects(rejects, output, carried_schema)

        input_keys = rows.column(COL_KEY).to_pylist()
        check_accounting(
            input_keys, accepted.column(COL_KEY).to_pylist(), rejected.column(COL_KEY).to_pylist()
        )
        manifest = build_manifest(
            cfg, models, schema, len(input_keys), accepted, rejected, time.time() - started
        )
        manifest = manifest.model_copy(update={"clip_cutoff": cutoff if np.isfinite(cutoff) else None})
        write_manifest(manifest, output)
    if cfg.log_mlflow:
        log_to_mlflow(cfg, manifest, scores=scores, rejected=rejected, shard_uris=shard_uris, run_id=run_id)
    return manifest


@contextlib.contextmanager
def _marks_run_failed(cfg: IngestConfig, run_id: str | None) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if run_id is not None:
            _client(cfg).set_terminated(run_id, "FAILED")
        raise


def _client(cfg: IngestConfig):
    """An MLflow client bound to the work directory's tracking store (a bare ``MlflowClient()``
    uses whatever store the process last pointed mlflow at: another work directory, say)."""
    from mlflow import MlflowClient

    from ldm import tracking

    return MlflowClient(tracking_uri=tracking.configure(cfg.workdir))


def start_progress_run(cfg: IngestConfig) -> str:
    """Open the job's MLflow run before the download, so progress metrics show while it runs."""
    from ldm import tracking

    experiment_id = tracking.experiment(EXPERIMENT, cfg.workdir)  # first: it creates the store
    return _client(cfg).create_run(experiment_id, run_name="ingest").info.run_id


def _progress_logger(cfg: IngestConfig, run_id: str | None):
    """Progress figures -> MLflow metrics of ``run_id`` (stepped by shards done); None: console only."""
    if run_id is None:
        return None
    client = _client(cfg)

    def log(figures: dict[str, float]) -> None:
        step = int(figures["download_shards_done"])
        for key, value in figures.items():
            client.log_metric(run_id, key, value, step=step)

    return log


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

    def shape(key: bytes) -> list[int] | None:
        return json.loads(metadata[key]) if key in metadata else None

    holdout = sum(1 for split in accepted.column(COL_SPLIT).to_pylist() if split == SPLIT_HOLDOUT)
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
        text_embedding_shape=shape(META_TEXT_EMBEDDING_SHAPE),
        input_ids_shape=shape(META_INPUT_IDS_SHAPE),
        carried_columns=json.loads(metadata[META_CARRIED_COLUMNS]),
        split=HoldoutInfo(fraction=cfg.holdout_fraction, train=accepted.num_rows - holdout, holdout=holdout),
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
    run_id: str | None = None,
) -> str:
    """One MLflow run in experiment "ingest": config as params, counts as metrics, the manifest as
    an artifact and as the run's input dataset, and the funnel as pictures: ``funnel.png``,
    ``clip_scores.png`` (with the cut marked) and ``rejects/<reason>.png``. Returns the run id.

    ``run_id``: the run `start_progress_run` opened for the live progress metrics."""
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
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name="ingest") as run:
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
        dataset = MetaDataset(  # type: ignore[abstract]  # concrete at runtime; the stub marks profile abstract
            source=source,
            name="latents",
            digest=manifest.dataset_digest[:16],
        )
        mlflow.log_input(dataset, context="ingest_output")
        return run.info.run_id
