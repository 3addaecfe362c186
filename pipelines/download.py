"""The download stage: fetch every guarded URL with img2dataset, one Ray task per URL shard.

Why Ray tasks calling ``img2dataset.download`` per shard, and not img2dataset's own Ray distributor:
its distributor ignores ``processes_count``, never retries a failed shard and silently does nothing
when ray is not importable (TRAPS.md). A task per shard gives us Ray's retries
(``retry_exceptions``), a bounded number of shards in flight, and a completion marker per shard so
that a re-run reuses finished shards. Tasks (not a Ray Data ``map_batches``) because a shard is a
unit of side effects (a file and a marker), not a transformation of rows.

Inside a task img2dataset runs with the Parquet writer, which keeps *every* input row with its
``status`` and ``error_message`` (the webdataset writer keeps only successes, which would break
the "every row accounted for" invariant). ``disable_all_reencoding`` keeps the original bytes: the
size and aspect filters must see the original image (img2dataset's own ``min_image_size`` and
``max_aspect_ratio`` act after its resize, TRAPS.md), and the duplicate filter hashes the original
bytes. The shard result (key, url, caption, status, error_message, sha256, image bytes) is written
to ``<output>/_staging/download/shard-NNNNN.parquet`` through pyarrow's filesystems, so it works for
``s3://`` outputs too (img2dataset itself would need s3fs for that).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ldm import storage
from ldm.config.ingest import DownloadConfig
from ldm.contract import COL_CAPTION, COL_KEY, COL_SHA256, COL_URL

STAGING_DIR = "_staging"
# img2dataset reserves "key" for its own row numbering, so our key travels under another name.
CARRIED_KEY = "ldm_key"
COL_STATUS = "status"
COL_ERROR = "error_message"
COL_IMAGE_BYTES = "image_bytes"

SHARD_SCHEMA = pa.schema(
    [
        (COL_KEY, pa.string()),
        (COL_URL, pa.string()),
        (COL_CAPTION, pa.string()),
        (COL_STATUS, pa.string()),
        (COL_ERROR, pa.string()),
        (COL_SHA256, pa.string()),
        (COL_IMAGE_BYTES, pa.binary()),
    ]
)


def staging_dir(output_uri: str) -> str:
    return storage.join(output_uri, STAGING_DIR, "download")


def shard_fingerprint(rows: pa.Table, settings: DownloadConfig) -> str:
    """Identifies a shard's work: its keys and the download settings. A marker with another one is stale."""
    digest = hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode())
    for key in rows.column(COL_KEY).to_pylist():
        digest.update(key.encode() + b"\n")
    return digest.hexdigest()


@contextlib.contextmanager
def _temporary_files_in(folder: Path):
    """Point $TMPDIR (for spawned children) and this process's `tempfile` at ``folder`` for a while.

    img2dataset imports wandb, which leaves empty ``tmp*wandb-*`` folders in the temporary folder of
    every process that imports it (TRAPS.md); inside this block they land in our scratch folder.
    """
    previous_env, previous_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous_tempdir
        if previous_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous_env


def _run_img2dataset(rows: pa.Table, settings: DownloadConfig, work: Path) -> pa.Table:
    """img2dataset on one shard in ``work``; returns its Parquet output (one row per input row)."""
    url_list = work / "urls.parquet"
    pq.write_table(rows.select([COL_URL, COL_KEY]).rename_columns([COL_URL, CARRIED_KEY]), url_list)
    output = work / "out"
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # its import phones home otherwise (TRAPS.md)
    with _temporary_files_in(work):
        import img2dataset

        img2dataset.download(
            url_list=str(url_list),
            input_format="parquet",
            url_col=COL_URL,
            save_additional_columns=[CARRIED_KEY],
            output_format="parquet",
            output_folder=str(output),
            number_sample_per_shard=max(rows.num_rows, 1),
            processes_count=1,
            thread_count=settings.thread_count,
            timeout=settings.timeout_s,
            retries=settings.retries,
            disable_all_reencoding=True,
            compute_hash="sha256",
            extract_exif=False,
            enable_wandb=False,
            distributor="multiprocessing",
        )
    files = sorted(output.glob("*.parquet"))
    if not files:
        raise RuntimeError(f"img2dataset wrote no Parquet output in {output}")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def download_shard(rows: pa.Table, shard_uri: str, settings: DownloadConfig) -> str:
    """Download one shard of (key, url, caption) rows into ``shard_uri``, unless a marker says it is done.

    Raises when img2dataset did not account for every row, so that Ray retries the shard.
    """
    marker_uri = shard_uri + ".done"
    fingerprint = shard_fingerprint(rows, settings)
    if storage.exists(marker_uri) and storage.read_bytes(marker_uri).decode() == fingerprint:
        return shard_uri
    with tempfile.TemporaryDirectory(prefix="ldm-download-") as tmp:
        result = _run_img2dataset(rows, settings, Path(tmp))
    result = result.select([CARRIED_KEY, COL_STATUS, COL_ERROR, "sha256", "jpg"]).rename_columns(
        [COL_KEY, COL_STATUS, COL_ERROR, COL_SHA256, COL_IMAGE_BYTES]
    )
    expected = set(rows.column(COL_KEY).to_pylist())
    got = result.column(COL_KEY).to_pylist()
    if len(got) != len(expected) or set(got) != expected:
        raise RuntimeError(f"img2dataset returned {len(got)} rows for {len(expected)} in {shard_uri}")
    joined = rows.select([COL_KEY, COL_URL, COL_CAPTION]).join(result, COL_KEY).select(SHARD_SCHEMA.names)
    table = joined.cast(SHARD_SCHEMA)
    fs, path = storage.filesystem(shard_uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)
    storage.write_bytes(marker_uri, fingerprint.encode())  # last: the shard counts only once complete
    return shard_uri


def download_all(rows: pa.Table, output_uri: str, settings: DownloadConfig) -> list[str]:
    """Split ``rows`` into shards, download them as Ray tasks; returns the shard files' URIs.

    Shards are cut in input order, so a re-run of the same input finds the same shards and reuses
    those whose marker matches. Shard files of an earlier, larger input are not read: only the URIs
    returned here are.
    """
    import ray

    task = ray.remote(download_shard).options(
        num_cpus=1, max_retries=settings.max_shard_attempts - 1, retry_exceptions=True
    )
    staging = staging_dir(output_uri)
    pending: list = []
    shard_uris: list[str] = []
    for index, start in enumerate(range(0, rows.num_rows, settings.rows_per_shard)):
        shard = rows.slice(start, settings.rows_per_shard)
        shard_uris.append(storage.join(staging, f"shard-{index:05d}.parquet"))
        if len(pending) >= settings.shard_concurrency:  # bound the shards in flight
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        pending.append(task.remote(shard, shard_uris[-1], settings))
    ray.get(pending)
    return shard_uris
