"""The ingest job (`ldm ingest`): caption-image pairs -> latents/, rejects/ and manifest.json.

The recipe (`run_ingest`), in three passes over input shards (`pipelines.ingest_plan`):

1. `pipelines.ingest_stream`: one streaming Ray Data plan: per shard, read, check what needs no
   download (URL guard, caption, column predicates), download (img2dataset), filter; then one model
   actor scores and encodes; workers stage the rows, the driver writes a marker per finished shard;
2. `pipelines.ingest_judge`: exact duplicates, the CLIP cut and near-duplicates over the staged
   rows (no pixels), in Ray Data;
3. `pipelines.ingest_publish`: per shard, latents/ and rejects/ files written by Ray tasks;
   then the manifest, and the funnel goes to MLflow (`pipelines.ingest_report`).

Every input row ends in exactly one of ``latents/`` (accepted) or ``rejects/`` (with the stage and
reason that dropped it); the job checks that from per-shard counts and key digests and fails loudly
otherwise. A re-run into the same output reuses finished shards in pass 1 and pass 3, so nothing is
duplicated or lost. The driver holds per-shard numbers only (docs/DATA.md).
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

from ldm import storage
from ldm.config.ingest import IngestConfig
from ldm.contract import (
    LATENTS_DIR,
    MANIFEST_FILE,
    META_CARRIED_COLUMNS,
    META_INPUT_IDS_SHAPE,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    Counts,
    HoldoutInfo,
    Manifest,
    Models,
    write_manifest,
)
from ldm.first_stage.text_encoder import TEXT_ENCODER_DIR, TOKENIZER_DIR
from ldm.runtime import ensure_ray
from pipelines import ingest_judge, ingest_publish, ingest_report, ingest_stream
from pipelines.ingest_plan import Shard, carried_fields, plan_shards, read_pairs
from pipelines.ingest_read import rejects_schema
from pipelines.ingest_scale import KeyDigest, check_key_digests
from pipelines.ingest_write import (
    IngestAccountingError,
    _remove_manifest,
    check_accounting,
    dataset_digest,
    latents_schema,
    model_identity,
)

EXPERIMENT = "ingest"
__all__ = ["IngestAccountingError", "check_accounting", "read_pairs", "run_ingest", "log_to_mlflow"]


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
    ensure_ray(cfg.ray_address, cfg.num_cpus)
    shards, input_schema = plan_shards(cfg.input_uri, cfg.download.rows_per_shard)
    carried = carried_fields(input_schema, cfg.url_col, cfg.caption_col, cfg.carry_columns)
    for predicate in cfg.filters.columns:
        if predicate.column not in carried.names:
            raise ValueError(
                f"filters.columns: the input has no column {predicate.column!r}; it has {carried.names}"
            )
    schema = latents_schema(cfg, models, carried)
    ledger = rejects_schema(carried)
    run_id = start_progress_run(cfg) if cfg.log_mlflow else None
    with _marks_run_failed(cfg, run_id):  # a run left "RUNNING" by a crash would read as alive
        settings = ingest_stream.pass_one_settings(cfg, models)
        markers = ingest_stream.stage_shards(shards, cfg, settings, carried, _progress_logger(cfg, run_id))
        judgement = ingest_judge.judge(markers, cfg)
        summaries, picked = ingest_publish.publish_all(markers, judgement, cfg, schema, ledger)
        _check_accounting(shards, markers, summaries)
        manifest = build_manifest(cfg, models, schema, markers, summaries, time.time() - started)
        cutoff = judgement.cutoff if np.isfinite(judgement.cutoff) else None
        manifest = manifest.model_copy(update={"clip_cutoff": cutoff})
        write_manifest(manifest, output)
    if cfg.log_mlflow:
        samples = ingest_report.reject_samples(picked)
        log_to_mlflow(cfg, manifest, histogram=judgement.histogram, samples=samples, run_id=run_id)
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
        step = int(figures["shards_done"])
        for key, value in figures.items():
            client.log_metric(run_id, key, value, step=step)

    return log


def _check_accounting(shards: list[Shard], markers: list[dict], summaries: list[dict]) -> None:
    """The invariant from per-shard numbers: every planned row read once, and the input keys' digest
    equal to the digest of the keys in latents/ plus rejects/ (each shard checked its own already)."""
    planned = sum(shard.rows for shard in shards)
    expected = sum((KeyDigest(*m["digest"]) for m in markers), KeyDigest())
    if expected.count != planned:
        raise IngestAccountingError(f"ingest read {expected.count} rows of the {planned} the plan holds")
    check_key_digests(expected, [KeyDigest(*s["digest_out"]) for s in summaries], explain=lambda: None)


def build_manifest(
    cfg: IngestConfig,
    models: dict[str, dict[str, str]],
    schema: pa.Schema,
    markers: list[dict],
    summaries: list[dict],
    seconds: float,
) -> Manifest:
    """The manifest from the shards' numbers (no row is read here)."""
    metadata = schema.metadata

    def shape(key: bytes) -> list[int] | None:
        return json.loads(metadata[key]) if key in metadata else None

    num_input = sum(m["input"] for m in markers)
    accepted = sum(s["accepted"] for s in summaries)
    holdout = sum(s["holdout"] for s in summaries)
    by_stage: Counter[str] = sum((Counter(s["by_stage"]) for s in summaries), Counter())
    by_reason: Counter[str] = sum((Counter(s["by_reason"]) for s in summaries), Counter())
    content = sum(int(s["content_sum"], 16) for s in summaries) % (1 << 256)
    return Manifest(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        input=cfg.input_uri,
        output=cfg.output_uri,
        counts=Counts(
            input=num_input,
            accepted=accepted,
            rejected=sum(s["rejected"] for s in summaries),
            rejected_by_stage=dict(sorted(by_stage.items())),
            rejected_by_reason=dict(sorted(by_reason.items())),
        ),
        funnel=ingest_report.funnel(num_input, dict(by_reason)),
        dataset_digest=dataset_digest(content),
        models=Models.model_validate(models),
        scaling_factor=json.loads(metadata[META_SCALING_FACTOR]),
        latent_shape=json.loads(metadata[META_LATENT_SHAPE]),
        text_embedding_shape=shape(META_TEXT_EMBEDDING_SHAPE),
        input_ids_shape=shape(META_INPUT_IDS_SHAPE),
        carried_columns=json.loads(metadata[META_CARRIED_COLUMNS]),
        split=HoldoutInfo(fraction=cfg.holdout_fraction, train=accepted - holdout, holdout=holdout),
        shards=len(markers),
        seconds=round(seconds, 3),
        rows_per_second=round(num_input / seconds, 3) if seconds > 0 else None,
        config=cfg.to_dict(),
    )


def log_to_mlflow(
    cfg: IngestConfig,
    manifest: Manifest,
    histogram: np.ndarray | None = None,
    samples: dict[str, list[tuple[str, np.ndarray]]] | None = None,
    run_id: str | None = None,
) -> str:
    """One MLflow run in experiment "ingest": config as params, counts as metrics, the manifest as
    an artifact and as the run's input dataset, and the funnel as pictures: ``funnel.png``,
    ``clip_scores.png`` (with the cut marked) and ``rejects/<reason>.png``. Returns the run id.

    ``histogram``: the CLIP scores per bin (pass 2); ``samples``: (caption, thumbnail) per reason
    (`ingest_report.reject_samples`); ``run_id``: the run `start_progress_run` opened for the live
    progress metrics."""
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
        if histogram is not None and histogram.sum():
            how = cfg.filters.clip_mode if cfg.filters.clip_mode == "threshold" else "top fraction"
            figure = ingest_report.score_histogram(histogram, manifest.clip_cutoff, how)
            mlflow.log_figure(figure, "clip_scores.png")
        for reason, items in sorted((samples or {}).items()):
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
