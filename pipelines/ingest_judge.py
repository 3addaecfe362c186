"""Pass 2 of the ingest job: the verdicts that need every row, over the staged rows (no pixels).

In Ray Data over the staged model outputs (key, shard, sha256, clip score, image embedding):

1. exact duplicates: ``groupby(sha256)``; each group keeps its lowest key (`filters.duplicate_keys`'s rule);
2. the CLIP cut: a threshold, or the top fraction from a histogram of the non-duplicate scores
   (bins summed on the driver, then the scores of the one bin the cut falls in): exact;
3. near-duplicates among the rows that pass 1 and 2: random-hyperplane LSH, one row per (row, band)
   with its bucket key, ``groupby(bucket)``, exact cosine inside each bucket (`_close_in_bucket`),
   then ``groupby(key)`` keeps each row's lowest close key. No false positives; the chance of
   missing a close pair is `filters.lsh_miss_probability` (docs/DATA.md).

The verdicts (key, shard, reason, detail: duplicates and near-duplicates only; the cut is one
number) are written by Ray Data to ``_staging/judge/`` and read per shard by pass 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldm import storage
from ldm.config.ingest import FilterConfig, IngestConfig
from ldm.contract import COL_CLIP_SCORE, COL_KEY, COL_SHA256, REJ_DETAIL, REJ_REASON
from pipelines import filters
from pipelines.ingest_files import staging
from pipelines.ingest_scale import bin_of, cut_from_histogram
from pipelines.ingest_stream import HISTOGRAM_BINS
from pipelines.stages import COL_SHARD

COL_DUPLICATE_OF = "duplicate_of"
COL_BUCKET = "bucket"
COL_LOWER = "lower"


@dataclass(frozen=True)
class Judgement:
    cutoff: float  # the lowest kept CLIP score (-inf: nothing to cut)
    cutoff_detail: str  # where it came from, for the ledger's detail
    histogram: np.ndarray  # the non-duplicate scores per bin (for the report)
    verdicts_uri: str | None  # a folder of (key, shard, reason, detail) Parquet files; None: no verdict
    duplicates: int
    near_duplicates: int


# --- functions of one group or batch (run by Ray Data, testable as plain Python) -----------------------
def mark_duplicates(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One content hash's rows, with ``duplicate_of``: "" for the lowest key, that key for the others."""
    order = np.argsort(np.asarray(group[COL_KEY], dtype=object), kind="stable")
    out = {name: values[order] for name, values in group.items()}
    lowest = str(out[COL_KEY][0]) if len(order) else ""
    out[COL_DUPLICATE_OF] = np.array([""] + [lowest] * (len(order) - 1), dtype=object)[: len(order)]
    return out


def matrix(values: np.ndarray, rows: int) -> np.ndarray:
    """float32 [rows, E] from a numpy column: a 2-D array, or an object array of 1-D arrays (lists)."""
    if rows == 0:
        return np.zeros((0, 1), dtype=np.float32)
    if values.dtype == object:
        values = np.stack([np.asarray(v, dtype=np.float32) for v in values])
    return np.asarray(values, dtype=np.float32).reshape(rows, -1)


def lsh_rows(
    batch: dict[str, np.ndarray], bands: int, bits_per_band: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Each row once per band, with its bucket ("band:code") under the hyperplanes of ``seed``."""
    vectors = matrix(batch[filters.COL_IMAGE_EMBEDDING], len(batch[COL_KEY]))
    planes = np.random.default_rng(seed).standard_normal((bands * bits_per_band, vectors.shape[1]))
    bits = (vectors @ planes.T.astype(np.float32)) > 0
    weights = 1 << np.arange(bits_per_band, dtype=np.int64)
    buckets = [
        [
            f"{band}:{code}"
            for code in bits[:, band * bits_per_band : (band + 1) * bits_per_band].astype(np.int64) @ weights
        ]
        for band in range(bands)
    ]
    return {
        COL_BUCKET: np.array([b for band in buckets for b in band], dtype=object),
        COL_KEY: np.tile(np.asarray(batch[COL_KEY], dtype=object), bands),
        COL_SHARD: np.tile(batch[COL_SHARD], bands),
        filters.COL_IMAGE_EMBEDDING: np.tile(vectors, (bands, 1)),
    }


def close_in_bucket(group: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    """The rows of one bucket with cosine >= ``threshold`` to a lower key: (key, shard, lowest such key)."""
    order = np.argsort(np.asarray(group[COL_KEY], dtype=object), kind="stable")
    keys = np.asarray(group[COL_KEY], dtype=object)[order]
    vectors = matrix(group[filters.COL_IMAGE_EMBEDDING], len(keys))[order]
    shards = np.asarray(group[COL_SHARD])[order]
    found: list[int] = []
    lower: list[str] = []
    if len(keys) > 1:
        similar = vectors @ vectors.T
        for j in range(1, len(keys)):
            close = np.flatnonzero(similar[j, :j] >= threshold)
            if len(close):
                found.append(j)
                lower.append(str(keys[close[0]]))
    picked = np.asarray(found, dtype=np.int64)
    return {
        COL_KEY: keys[picked].astype(object),
        COL_SHARD: shards[picked].astype(np.int64),
        COL_LOWER: np.array(lower, dtype=object),
    }


def lowest_lower(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row's near-duplicate findings (one per band that caught it) -> the lowest close key."""
    return {
        COL_KEY: group[COL_KEY][:1],
        COL_SHARD: group[COL_SHARD][:1],
        COL_LOWER: np.array([min(str(k) for k in group[COL_LOWER])], dtype=object),
    }


def _bincount(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    counts = np.bincount(bin_of(batch[COL_CLIP_SCORE], HISTOGRAM_BINS), minlength=HISTOGRAM_BINS)
    return {"counts": counts[None, :]}


def _verdicts(batch: dict[str, np.ndarray], reason: str, column: str, detail: str) -> dict[str, np.ndarray]:
    n = len(batch[COL_KEY])
    return {
        COL_KEY: np.asarray(batch[COL_KEY], dtype=object),
        COL_SHARD: np.asarray(batch[COL_SHARD], dtype=np.int64),
        REJ_REASON: np.array([reason] * n, dtype=object),
        REJ_DETAIL: np.array([detail.format(k) for k in batch[column]], dtype=object),
    }


# --- the pass --------------------------------------------------------------------------------------------
def partitions(rows: int) -> int:
    """Shuffle partitions for ``rows`` rows: ~20k rows each, 1 to 200 (Ray's default is 200)."""
    return max(1, min(200, rows // 20_000))


def near_duplicates(candidates, f: FilterConfig, rows: int):
    """The near-duplicate rows among ``candidates`` (a Dataset with key, shard, image_embedding): a
    Dataset of (key, shard, lower)."""
    return (
        candidates.map_batches(
            lsh_rows, fn_kwargs={"bands": f.near_duplicate_bands, "bits_per_band": f.near_duplicate_band_bits}
        )
        .groupby(COL_BUCKET, num_partitions=partitions(rows * f.near_duplicate_bands))
        .map_groups(
            close_in_bucket, fn_kwargs={"threshold": f.near_duplicate_threshold}, batch_format="numpy"
        )
        .groupby(COL_KEY, num_partitions=partitions(rows))
        .map_groups(lowest_lower, batch_format="numpy")
    )


def _cutoff(kept, f: FilterConfig) -> tuple[float, str, np.ndarray]:
    """(cutoff, its detail, histogram) over the non-duplicate rows of ``kept``."""
    histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for batch in kept.map_batches(_bincount, batch_size=None).iter_batches(
        batch_format="numpy", batch_size=None
    ):
        histogram += np.asarray(batch["counts"]).sum(axis=0)
    if f.clip_mode == "threshold":
        return float(f.clip_threshold), f"threshold {f.clip_threshold}", histogram

    def in_bin(cut_bin: int) -> np.ndarray:
        picked = kept.filter(
            lambda row: int(bin_of(np.array([row[COL_CLIP_SCORE]]), HISTOGRAM_BINS)[0]) == cut_bin
        )
        batches = picked.select_columns([COL_CLIP_SCORE]).iter_batches(batch_format="numpy", batch_size=None)
        return np.concatenate(
            [np.zeros(0), *(np.asarray(b[COL_CLIP_SCORE], dtype=np.float64) for b in batches)]
        )

    return (
        cut_from_histogram(histogram, f.clip_keep_fraction, in_bin),
        f"top {f.clip_keep_fraction:.0%} cut",
        histogram,
    )


def judge(markers: list[dict], cfg: IngestConfig) -> Judgement:
    """Pass 2 over the staged parts the ``markers`` list; writes the verdicts, returns the cut."""
    import ray.data

    f = cfg.filters
    files = [staging(cfg.output_uri, "rows", name) for marker in markers for name in marker["model_files"]]
    folder = staging(cfg.output_uri, "judge")
    fs, path = storage.filesystem(folder)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # the verdicts of this run only
    if not files:
        cutoff = float(f.clip_threshold) if f.clip_mode == "threshold" else float("-inf")
        return Judgement(cutoff, "", np.zeros(HISTOGRAM_BINS, dtype=np.int64), None, 0, 0)
    columns = [COL_KEY, COL_SHARD, COL_SHA256, COL_CLIP_SCORE, filters.COL_IMAGE_EMBEDDING]
    staged = ray.data.read_parquet([storage.filesystem(u)[1] for u in files], filesystem=fs, columns=columns)
    rows = sum(marker["staged"] for marker in markers)
    marked = (
        staged.groupby(COL_SHA256, num_partitions=partitions(rows))
        .map_groups(mark_duplicates, batch_format="numpy")
        .materialize()
    )
    duplicates = marked.filter(lambda row: row[COL_DUPLICATE_OF] != "")
    kept = marked.filter(lambda row: row[COL_DUPLICATE_OF] == "")
    cutoff, detail, histogram = _cutoff(kept, f)
    verdicts = duplicates.map_batches(
        _verdicts,
        fn_kwargs={
            "reason": filters.REASON_DUPLICATE,
            "column": COL_DUPLICATE_OF,
            "detail": "same bytes as key {}",
        },
    ).select_columns([COL_KEY, COL_SHARD, REJ_REASON, REJ_DETAIL])
    near = 0
    if f.near_duplicate_threshold is not None:
        candidates = kept.filter(lambda row: row[COL_CLIP_SCORE] >= cutoff).select_columns(
            [COL_KEY, COL_SHARD, filters.COL_IMAGE_EMBEDDING]
        )
        close = near_duplicates(candidates, f, rows).materialize()
        near = close.count()
        detail_near = "CLIP image embedding close to key {}"
        verdicts = verdicts.union(
            close.map_batches(
                _verdicts,
                fn_kwargs={
                    "reason": filters.REASON_NEAR_DUPLICATE,
                    "column": COL_LOWER,
                    "detail": detail_near,
                },
            )
        )
    verdicts = verdicts.materialize()
    if verdicts.count():
        verdicts.write_parquet(path, filesystem=fs)
    return Judgement(
        cutoff, detail, histogram, folder if verdicts.count() else None, duplicates.count(), near
    )
