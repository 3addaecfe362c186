"""Pass 3 of the ingest job: per shard, the staged rows -> ``latents/`` and ``rejects/`` (a Ray task each).

A shard's task reads its row file and model parts (no pixels), its verdicts from pass 2 and the
CLIP cut, and writes ``latents/part-SSSSS-FFF.parquet`` (``rows_per_file`` rows each, at least one
file, with the latents schema and its metadata) and ``rejects/part-SSSSS.parquet``: temp name then
rename (local), the final name once (S3). It checks the shard's accounting (`KeyDigest` of the
input keys = latents' + rejects') and writes ``_staging/published/shard-NNNNN.json`` with its counts,
digests and reject samples. A re-run skips shards whose published marker matches, and deletes
output files that no marker accounts for.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from dataclasses import astuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ldm import storage
from ldm.config.ingest import IngestConfig
from ldm.contract import (
    COL_CAPTION,
    COL_CLIP_SCORE,
    COL_KEY,
    COL_SHA256,
    COL_SPLIT,
    LATENTS_DIR,
    REJ_DETAIL,
    REJ_REASON,
    REJ_STAGE,
    REJECT_COLUMNS,
    REJECTS_DIR,
    holdout_split,
)
from pipelines import filters, ingest_report
from pipelines.ingest_files import read_json, staging, sweep, write_json, write_table
from pipelines.ingest_judge import Judgement
from pipelines.ingest_scale import KeyDigest, check_key_digests
from pipelines.ingest_stream import COL_THUMB
from pipelines.ingest_write import check_accounting
from pipelines.stages import COL_SHARD

_MASK256 = (1 << 256) - 1
VERDICT_STAGES = {
    filters.REASON_DUPLICATE: filters.STAGE_FILTER,
    filters.REASON_NEAR_DUPLICATE: filters.STAGE_SCORE,
}


def content_sum(keys: list[str], hashes: list[str]) -> int:
    """Sum mod 2^256 of sha256(key, content hash) over rows: parts add up to `dataset_digest`'s value."""
    total = 0
    for key, content in zip(keys, hashes, strict=True):
        total = (
            total + int.from_bytes(hashlib.sha256(f"{key}\t{content}".encode()).digest(), "big")
        ) & _MASK256
    return total


def latents_file(output_uri: str, shard: int, part: int) -> str:
    return storage.join(output_uri, LATENTS_DIR, f"part-{shard:05d}-{part:03d}.parquet")


def rejects_file(output_uri: str, shard: int) -> str:
    return storage.join(output_uri, REJECTS_DIR, f"part-{shard:05d}.parquet")


def _verdicts_of(shard: int, verdicts_uri: str | None) -> dict[str, tuple[str, str]]:
    if verdicts_uri is None:
        return {}
    fs, path = storage.filesystem(verdicts_uri)
    table = pq.read_table(path, filesystem=fs, filters=[(COL_SHARD, "=", shard)])
    return {
        k: (r, d)
        for k, r, d in zip(
            *(table.column(c).to_pylist() for c in (COL_KEY, REJ_REASON, REJ_DETAIL)), strict=True
        )
    }


def _judge_rows(rows: pa.Table, model: pa.Table, judgement: Judgement, verdicts: dict) -> pa.Table:
    """The row file with the pass-2 verdicts and the cut applied to the rows still in the running."""
    scores = dict(
        zip(model.column(COL_KEY).to_pylist(), model.column(COL_CLIP_SCORE).to_pylist(), strict=True)
    )
    stages, reasons, details = (rows.column(c).to_pylist() for c in (REJ_STAGE, REJ_REASON, REJ_DETAIL))
    for i, key in enumerate(rows.column(COL_KEY).to_pylist()):
        if reasons[i] != filters.ACCEPTED:
            continue
        score = scores[key]
        verdict = verdicts.get(key)
        if verdict is not None and verdict[0] == filters.REASON_DUPLICATE:
            stages[i], (reasons[i], details[i]) = filters.STAGE_FILTER, verdict
        elif score < judgement.cutoff:
            stages[i], reasons[i] = filters.STAGE_SCORE, filters.REASON_LOW_CLIP
            details[i] = f"clip score {score:.4f} < {judgement.cutoff:.4f} ({judgement.cutoff_detail})"
        elif verdict is not None:
            stages[i], (reasons[i], details[i]) = VERDICT_STAGES[verdict[0]], verdict
    for name, values in ((REJ_STAGE, stages), (REJ_REASON, reasons), (REJ_DETAIL, details)):
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return rows


def _latents_table(rows: pa.Table, model: pa.Table, schema: pa.Schema, holdout_fraction: float) -> pa.Table:
    keys = rows.column(COL_KEY).to_pylist()
    position = {k: i for i, k in enumerate(model.column(COL_KEY).to_pylist())}
    model = model.take(pa.array([position[k] for k in keys], pa.int64()))
    split = pa.array([holdout_split(k, holdout_fraction) for k in keys], pa.string())
    columns = [
        split if f.name == COL_SPLIT else (model if f.name in model.column_names else rows).column(f.name)
        for f in schema
    ]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)


def _samples(rejected: pa.Table, per_reason: int) -> dict[str, list[list[str]]]:
    """Up to ``per_reason`` (key, caption, thumbnail as base64) per sampled reason, lowest keys first."""
    samples: dict[str, list[list[str]]] = {}
    for reason in ingest_report.SAMPLED_REASONS:
        picked = rejected.filter(pc.equal(rejected.column(REJ_REASON), reason))
        picked = picked.filter(pc.is_valid(picked.column(COL_THUMB)))
        rows = sorted(
            zip(*(picked.column(c).to_pylist() for c in (COL_KEY, COL_CAPTION, COL_THUMB)), strict=True)
        )
        if rows[:per_reason]:
            samples[reason] = [[k, c, base64.b64encode(t).decode()] for k, c, t in rows[:per_reason]]
    return samples


def publish_shard(
    marker: dict, judgement: Judgement, cfg: IngestConfig, schema: pa.Schema, ledger: pa.Schema
) -> dict:
    """One shard's staged rows -> its latents/ and rejects/ files; returns (and records) its summary."""
    shard, output = int(marker["shard"]["index"]), cfg.output_uri
    fs, rows_path = storage.filesystem(staging(output, "rows", marker["rows_file"]))
    rows = pq.read_table(rows_path, filesystem=fs)
    parts = [
        pq.read_table(storage.filesystem(staging(output, "rows", n))[1], filesystem=fs)
        for n in marker["model_files"]
    ]
    model = pa.concat_tables(parts) if parts else None
    if model is not None:
        rows = _judge_rows(rows, model, judgement, _verdicts_of(shard, judgement.verdicts_uri))
    accepted_mask = pc.equal(rows.column(REJ_REASON), filters.ACCEPTED)
    accepted, rejected = rows.filter(accepted_mask), rows.filter(pc.invert(accepted_mask))
    latents = (
        _latents_table(accepted, model, schema, cfg.holdout_fraction)
        if model is not None
        else schema.empty_table()
    )
    ledger_rows = rejected.select(ledger.names).cast(ledger)
    keys = {
        "latents": latents.column(COL_KEY).to_pylist(),
        "rejects": ledger_rows.column(COL_KEY).to_pylist(),
    }

    def explain() -> None:  # only on a mismatch: read the shard's input keys and name the culprits
        from pipelines.ingest_plan import Shard, read_shard

        carried = pa.schema([f for f in ledger if f.name not in REJECT_COLUMNS])
        shard_rows = read_shard(Shard(**marker["shard"]), cfg.url_col, cfg.caption_col, carried)
        check_accounting(shard_rows.column(COL_KEY).to_pylist(), keys["latents"], keys["rejects"])

    expected = KeyDigest(*marker["digest"])
    check_key_digests(expected, [KeyDigest.of(keys["latents"]), KeyDigest.of(keys["rejects"])], explain)
    written = []
    for part, start in enumerate(range(0, max(latents.num_rows, 1), cfg.rows_per_file)):
        written.append(latents_file(output, shard, part))
        write_table(latents.slice(start, cfg.rows_per_file), written[-1])
    written.append(rejects_file(output, shard))
    write_table(ledger_rows, written[-1])
    summary = {
        "accepted": latents.num_rows,
        "rejected": ledger_rows.num_rows,
        "holdout": latents.filter(pc.equal(latents.column(COL_SPLIT), "holdout")).num_rows,
        "by_stage": dict(Counter(ledger_rows.column(REJ_STAGE).to_pylist())),
        "by_reason": dict(Counter(ledger_rows.column(REJ_REASON).to_pylist())),
        "digest_out": list(astuple(KeyDigest.of(keys["latents"]) + KeyDigest.of(keys["rejects"]))),
        "content_sum": hex(content_sum(keys["latents"], latents.column(COL_SHA256).to_pylist())),
        "files": [storage.filesystem(uri)[1].rsplit("/", 1)[1] for uri in written],
        "samples": _samples(rejected, cfg.rejected_samples_per_reason),
    }
    write_json(
        staging(output, "published", f"shard-{shard:05d}.json"),
        {"fingerprint": publish_fingerprint(marker, judgement, cfg), **summary},
    )
    return summary


def publish_fingerprint(marker: dict, judgement: Judgement, cfg: IngestConfig) -> str:
    """Identifies a shard's publication: its staged rows, the cut, the verdicts, the output settings."""
    settings = [marker["fingerprint"], marker["model_files"], judgement.cutoff, judgement.duplicates,
                judgement.near_duplicates, cfg.holdout_fraction, cfg.rows_per_file, cfg.rejected_samples_per_reason]  # fmt: skip
    return hashlib.sha256(repr(settings).encode()).hexdigest()


def publish_all(
    markers: list[dict], judgement: Judgement, cfg: IngestConfig, schema: pa.Schema, ledger: pa.Schema
) -> tuple[list[dict], dict[str, list]]:
    """Pass 3 over every shard not published yet (Ray tasks); returns every shard's summary, in
    order, and the reject samples (reason -> lowest keys' [key, caption, thumbnail as base64])."""
    import ray

    output = cfg.output_uri
    summaries: dict[int, dict] = {}
    for marker in markers:
        published = read_json(staging(output, "published", f"shard-{marker['shard']['index']:05d}.json"))
        if published is not None and published["fingerprint"] == publish_fingerprint(marker, judgement, cfg):
            summaries[marker["shard"]["index"]] = published
    keep = {name for s in summaries.values() for name in s["files"]}
    for folder in (LATENTS_DIR, REJECTS_DIR):
        storage.filesystem(storage.join(output, folder))[0].create_dir(
            storage.filesystem(storage.join(output, folder))[1], recursive=True
        )
        sweep(storage.join(output, folder), keep)
    sweep(staging(output, "published"), {f"shard-{i:05d}.json" for i in summaries})
    options: dict = {
        "num_cpus": 0.5,
        "max_retries": cfg.download.max_shard_attempts - 1,
        "retry_exceptions": True,
        **storage.s3_ray_options(),
    }
    task = ray.remote(publish_shard).options(**options)
    todo = [m for m in markers if m["shard"]["index"] not in summaries]
    samples: dict[str, list] = {}
    for index in summaries:
        summaries[index] = _keep_samples(summaries[index], samples, cfg.rejected_samples_per_reason)
    pending: dict = {}
    for marker in todo:
        if len(pending) >= 2 * cfg.download.shard_concurrency:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            summaries[index] = _keep_samples(ray.get(done[0]), samples, cfg.rejected_samples_per_reason)
        pending[task.remote(marker, judgement, cfg, schema, ledger)] = marker["shard"]["index"]
    for ref, index in pending.items():
        summaries[index] = _keep_samples(ray.get(ref), samples, cfg.rejected_samples_per_reason)
    if not markers:  # no input row: still one (empty) file each, carrying the schemas
        write_table(schema.empty_table(), latents_file(output, 0, 0))
        write_table(ledger.empty_table(), rejects_file(output, 0))
    return [summaries[m["shard"]["index"]] for m in markers], samples


def _keep_samples(summary: dict, samples: dict[str, list], per_reason: int) -> dict:
    """Merge a shard's reject samples into ``samples`` (the lowest ``per_reason`` keys per reason)
    and return the summary without them: the driver keeps the samples once, not per shard."""
    for reason, rows in summary.get("samples", {}).items():
        samples[reason] = sorted([*samples.get(reason, []), *rows])[:per_reason]
    return {key: value for key, value in summary.items() if key != "samples"}
