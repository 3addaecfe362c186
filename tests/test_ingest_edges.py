"""Ingest at its edges: empty inputs, stages that reject every row, LAION-format input, the hold-out split.

Each run checks the invariant (every input row exactly once in latents/ or rejects/) and that a
complete ledger and manifest were written. The first tests are plain Python (no Ray).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ingest_fixtures import Route, ScriptedServer, encoded, picture, write_tiny_models

from ldm.config.ingest import ColumnPredicate, DownloadConfig, FilterConfig, IngestConfig, StageResources
from ldm.contract import (
    COL_INPUT_IDS,
    COL_KEY,
    COL_SPLIT,
    COL_TEXT_EMBEDDING,
    LATENTS_DIR,
    META_INPUT_IDS_SHAPE,
    REJ_DETAIL,
    REJ_REASON,
    REJECT_COLUMNS,
    REJECTS_DIR,
    SPLIT_HOLDOUT,
    SPLIT_TRAIN,
    holdout_split,
    read_manifest,
    train_rows,
)
from pipelines import filters
from pipelines.ingest_read import check_before_download, column_problem

LOOPBACK_SPELLINGS = (
    "localhost", "127.0.0.1", "127.1", "0x7f000001", "2130706433", "[::1]", "[::ffff:127.0.0.1]",
    "0177.0.0.1", "127.0.0.2",
)  # fmt: skip


# --- plain Python ------------------------------------------------------------------------------------
def test_column_predicates_name_the_column_and_the_value():
    unsafe = ColumnPredicate(column="punsafe", max=0.5)
    assert column_problem(0.2, unsafe) is None
    assert column_problem(0.9, unsafe) == "punsafe=0.9 > max 0.5"
    assert column_problem(None, unsafe) == "punsafe=None: not a number"
    assert column_problem(float("nan"), unsafe) == "punsafe=nan: not a number"
    assert column_problem(0.1, ColumnPredicate(column="similarity", min=0.28)) == "similarity=0.1 < min 0.28"
    with pytest.raises(ValueError, match="needs a min or a max"):
        ColumnPredicate(column="x")


def test_checks_before_download_keep_typed_masks_when_nothing_or_everything_fails(tmp_path):
    cfg = IngestConfig(
        workdir=str(tmp_path), input="x.parquet", filters=FilterConfig(columns=[{"column": "p", "max": 0.5}])
    )
    empty = pa.table({"key": pa.array([], pa.string()), "url": pa.array([], pa.string()),
                      "caption": pa.array([], pa.string()), "p": pa.array([], pa.float64())})  # fmt: skip
    kept, rejects = check_before_download(empty, cfg)
    assert kept.num_rows == 0 and [r.num_rows for r in rejects] == [0, 0, 0]
    blocked = pa.table({"key": ["a", "b"], "url": ["file:///etc/passwd", "http://127.1/x.png"],
                        "caption": ["a red circle"] * 2, "p": [0.1, 0.9]})  # fmt: skip
    kept, rejects = check_before_download(blocked, cfg)
    assert kept.num_rows == 0 and rejects[0].column(REJ_REASON).to_pylist() == [filters.REASON_BLOCKED] * 2
    assert rejects[0].column("p").to_pylist() == [0.1, 0.9]  # carried columns reach the ledger
    with pytest.raises(ValueError, match="no column 'q'"):
        check_before_download(
            blocked, cfg.model_copy(update={"filters": FilterConfig(columns=[{"column": "q", "min": 0}])})
        )


def test_holdout_split_is_deterministic_and_near_its_fraction():
    keys = [f"{i:020x}" for i in range(20_000)]
    splits = [holdout_split(k, 0.05) for k in keys]
    assert splits == [holdout_split(k, 0.05) for k in keys]
    share = splits.count(SPLIT_HOLDOUT) / len(keys)
    # binomial: sd = sqrt(0.05 * 0.95 / 20000) = 0.0015; 5 sd either side
    assert abs(share - 0.05) < 0.0077
    assert {holdout_split(k, 0.0) for k in keys[:100]} == {SPLIT_TRAIN}
    # a larger fraction only adds rows to the hold-out (the rule is a threshold on one hash)
    bigger = [holdout_split(k, 0.2) for k in keys]
    assert all(b == SPLIT_HOLDOUT for s, b in zip(splits, bigger, strict=True) if s == SPLIT_HOLDOUT)
    table = pa.table({COL_KEY: keys[:1000], COL_SPLIT: splits[:1000]})
    assert train_rows(table).num_rows == splits[:1000].count(SPLIT_TRAIN)
    assert train_rows(pa.table({COL_KEY: ["a"]})).num_rows == 1  # no split column: all train


# --- whole runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("edge-models"))


def _config(models, input_uri: str, output, **update) -> IngestConfig:
    cfg = IngestConfig(
        workdir=str(models.root),
        input=input_uri,
        output=str(output),
        download=DownloadConfig(timeout_s=4, retries=0, rows_per_shard=4, thread_count=4),
        filters=FilterConfig(clip_threshold=-1.0),  # random CLIP: keep every score
        encode=StageResources(batch_size=8),
        torch_threads=1,
        num_cpus=2,
        log_mlflow=False,
    )
    return cfg.model_copy(update=update)


def _check_complete(output, expected_keys: list[str]) -> tuple[pa.Table, pa.Table]:
    latents = pq.read_table(output / LATENTS_DIR)
    rejects = pq.read_table(output / REJECTS_DIR)
    assert rejects.column_names[: len(REJECT_COLUMNS)] == list(REJECT_COLUMNS)
    seen = Counter(latents.column(COL_KEY).to_pylist() + rejects.column(COL_KEY).to_pylist())
    assert seen == Counter(expected_keys)
    manifest = read_manifest(str(output))
    assert manifest.counts.input == len(expected_keys)
    assert manifest.counts.accepted + manifest.counts.rejected == manifest.counts.input
    return latents, rejects


def test_empty_input_gives_an_empty_complete_ledger(models, tmp_path):
    from pipelines.ingest import run_ingest

    source = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), source)
    run_ingest(_config(models, str(source), tmp_path / "out"))
    latents, rejects = _check_complete(tmp_path / "out", [])
    assert latents.num_rows == rejects.num_rows == 0


def test_a_shard_whose_rows_all_fail_the_download_is_accounted_for(ray_local, models, tmp_path):
    from pipelines.ingest import read_pairs, run_ingest

    with ScriptedServer({}) as server:  # every path answers 404
        source = tmp_path / "dead.parquet"
        urls = [f"{server.base_url}/missing-{i}.png" for i in range(5)]
        pq.write_table(pa.table({"url": urls, "caption": ["a red circle"] * 5}), source)
        run_ingest(_config(models, str(source), tmp_path / "out", allow_hosts=["127.0.0.1"]))
    keys = read_pairs(str(source)).column(COL_KEY).to_pylist()
    _, rejects = _check_complete(tmp_path / "out", keys)
    assert set(rejects.column(REJ_REASON).to_pylist()) == {filters.REASON_DOWNLOAD}


# A CLI process: Ray and the models start from cold (~60 s). `make test` runs the same input in
# process (test_every_url_refused_by_the_guard_gives_a_full_ledger); this adds the exit code.
@pytest.mark.nightly
def test_cli_with_every_url_refused_by_the_guard_exits_0_with_a_full_ledger(models, tmp_path):
    from pipelines.ingest import read_pairs

    urls = [f"http://{host}:8080/a.png" for host in LOOPBACK_SPELLINGS] + ["file:///etc/passwd"]
    source = tmp_path / "refused.csv"
    source.write_text("url,caption\n" + "".join(f"{url},a red circle\n" for url in urls))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "ldm.cli", "ingest", "--workdir", str(models.root), "--input", str(source),
         "--output", str(out), "--set", "log_mlflow=false", "--set", "num_cpus=1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    keys = read_pairs(str(source)).column(COL_KEY).to_pylist()
    latents, rejects = _check_complete(out, keys)
    assert latents.num_rows == 0 and rejects.num_rows == 10
    assert set(rejects.column(REJ_REASON).to_pylist()) == {filters.REASON_BLOCKED}


@pytest.mark.slow  # one ingest with downloads and both model stages (~60 s on 2 busy cores)
def test_laion_format_input_filters_on_columns_and_carries_them(ray_local, models, tmp_path):
    from pipelines.ingest import read_pairs, run_ingest

    routes = {f"/img-{i}.png": Route(body=encoded(picture(seed=i), "PNG")) for i in range(8)}
    with ScriptedServer(routes) as server:
        folder = tmp_path / "laion"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for part in range(2):  # several files, LAION's column names and numeric columns
            ids = range(part * 4, part * 4 + 4)
            pq.write_table(
                pa.table(
                    {
                        "URL": [f"{server.base_url}/img-{i}.png" for i in ids],
                        "TEXT": [f"picture number {i}" for i in ids],
                        "punsafe": [0.9 if i == 1 else 0.01 for i in ids],
                        "pwatermark": [0.95 if i == 6 else 0.1 for i in ids],
                        "similarity": [0.1 if i == 3 else 0.3 for i in ids],
                        "sha256": [
                            f"laion-hash-{i}" for i in ids
                        ],  # clashes with ours: carried as input_sha256
                        "WIDTH": rng.integers(64, 512, 4).astype(np.int64),
                    }
                ),
                folder / f"part-{part}.parquet",
            )
        predicates = [{"column": "punsafe", "max": 0.5}, {"column": "pwatermark", "max": 0.8},
                      {"column": "similarity", "min": 0.28}]  # fmt: skip
        cfg = _config(
            models, str(folder), tmp_path / "out", allow_hosts=["127.0.0.1"], url_col="URL", caption_col="TEXT",
            filters=FilterConfig(clip_threshold=-1.0, columns=predicates), store_text_embeddings=False,
            holdout_fraction=0.5,
        )  # fmt: skip
        manifest = run_ingest(cfg)
    keys = read_pairs(str(folder), "URL", "TEXT").column(COL_KEY).to_pylist()
    latents, rejects = _check_complete(tmp_path / "out", keys)
    assert latents.num_rows == 5 and manifest.counts.rejected_by_reason == {filters.REASON_COLUMN: 3}
    assert sorted(rejects.column(REJ_DETAIL).to_pylist()) == [
        "punsafe=0.9 > max 0.5", "pwatermark=0.95 > max 0.8", "similarity=0.1 < min 0.28"]  # fmt: skip
    carried = ["punsafe", "pwatermark", "similarity", "input_sha256", "WIDTH"]
    assert manifest.carried_columns == carried
    for table in (latents, rejects):
        assert set(carried) <= set(table.column_names)
    by_caption = dict(
        zip(latents.column("caption").to_pylist(), latents.column("input_sha256").to_pylist(), strict=True)
    )
    assert by_caption["picture number 0"] == "laion-hash-0"
    assert latents.schema.field("WIDTH").type == pa.int64()
    # token ids instead of the text embedding
    assert COL_TEXT_EMBEDDING not in latents.column_names and manifest.text_embedding_shape is None
    ids = latents.column(COL_INPUT_IDS).combine_chunks().to_numpy_ndarray()
    assert ids.dtype == np.int32 and list(ids.shape[1:]) == manifest.input_ids_shape
    assert latents.schema.metadata[META_INPUT_IDS_SHAPE] is not None
    # the hold-out split: by key hash, recorded in the manifest
    splits = dict(
        zip(latents.column(COL_KEY).to_pylist(), latents.column(COL_SPLIT).to_pylist(), strict=True)
    )
    assert splits == {k: holdout_split(k, 0.5) for k in splits}
    assert manifest.split.holdout == list(splits.values()).count(SPLIT_HOLDOUT)
    assert manifest.split.train + manifest.split.holdout == 5


def test_every_url_refused_by_the_guard_gives_a_full_ledger(models, tmp_path):
    from pipelines.ingest import read_pairs, run_ingest

    urls = [f"http://{host}:8080/a.png" for host in LOOPBACK_SPELLINGS] + ["file:///etc/passwd"]
    source = tmp_path / "refused.parquet"
    pq.write_table(pa.table({"url": urls, "caption": ["a red circle"] * 10}), source)
    manifest = run_ingest(_config(models, str(source), tmp_path / "out"))
    latents, rejects = _check_complete(tmp_path / "out", read_pairs(str(source)).column(COL_KEY).to_pylist())
    assert latents.num_rows == 0 and manifest.counts.rejected_by_reason == {filters.REASON_BLOCKED: 10}
