"""The row-count-independent pieces of ingest: key digests, the histogram cut, duplicates by groupby."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.config.ingest import FilterConfig
from pipelines import filters
from pipelines.ingest_scale import KeyDigest, top_fraction_cutoff


def test_key_digest_is_order_free_and_sees_a_lost_a_repeated_or_a_swapped_key():
    keys = [f"k{i:04d}" for i in range(500)]
    whole = KeyDigest.of(keys)
    assert KeyDigest.of(reversed(keys)) == whole
    assert KeyDigest.of(keys[:123]) + KeyDigest.of(keys[123:]) == whole  # parts add up
    assert KeyDigest.of(keys[1:]) != whole  # lost
    assert KeyDigest.of([*keys[1:], keys[2]]) != whole  # one lost, another repeated: same count
    assert KeyDigest.of([*keys[1:], "k9999"]) != whole  # swapped for a stranger
    assert KeyDigest.of([]) == KeyDigest()


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("bins", [1, 7, 4096])
def test_histogram_cut_equals_the_sorted_cut(fraction, bins):
    rng = np.random.default_rng(int(fraction * 1000) + bins)
    scores = np.concatenate(
        [
            rng.normal(0.2, 0.05, 3000),
            np.full(50, 0.25),  # ties at a likely cut
            [-1.0, 1.0, 1.7, -3.0],  # the range's ends and values beyond them
        ]
    ).astype(np.float32)
    rng.shuffle(scores)
    batches = np.array_split(scores, 13)
    cutoff, histogram = top_fraction_cutoff(lambda: iter(batches), fraction, bins=bins)
    expected = filters.clip_cutoff(
        scores, FilterConfig(clip_mode="top_fraction", clip_keep_fraction=fraction)
    )
    assert cutoff == expected
    assert histogram.sum() == len(scores)
    assert (scores >= cutoff).sum() >= int(np.ceil(fraction * len(scores)))


def test_histogram_cut_of_no_scores_cuts_nothing():
    cutoff, histogram = top_fraction_cutoff(lambda: iter([]), 0.3)
    assert cutoff == float("-inf") and histogram.sum() == 0


def test_exact_duplicates_by_groupby_keep_the_lowest_key(ray_local):
    import ray.data

    from pipelines.ingest_judge import mark_duplicates

    rows = [
        {"key": "b", "sha256": "h1"},
        {"key": "a", "sha256": "h1"},
        {"key": "c", "sha256": "h1"},
        {"key": "d", "sha256": "h2"},
        {"key": "e", "sha256": "h3"},
        {"key": "f", "sha256": "h3"},
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=3)
    marked = dataset.groupby("sha256", num_partitions=2).map_groups(mark_duplicates, batch_format="numpy")
    found = {row["key"]: row["duplicate_of"] for row in marked.take_all() if row["duplicate_of"]}
    assert found == {"b": "a", "c": "a", "f": "e"}
    assert found == filters.duplicate_keys([r["key"] for r in rows], [r["sha256"] for r in rows])


def test_key_digest_check_names_the_keys_through_explain_or_raises_anyway():
    from pipelines.ingest_scale import check_key_digests
    from pipelines.ingest_write import IngestAccountingError, check_accounting

    keys = ["a", "b", "c"]
    check_key_digests(
        KeyDigest.of(keys), [KeyDigest.of(["c", "a"]), KeyDigest.of(["b"])], explain=lambda: None
    )
    with pytest.raises(IngestAccountingError, match="missing 1"):  # explain names the lost key
        check_key_digests(
            KeyDigest.of(keys),
            [KeyDigest.of(["a", "c"])],
            explain=lambda: check_accounting(keys, ["a", "c"], []),
        )
    with pytest.raises(IngestAccountingError, match="3 in, 4 out"):  # no explanation: still raises
        check_key_digests(KeyDigest.of(keys), [KeyDigest.of([*keys, "a"])], explain=lambda: None)
