"""Pieces of the ingest job whose memory does not grow with the number of rows.

- `KeyDigest`: the accounting invariant ("every input key exactly once in latents/ or rejects/")
  as a count plus order-free sums of 64-bit key hashes. Digests of parts add up, so each shard or
  batch can make its own and the driver only adds numbers.
- `top_fraction_cutoff`: the CLIP top-fraction cut from a fixed-bin histogram pass over the scores,
  then a second pass that keeps only the scores of the one bin the cut falls in. Exact (the same
  value as sorting every score), with memory bounded by the bins plus that one bin's scores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pipelines.ingest_write import IngestAccountingError

_MASK64 = (1 << 64) - 1


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class KeyDigest:
    """A multiset of keys in three numbers: how many, the sum and the xor of their 64-bit hashes.

    Equal multisets give equal digests whatever the order. A lost, extra or repeated key changes
    the count; a key swapped for another changes the sum unless the two 64-bit hashes collide
    (probability ~2^-64 per pair). The xor catches nothing the sum misses on its own; it is kept
    because a repeated key leaves it unchanged while moving the sum, which helps to tell a
    duplicate from a loss when reading a failure.
    """

    count: int = 0
    sum64: int = 0
    xor64: int = 0

    @classmethod
    def of(cls, keys: Iterable[str]) -> KeyDigest:
        count = total = xor = 0
        for key in keys:
            value = _key_hash(str(key))
            count, total, xor = count + 1, (total + value) & _MASK64, xor ^ value
        return cls(count, total, xor)

    def __add__(self, other: KeyDigest) -> KeyDigest:
        return KeyDigest(
            self.count + other.count, (self.sum64 + other.sum64) & _MASK64, self.xor64 ^ other.xor64
        )


def check_key_digests(expected: KeyDigest, parts: Iterable[KeyDigest], explain: Callable[[], None]) -> None:
    """Raise `IngestAccountingError` unless the ``parts`` (latents/, rejects/, or per-shard digests)
    add up to ``expected`` (the input's). ``explain`` runs first on a mismatch: it may read the keys
    and raise with the missing and repeated ones named (only a failing run pays for that)."""
    got = sum(parts, KeyDigest())
    if got == expected:
        return
    explain()
    raise IngestAccountingError(
        f"ingest lost or duplicated rows: {expected.count} in, {got.count} out, digests differ"
    )


# --- the top-fraction cut --------------------------------------------------------------------------
SCORE_RANGE = (-1.0, 1.0)  # CLIP scores are cosine similarities; values outside land in the end bins


def bin_of(scores: np.ndarray, bins: int) -> np.ndarray:
    low, high = SCORE_RANGE
    position = (np.asarray(scores, dtype=np.float64) - low) / (high - low) * bins
    return np.clip(np.floor(position), 0, bins - 1).astype(np.int64)


def score_histogram(batches: Iterable[np.ndarray], bins: int = 4096) -> np.ndarray:
    """Rows per bin: ``bins`` equal bins over `SCORE_RANGE` (the end bins also take what lies beyond)."""
    counts = np.zeros(bins, dtype=np.int64)
    for batch in batches:
        counts += np.bincount(bin_of(batch, bins), minlength=bins)
    return counts


def top_fraction_cutoff(
    read_scores: Callable[[], Iterable[np.ndarray]], fraction: float, bins: int = 4096
) -> tuple[float, np.ndarray]:
    """The score of the ``ceil(fraction * N)``-th best row, from two passes over the scores.

    ``read_scores()`` yields the scores in batches, in any order; it is called twice. Pass 1 counts
    rows per bin (``bins`` equal bins over `SCORE_RANGE`); the cut falls in the bin where the count
    of rows in higher bins first reaches the target; pass 2 keeps only that bin's scores and picks the
    exact value. Same result as `pipelines.filters.clip_cutoff` (tested), so the error is zero; the
    driver holds ``bins`` counts plus one bin's scores (all of them only if every score falls in
    one bin of width 2/bins). Returns (the cutoff, the histogram, for the report); -inf with no scores.
    """
    counts = score_histogram(read_scores(), bins)

    def in_bin(cut_bin: int) -> np.ndarray:
        in_bin = [np.asarray(b, dtype=np.float64) for b in read_scores()]
        return np.concatenate([b[bin_of(b, bins) == cut_bin] for b in in_bin]) if in_bin else np.zeros(0)

    return cut_from_histogram(counts, fraction, in_bin), counts


def cut_from_histogram(
    counts: np.ndarray, fraction: float, values_in_bin: Callable[[int], np.ndarray]
) -> float:
    """`top_fraction_cutoff` from the bin counts and a function giving one bin's scores (-inf: no rows)."""
    total = int(counts.sum())
    if total == 0:
        return float("-inf")
    keep = int(np.ceil(fraction * total))
    at_or_above = np.cumsum(counts[::-1])[::-1]  # rows in this bin or a higher one, per bin
    cut_bin = int(np.flatnonzero(at_or_above >= keep).max())  # the highest bin that reaches the target
    above = int(at_or_above[cut_bin] - counts[cut_bin])
    values = np.asarray(values_in_bin(cut_bin), dtype=np.float64)
    rank = keep - above  # 1-based rank of the cut inside its bin, best first
    return float(np.sort(values)[::-1][rank - 1])
