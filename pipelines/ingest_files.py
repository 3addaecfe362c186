"""Files of the ingest job's passes: the staging folder, whole-file writes, markers, sweeping.

Every file is written so that it appears whole: a temp name then a rename on a local disk, one PUT
on S3 (an S3 object appears whole by itself). Markers are small JSON files.
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ldm import storage

STAGING_DIR = "_staging"


def staging(output_uri: str, *parts: str) -> str:
    return storage.join(output_uri, STAGING_DIR, *parts)


def write_table(table: pa.Table, uri: str) -> None:
    """Write a Parquet file so that it appears whole: temp name then rename (local), one PUT (S3)."""
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if storage.is_remote(uri):
        pq.write_table(table, path, filesystem=fs)
        return
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, temporary, filesystem=fs)
    fs.move(temporary, path)


def write_json(uri: str, value: dict) -> None:
    """A marker: temp name then rename (local), one PUT (S3)."""
    data = json.dumps(value, sort_keys=True).encode()
    if storage.is_remote(uri):
        storage.write_bytes(uri, data)
        return
    fs, path = storage.filesystem(uri)
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(temporary, data)
    fs.move(temporary, path)


def read_json(uri: str) -> dict | None:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def sweep(folder_uri: str, keep: set[str]) -> None:
    """Delete the files of ``folder_uri`` whose names are not in ``keep`` (left by a killed run)."""
    fs, path = storage.filesystem(folder_uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.type == pafs.FileType.File and info.base_name not in keep:
            fs.delete_file(info.path)
