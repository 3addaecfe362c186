"""The checks that need no download (URL guard, caption, column predicates) and the ledger's rows.

The input (`pipelines.ingest_plan` reads it, shard by shard) has a URL and a caption column
(``url_col``/``caption_col``: LAION's are ``URL`` and ``TEXT``). Every other input column is
carried through to latents/ and rejects/ unchanged (img2dataset's ``save_additional_columns``); one
whose name clashes with a column of ours is carried as ``input_<name>``.

Masks are built with ``type=pa.bool_()``: ``pa.array([])`` has type null, and filtering a table with
it raises ``ArrowNotImplementedError`` (an empty input, or a stage that rejects nothing or
everything, must still give a complete ledger).
"""

from __future__ import annotations

import math

import pyarrow as pa

from ldm.config.ingest import ColumnPredicate, IngestConfig
from ldm.contract import (
    COL_CAPTION,
    COL_CLIP_SCORE,
    COL_HEIGHT,
    COL_INPUT_IDS,
    COL_KEY,
    COL_LATENT,
    COL_SHA256,
    COL_SPLIT,
    COL_TEXT_EMBEDDING,
    COL_URL,
    COL_WIDTH,
    REJ_DETAIL,
    REJ_REASON,
    REJ_STAGE,
    REJECT_COLUMNS,
)
from pipelines import download, filters, urlguard

CARRIED_PREFIX = "input_"
# names the job itself uses somewhere between the input and the outputs: a carried column never takes one
RESERVED_COLUMNS = frozenset(
    {
        COL_KEY, COL_URL, COL_CAPTION, COL_CLIP_SCORE, COL_WIDTH, COL_HEIGHT, COL_SHA256, COL_LATENT,
        COL_TEXT_EMBEDDING, COL_INPUT_IDS, COL_SPLIT, *REJECT_COLUMNS, download.COL_STATUS,
        download.COL_ERROR, download.COL_IMAGE_BYTES, download.CARRIED_KEY, filters.COL_IMAGE,
        filters.COL_IMAGE_EMBEDDING,
    }
)  # fmt: skip
REJECTS_SCHEMA = pa.schema([(name, pa.string()) for name in REJECT_COLUMNS])


def carried_columns(rows: pa.Table) -> list[str]:
    """The carried input columns of a table made by `pipelines.ingest_plan.read_shard`."""
    return [name for name in rows.column_names if name not in (COL_KEY, COL_URL, COL_CAPTION)]


def rejects_schema(carried: pa.Schema | None = None) -> pa.Schema:
    """The ledger's schema: `REJECT_COLUMNS` as strings, then the carried input columns."""
    return pa.schema([*REJECTS_SCHEMA, *(carried or [])])


def _mask(values: list[bool]) -> pa.Array:
    return pa.array(values, type=pa.bool_())  # typed: an empty list would be of type null


def reject_table(
    rows: pa.Table, mask: list[bool], stage: str, reasons: list[str], details: list[str]
) -> pa.Table:
    """The ledger rows (with carried columns) of the rows of ``rows`` where ``mask`` is set."""
    picked = rows.filter(_mask(mask))
    verdicts = {
        REJ_STAGE: pa.array([stage] * picked.num_rows, pa.string()),
        REJ_REASON: pa.array([r for r, m in zip(reasons, mask, strict=True) if m], pa.string()),
        REJ_DETAIL: pa.array([d for d, m in zip(details, mask, strict=True) if m], pa.string()),
    }
    carried = carried_columns(rows)
    schema = rejects_schema(rows.select(carried).schema)
    columns = [picked.column(n) if n in picked.column_names else verdicts[n] for n in schema.names]
    return pa.Table.from_arrays(columns, schema=schema)


def column_problem(value: object, predicate: ColumnPredicate) -> str | None:
    """Why ``value`` fails ``predicate`` (a ``detail`` naming the column and the value), or None."""
    name = predicate.column
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return f"{name}={value!r}: not a number"
    if predicate.min is not None and value < predicate.min:
        return f"{name}={value} < min {predicate.min}"
    if predicate.max is not None and value > predicate.max:
        return f"{name}={value} > max {predicate.max}"
    return None


def _split(rows: pa.Table, problems: list[str | None], stage: str, reason: str) -> tuple[pa.Table, pa.Table]:
    failed = [p is not None for p in problems]
    rejects = reject_table(rows, failed, stage, [reason] * len(failed), [p or "" for p in problems])
    return rows.filter(_mask([not f for f in failed])), rejects


def check_before_download(rows: pa.Table, cfg: IngestConfig) -> tuple[pa.Table, list[pa.Table]]:
    """(rows worth downloading, [rejects of the guard, of the caption check, of each column predicate])."""
    verdicts = [urlguard.check_url(url, cfg.allowed_hosts) for url in rows.column(COL_URL).to_pylist()]
    problems = [None if v.allowed else v.detail for v in verdicts]
    rows, blocked = _split(rows, problems, filters.STAGE_GUARD, filters.REASON_BLOCKED)
    rejects = [blocked]
    min_chars = cfg.filters.min_caption_chars
    problems = [filters.caption_problem(c, min_chars) for c in rows.column(COL_CAPTION).to_pylist()]
    rows, short = _split(rows, problems, filters.STAGE_FILTER, filters.REASON_CAPTION)
    rejects.append(short)
    for predicate in cfg.filters.columns:
        name = predicate.column
        if name not in rows.column_names:
            raise ValueError(f"filters.columns: the input has no column {name!r}; it has {rows.column_names}")
        problems = [column_problem(v, predicate) for v in rows.column(name).to_pylist()]
        rows, failed = _split(rows, problems, filters.STAGE_FILTER, filters.REASON_COLUMN)
        rejects.append(failed)
    return rows, rejects
