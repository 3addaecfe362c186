"""The ingest input as shards: list the files, cut them into shards, read one shard.

The driver never reads the input's rows. It lists the input files (a file, a folder or an ``s3://``
prefix of Parquet, CSV or TSV files), learns each file's row count (a Parquet file's footer; a CSV
is counted by a Ray task, since a CSV has no footer) and its schema, and cuts every file into shards
of at most ``rows_per_shard`` rows. A shard is (file, first row, rows): a worker reads it with
`read_shard`. Keys are `pipelines.filters.row_key` of the row's global index (files in sorted
order, rows in file order), its URL and its caption: the same input gives the same shards and the
same keys on every run, whatever runs where (`read_pairs` reads the whole input the same way, for
tests and small tools).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ldm import storage
from ldm.contract import COL_CAPTION, COL_KEY, COL_URL
from pipelines import filters
from pipelines.ingest_read import CARRIED_PREFIX, RESERVED_COLUMNS

TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".csv.gz", ".tsv.gz")


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, start + rows)`` of ``file``; ``offset``: the global index of its first row."""

    index: int
    file: str  # a URI (local path or s3://)
    start: int
    rows: int
    offset: int
    file_version: str  # size and modification time: an edited file makes new shards

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_delimited(path: str) -> bool:
    name = path.lower().removesuffix(".gz")
    return name.endswith(".csv") or name.endswith(".tsv")


def list_input_files(uri: str) -> list[tuple[str, str]]:
    """(URI, version) of every input file under ``uri`` (itself when it is a file), sorted by path."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        selector = pafs.FileSelector(path, recursive=True)
        infos = [
            i
            for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File
            and i.path.lower().endswith(TABLE_SUFFIXES)
            and not i.base_name.startswith((".", "_"))
        ]
    prefix = "s3://" if storage.is_remote(uri) else ""
    files = sorted((prefix + i.path, f"{i.size}:{i.mtime_ns or 0}") for i in infos)
    if not files:
        raise FileNotFoundError(f"input {uri} holds no Parquet, CSV or TSV file")
    return files


def _read_delimited(uri: str) -> pa.Table:
    fs, path = storage.filesystem(uri)
    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
    with fs.open_input_stream(path, compression="detect") as stream:
        return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))


def _file_schema(uri: str) -> pa.Schema:
    fs, path = storage.filesystem(uri)
    if not _is_delimited(path):
        return pq.read_schema(path, filesystem=fs)
    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
    with fs.open_input_stream(path, compression="detect") as stream:  # the first block only
        reader = pacsv.open_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        return reader.schema


def _count_rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    if not _is_delimited(path):
        return pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return _read_delimited(uri).num_rows


def _row_counts(files: list[str]) -> list[int]:
    """Rows per file: Parquet footers here; CSV/TSV files (no footer) are counted by Ray tasks when
    Ray runs (the job), else here (`read_pairs`)."""
    import ray

    counts: dict[str, int] = {f: _count_rows(f) for f in files if not _is_delimited(f)}
    delimited = [f for f in files if _is_delimited(f)]
    if delimited and not ray.is_initialized():
        counts |= {f: _count_rows(f) for f in delimited}
    elif delimited:
        task = ray.remote(_count_rows).options(**storage.s3_ray_options())
        counts |= dict(zip(delimited, ray.get([task.remote(f) for f in delimited]), strict=True))
    return [counts[f] for f in files]


def carried_fields(schema: pa.Schema, url_col: str, caption_col: str, carry: bool = True) -> pa.Schema:
    """The input columns carried through (renamed with `CARRIED_PREFIX` when they clash with ours)."""
    missing = [c for c in (url_col, caption_col) if c not in schema.names]
    if missing:
        raise ValueError(f"missing column(s) {missing}; the input has {schema.names}")
    if not carry:
        return pa.schema([])
    fields = [f for f in schema if f.name not in (url_col, caption_col)]
    return pa.schema(
        [f.with_name(CARRIED_PREFIX + f.name) if f.name in RESERVED_COLUMNS else f for f in fields]
    )


def plan_shards(uri: str, rows_per_shard: int) -> tuple[list[Shard], pa.Schema]:
    """The input's shards and the schema of its first file (the columns every file must have)."""
    listed = list_input_files(uri)
    files = [f for f, _ in listed]
    schema = _file_schema(files[0])
    shards: list[Shard] = []
    offset = 0
    for (file, version), rows in zip(listed, _row_counts(files), strict=True):
        for start in range(0, rows, rows_per_shard):
            count = min(rows_per_shard, rows - start)
            shards.append(Shard(len(shards), file, start, count, offset + start, version))
        offset += rows
    return shards, schema


def shard_fingerprint(shard: Shard, settings: dict) -> str:
    """Identifies a shard's work: where its rows come from and the settings that shape its output."""
    payload = json.dumps({"shard": shard.to_dict(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _as_text(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """A column as strings; nulls become "". Bytes that are not UTF-8 (pyarrow reads such a CSV
    column as binary) are decoded with U+FFFD for the bad bytes: the row stays, with a visible scar."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return ["" if v is None else v.decode("utf-8", errors="replace") for v in column.to_pylist()]
    return ["" if v is None else str(v) for v in column.to_pylist()]


def _read_rows(shard: Shard) -> pa.Table:
    fs, path = storage.filesystem(shard.file)
    if _is_delimited(path):
        return _read_delimited(shard.file).slice(shard.start, shard.rows)
    parquet = pq.ParquetFile(path, filesystem=fs)
    groups, first, seen = [], None, 0
    for group in range(parquet.metadata.num_row_groups):  # only the row groups the shard overlaps
        size = parquet.metadata.row_group(group).num_rows
        if seen + size > shard.start and seen < shard.start + shard.rows:
            groups.append(group)
            first = seen if first is None else first
        seen += size
    if not groups:
        return parquet.schema_arrow.empty_table()
    return parquet.read_row_groups(groups).slice(shard.start - (first or 0), shard.rows)


def read_shard(shard: Shard, url_col: str, caption_col: str, carried: pa.Schema) -> pa.Table:
    """The shard's rows as (key, url, caption) strings plus the ``carried`` columns (cast to it)."""
    table = _read_rows(shard)
    urls, captions = _as_text(table.column(url_col)), _as_text(table.column(caption_col))
    keys = [
        filters.row_key(shard.offset + i, u, c) for i, (u, c) in enumerate(zip(urls, captions, strict=True))
    ]
    columns = {
        COL_KEY: pa.array(keys, pa.string()),
        COL_URL: pa.array(urls, pa.string()),
        COL_CAPTION: pa.array(captions, pa.string()),
    }
    for field in carried:
        source = (
            field.name.removeprefix(CARRIED_PREFIX) if field.name not in table.column_names else field.name
        )
        columns[field.name] = table.column(source).cast(field.type)
    return pa.table(columns)


def read_pairs(uri: str, url_col: str = "url", caption_col: str = "caption", carry: bool = True) -> pa.Table:
    """The whole input, keyed as the job keys it (reads every row here: for tests and small inputs)."""
    shards, schema = plan_shards(uri, rows_per_shard=1 << 30)
    carried = carried_fields(schema, url_col, caption_col, carry)
    parts = [read_shard(s, url_col, caption_col, carried) for s in shards]
    empty = pa.schema([(COL_KEY, pa.string()), (COL_URL, pa.string()), (COL_CAPTION, pa.string()), *carried])
    return pa.concat_tables([empty.empty_table(), *parts])
