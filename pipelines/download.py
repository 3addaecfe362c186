"""The download step: fetch one shard's guarded URLs with img2dataset's downloader (`fetch_shard`).

The ingest plan (`pipelines.ingest_stream`) calls it once per input shard inside a Ray Data task,
not img2dataset's own Ray distributor: its distributor ignores ``processes_count``, never retries a
failed shard and silently does nothing when ray is not importable (docs/DATA.md, "img2dataset
facts"). A task per shard gives us Ray's retries (``retry_exceptions``) and a bounded number of
shards in flight; the shard's completion marker is the plan's (`pipelines.ingest_stream`).

Inside a task img2dataset's downloader runs in-process (see `_run_img2dataset` for why), with every
redirect checked by the URL guard too, and with the Parquet writer, which keeps *every* input row with its
``status`` and ``error_message`` (the webdataset writer keeps only successes, which would break
the "every row accounted for" invariant). ``disable_all_reencoding`` keeps the original bytes: the
size and aspect filters must see the original image (img2dataset's own ``min_image_size`` and
``max_aspect_ratio`` act after its resize, measured), and the duplicate filter hashes the original
bytes. The bytes stay in the worker's memory: only the filters' verdicts and the model outputs are
written (no image bytes reach the output or the staging folder).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ldm.config.ingest import DownloadConfig
from ldm.contract import COL_CAPTION, COL_KEY, COL_SHA256, COL_URL
from pipelines import urlguard

# img2dataset reserves "key" for its own row numbering, so our key travels under another name.
CARRIED_KEY = "ldm_key"
COL_STATUS = "status"
COL_ERROR = "error_message"
COL_IMAGE_BYTES = "image_bytes"
REDIRECT_BLOCKED = "redirect blocked by the URL guard"  # starts the error message of such a row

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


@contextlib.contextmanager
def _temporary_files_in(folder: Path):
    """Point $TMPDIR (for spawned children) and this process's `tempfile` at ``folder`` for a while.

    img2dataset imports wandb, which leaves empty ``tmp*wandb-*`` folders in the temporary folder of
    every process that imports it; inside this block they land in our scratch folder.
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


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, with the URL guard applied to every hop.

    The guard checks the URLs of the input before any download; without this a public host could
    answer ``302 Location: http://169.254.169.254/`` and img2dataset (urllib) would follow it.
    """

    def __init__(self, allow_hosts: frozenset[str]):
        self.allow_hosts = allow_hosts

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        verdict = urlguard.check_url(newurl, self.allow_hosts)
        if not verdict.allowed:
            raise urllib.error.HTTPError(newurl, code, f"{REDIRECT_BLOCKED}: {verdict.detail}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@contextlib.contextmanager
def _guarded_urlopen(allow_hosts: frozenset[str]):
    """Install an opener with `_GuardedRedirects` as urllib's global one (img2dataset calls
    ``urllib.request.urlopen``) for the duration of one shard; the previous opener comes back after."""
    # urllib keeps the installed opener in a module global that its stub does not declare
    previous = urllib.request._opener  # type: ignore[attr-defined]  # noqa: SLF001
    urllib.request.install_opener(urllib.request.build_opener(_GuardedRedirects(allow_hosts)))
    try:
        yield
    finally:
        urllib.request.install_opener(previous)


def _run_img2dataset(
    rows: pa.Table, settings: DownloadConfig, work: Path, allow_hosts: frozenset[str] = frozenset()
) -> pa.Table:
    """img2dataset's downloader on one shard, in this process; returns its Parquet output.

    Why not ``img2dataset.download``: every call spawns two fresh interpreters (its logger process
    and a multiprocessing pool) that import img2dataset again, seconds per shard, while
    its "ray" distributor would start nested Ray tasks that wait forever when the shard tasks hold
    every CPU. So this builds the same Reader -> Resizer -> Downloader -> Parquet writer chain that
    ``img2dataset.download`` builds (img2dataset 1.47's ``main.py``) and runs the one shard in this
    Ray worker, which keeps img2dataset imported between shards.
    """
    url_list = work / "urls.parquet"
    pq.write_table(rows.select([COL_URL, COL_KEY]).rename_columns([COL_URL, CARRIED_KEY]), url_list)
    output = work / "out"
    output.mkdir()
    (work / "_tmp").mkdir()  # the Reader writes its shard files here (img2dataset.download makes it)
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # its import phones home otherwise
    with _temporary_files_in(work):
        from img2dataset.downloader import Downloader
        from img2dataset.reader import Reader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import ParquetSampleWriter

        per_shard = max(rows.num_rows, 1)
        reader = Reader(
            str(url_list),
            "parquet",
            COL_URL,
            None,  # caption_col: captions stay with us, keyed, not in img2dataset's output
            None,  # verify_hash_col
            None,  # verify_hash_type
            [CARRIED_KEY],
            per_shard,
            set(),  # done shards
            str(work / "_tmp"),
            0,  # start shard id
        )
        # no resizing, no re-encoding: the filters judge (and the duplicate check hashes) the original
        resizer = Resizer(
            image_size=256, resize_mode="no", resize_only_if_bigger=False, disable_all_reencoding=True
        )
        directives = list(settings.disallowed_header_directives)
        downloader = Downloader(
            sample_writer_class=ParquetSampleWriter,
            resizer=resizer,
            thread_count=settings.thread_count,
            save_caption=False,
            extract_exif=False,
            output_folder=str(output),
            column_list=reader.column_list,
            timeout=settings.timeout_s,
            number_sample_per_shard=per_shard,
            oom_shard_count=5,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format="jpg",
            retries=settings.retries,
            user_agent_token=settings.user_agent_token,
            # as img2dataset.download passes them: a lower-cased set, None when the check is off
            disallowed_header_directives={d.strip().lower() for d in directives} if directives else None,
        )
        with _guarded_urlopen(allow_hosts):
            for shard in reader:
                downloader.download_shard(shard)  # raises on failure: Ray retries the shard task
    files = sorted(output.glob("*.parquet"))
    if not files:
        raise RuntimeError(f"img2dataset wrote no Parquet output in {output}")
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def fetch_shard(
    rows: pa.Table, settings: DownloadConfig, allow_hosts: frozenset[str] = frozenset()
) -> pa.Table:
    """Download one shard of (key, url, caption, carried...) rows; returns them in the same order
    with `SHARD_SCHEMA`'s columns (status, error, sha256, image bytes) and the carried columns.

    Raises when img2dataset did not account for every row, so that Ray retries the shard.
    """
    carried = [name for name in rows.column_names if name not in SHARD_SCHEMA.names]
    schema = pa.schema([*SHARD_SCHEMA, *rows.select(carried).schema])
    if rows.num_rows == 0:
        return schema.empty_table()
    with tempfile.TemporaryDirectory(prefix="ldm-download-") as tmp:
        result = _run_img2dataset(rows, settings, Path(tmp), allow_hosts)
    result = result.select([CARRIED_KEY, COL_STATUS, COL_ERROR, "sha256", "jpg"]).rename_columns(
        [COL_KEY, COL_STATUS, COL_ERROR, COL_SHA256, COL_IMAGE_BYTES]
    )
    keys = rows.column(COL_KEY).to_pylist()
    got = result.column(COL_KEY).to_pylist()
    if len(got) != len(keys) or set(got) != set(keys):
        raise RuntimeError(f"img2dataset returned {len(got)} rows for {len(keys)}")
    # align img2dataset's rows to ours by key (a take, not a join: carried input columns may be of
    # types Arrow's hash join does not support)
    position = {key: i for i, key in enumerate(got)}
    result = result.take(pa.array([position[key] for key in keys], pa.int64()))
    columns = {name: rows.column(name) for name in (COL_KEY, COL_URL, COL_CAPTION, *carried)}
    columns |= {name: result.column(name) for name in SHARD_SCHEMA.names if name not in columns}
    return pa.table([columns[name] for name in schema.names], names=schema.names).cast(schema)
