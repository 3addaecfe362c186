"""The streaming ingest plan: input shards and keys, near-duplicates by groupby, re-runs after a kill.

The near-duplicate pass is checked against the brute-force O(N^2) answer on random embeddings with
planted near-duplicates; the re-run test leaves an output as a run killed in pass 3 leaves it
(some shards published, the rest not, stray files) and checks the re-run reuses what was finished.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Route, ScriptedServer, encoded, picture, write_tiny_models

from ldm.config.ingest import DownloadConfig, FilterConfig, IngestConfig, StageResources
from ldm.contract import COL_KEY, LATENTS_DIR, MANIFEST_FILE, REJECTS_DIR
from pipelines import filters
from pipelines.ingest_plan import carried_fields, plan_shards, read_pairs, read_shard


def test_plan_cuts_files_into_shards_and_keys_rows_by_global_index(tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    first = pa.table({"url": [f"http://h/{i}.png" for i in range(10)], "caption": [f"c{i}" for i in range(10)],
                      "score": np.arange(10, dtype=np.float64)})  # fmt: skip
    pq.write_table(first, folder / "a.parquet", row_group_size=3)  # shards cross row groups
    second = pa.table({"url": ["http://h/x.png"] * 5, "caption": ["same"] * 5, "score": np.zeros(5)})
    pacsv.write_csv(second, folder / "b.csv")
    shards, schema = plan_shards(str(folder), rows_per_shard=4)
    assert [(s.file.rsplit("/", 1)[1], s.start, s.rows, s.offset) for s in shards] == [
        ("a.parquet", 0, 4, 0), ("a.parquet", 4, 4, 4), ("a.parquet", 8, 2, 8),
        ("b.csv", 0, 4, 10), ("b.csv", 4, 1, 14),
    ]  # fmt: skip
    carried = carried_fields(schema, "url", "caption")
    parts = [read_shard(s, "url", "caption", carried) for s in shards]
    whole = read_pairs(str(folder))
    assert pa.concat_tables(parts).equals(whole)
    keys = whole.column(COL_KEY).to_pylist()
    urls, captions = whole.column("url").to_pylist(), whole.column("caption").to_pylist()
    assert keys == [filters.row_key(i, u, c) for i, (u, c) in enumerate(zip(urls, captions, strict=True))]
    assert len(set(keys)) == 15  # five identical CSV rows still get five keys
    assert whole.column("score").to_pylist()[:3] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="missing column"):
        carried_fields(schema, "URL", "caption")


def _planted(seed: int = 7, n: int = 300, twins: int = 60, dim: int = 32) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, dim)).astype(np.float32)
    close = base[:twins] + rng.normal(0, 0.12, (twins, dim)).astype(np.float32)  # cosine ~0.97-0.995
    vectors = np.concatenate([base, close])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))  # keys in random order: the lower key is not the base row
    return [f"{i:04d}" for i in order], vectors


def test_near_duplicates_by_groupby_match_the_brute_force_answer(ray_local):
    import ray.data

    from pipelines.ingest_judge import near_duplicates

    keys, vectors = _planted()
    threshold = 0.95
    rows = [
        {"key": k, "ldm_shard": i % 7, filters.COL_IMAGE_EMBEDDING: v}
        for i, (k, v) in enumerate(zip(keys, vectors, strict=True))
    ]
    cfg = FilterConfig(
        near_duplicate_threshold=threshold, near_duplicate_bands=40, near_duplicate_band_bits=16
    )
    found = near_duplicates(ray.data.from_items(rows, override_num_blocks=5), cfg, len(rows)).take_all()
    got = {row["key"]: row["lower"] for row in found}
    shard_of = {r["key"]: r["ldm_shard"] for r in rows}
    assert all(row["ldm_shard"] == shard_of[row["key"]] for row in found)
    exact = filters.near_duplicate_keys(keys, vectors, threshold)  # brute force, O(N^2)
    assert len(exact) >= 55
    assert set(got) <= set(exact)  # no false positive: candidates are compared exactly
    position = {k: i for i, k in enumerate(keys)}
    for key, lower in got.items():
        assert lower < key and float(vectors[position[key]] @ vectors[position[lower]]) >= threshold
    # misses: expected sum of per-pair miss probabilities (< 0.05 here); allow one
    bound = sum(
        filters.lsh_miss_probability(float(vectors[position[k]] @ vectors[position[v]]), 40, 16)
        for k, v in exact.items()
    )
    assert bound < 0.05 and len(set(exact) - set(got)) <= 1
    # a missed pair comes back with more, shorter bands: the exact answer on these rows
    wide = FilterConfig(
        near_duplicate_threshold=threshold, near_duplicate_bands=60, near_duplicate_band_bits=4
    )
    found = near_duplicates(ray.data.from_items(rows, override_num_blocks=3), wide, len(rows)).take_all()
    assert {row["key"]: row["lower"] for row in found} == exact


@pytest.mark.slow  # two ingest runs of 12 rows (~60-90 s on 2 busy cores)
def test_rerun_after_a_kill_in_pass_3_reuses_published_shards(ray_local, tmp_path):
    from pipelines.ingest import run_ingest

    models = write_tiny_models(tmp_path / "models")
    routes = {f"/img-{i}.png": Route(body=encoded(picture(seed=i % 9), "PNG")) for i in range(12)}
    with ScriptedServer(routes) as server:
        source = tmp_path / "pairs.parquet"
        urls = [f"{server.base_url}/img-{i}.png" for i in range(12)] + ["file:///etc/passwd"]
        pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(13)]}), source)
        cfg = IngestConfig(
            workdir=str(models.root), input=str(source), output=str(tmp_path / "out"), allow_hosts=["127.0.0.1"],
            download=DownloadConfig(timeout_s=4, retries=0, rows_per_shard=3, thread_count=4),
            filters=FilterConfig(clip_mode="top_fraction", clip_keep_fraction=0.8, near_duplicate_threshold=0.999),
            encode=StageResources(batch_size=4), rows_per_file=2,
            torch_threads=1, num_cpus=2, log_mlflow=False,
        )  # fmt: skip
        reference = run_ingest(cfg)
        out = tmp_path / "out"
        staged = {p: p.stat().st_mtime_ns for p in (out / "_staging" / "rows").glob("shard-*.json")}
        assert len(staged) == 5 and reference.shards == 5
        # as a kill in pass 3 leaves it: shards 0-2 published, 3 and 4 not (files without a marker,
        # a half-written temp file), stray staged files of a killed pass 1, no manifest
        (out / MANIFEST_FILE).unlink()
        for index in (3, 4):
            (out / "_staging" / "published" / f"shard-{index:05d}.json").unlink()
        (out / REJECTS_DIR / "part-00004.parquet").unlink()
        (out / LATENTS_DIR / "part-00004-000.parquet.tmp-0badf00d").write_bytes(b"half a file")
        (out / "_staging" / "rows" / "shard-00001.model-0badf00d.parquet").write_bytes(b"orphan")
        kept = {p: p.stat().st_mtime_ns for p in [*(out / LATENTS_DIR).glob("part-0000[012]-*"),
                                                  *(out / REJECTS_DIR).glob("part-0000[012].parquet")]}  # fmt: skip
        again = run_ingest(cfg)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # published shards were not rewritten
    assert {p: p.stat().st_mtime_ns for p in staged} == staged  # nor staged again
    assert not list(out.rglob("*0badf00d*"))  # leftovers of the kill are gone
    latents, rejects = pq.read_table(out / LATENTS_DIR), pq.read_table(out / REJECTS_DIR)
    keys = latents.column(COL_KEY).to_pylist() + rejects.column(COL_KEY).to_pylist()
    assert sorted(keys) == sorted(
        read_pairs(str(source)).column(COL_KEY).to_pylist()
    )  # none lost, none twice
    assert again.counts == reference.counts and again.dataset_digest == reference.dataset_digest
    assert reference.counts.rejected_by_reason[filters.REASON_DUPLICATE] == 3  # seeds repeat every 9 rows
