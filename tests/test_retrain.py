"""`ldm retrain` at tiny size: real synthetic shards over HTTP, real ingest/train/eval, real MLflow registry.

The scenario an operator runs nightly: a first shard lands, a cycle trains from scratch and (no
champion yet) promotes; a second run with nothing new does nothing; a second shard lands while an
endpoint serves ``champion``, a cycle fine-tunes and is refused by a floor no tiny model can reach;
a third shard lands and a cycle without the floor promotes, and the endpoint switches to it.
The bookkeeping (new-shard detection, union of shards) is also tested as plain Python.
"""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ops_fixtures import land_shard, render_shard, tiny_eval, tiny_ingest, tiny_train

from ldm.config.eval import EvalConfig, GateConfig
from ldm.config.retrain import RetrainConfig
from ldm.config.train import TrainConfig
from ldm.contract import LATENTS_DIR, MANIFEST_FILE, WorkDir
from ldm.errors import DataError
from pipelines import retrain


# --- bookkeeping as plain Python --------------------------------------------------------------------
def _fake_ingest(root, name: str, shard: str, digest: str, accepted: int, ae: str = "ae1") -> None:
    """An ingest output folder as `run_ingest` leaves it: latents/ and a manifest naming its input."""
    folder = root / "data" / name
    (folder / LATENTS_DIR).mkdir(parents=True)
    pq.write_table(
        pa.table({"key": [f"{name}-{i}" for i in range(accepted)]}),
        folder / LATENTS_DIR / "part-00000.parquet",
    )
    manifest = {
        "input": shard,
        "dataset_digest": digest,
        "counts": {"input": accepted + 1, "accepted": accepted},
        "scaling_factor": 1.2,
        "latent_shape": [4, 16, 16],
        "text_embedding_shape": [16, 32],
        "models": {"autoencoder": {"sha256": ae}, "text_encoder": {"sha256": "te"}, "clip": {"sha256": "c"}},
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_new_shards_are_those_no_finished_manifest_names(tmp_path):
    source, root = tmp_path / "source", tmp_path / "root"
    (source / "2026" / "11").mkdir(parents=True)
    for name in ("a.parquet", "b.csv", "2026/11/c.tsv.gz", "notes.txt", "_SUCCESS", ".hidden.parquet"):
        (source / name).write_text("x")
    cfg = RetrainConfig(workdir=str(tmp_path), source=str(source), root=str(root))
    shards = retrain.list_shards(cfg.source_uri, cfg.shard_suffixes)
    assert [s.rsplit("/", 1)[1] for s in shards] == ["c.tsv.gz", "a.parquet", "b.csv"]
    assert retrain.find_new_shards(cfg) == shards

    _fake_ingest(root, "a", str(source / "a.parquet"), "d1", 3)
    unfinished = root / "data" / "b-unfinished"  # an ingest that died before writing its manifest
    unfinished.mkdir(parents=True)
    assert retrain.find_new_shards(cfg) == [shards[0], shards[2]]
    assert retrain.find_new_shards(cfg.model_copy(update={"max_new_shards": 1})) == [shards[0]]
    # Same stem in two folders: two different ids.
    assert retrain.shard_id("/x/a.parquet") != retrain.shard_id("/y/a.parquet")
    assert retrain.shard_id("s3://bucket/in/batch 7.csv.gz").startswith("batch_7-")


def test_union_links_every_shard_and_refuses_mixed_encoders(tmp_path):
    root = tmp_path / "root"
    _fake_ingest(root, "a", "/src/a.parquet", "d1", 3)
    _fake_ingest(root, "b", "/src/b.parquet", "d2", 2)
    parts = list(retrain.ingested(str(root)).values())
    union = retrain.build_union(parts, str(root))
    assert (union.kind, union.counts.input, union.counts.accepted) == ("union", 7, 5)
    assert pq.read_table(f"{union.output}/{LATENTS_DIR}").num_rows == 5
    # Order-free digest: the same parts give the same training folder.
    assert union.dataset_digest == retrain.union_digest(parts[::-1])
    assert retrain.build_union(parts[::-1], str(root)).output == union.output

    _fake_ingest(root, "c", "/src/c.parquet", "d3", 1, ae="another-autoencoder")
    with pytest.raises(DataError, match="another autoencoder"):
        retrain.build_union(list(retrain.ingested(str(root)).values()), str(root))


def test_config_round_trip_and_workdir_propagation(tmp_path):
    cfg = RetrainConfig(workdir=str(tmp_path), model_name="m", eval=EvalConfig(gate=GateConfig(floor=0.3)))
    again = RetrainConfig.model_validate(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    sub = cfg.with_workdir()
    assert {sub.ingest.workdir, sub.train.workdir, sub.eval.workdir} == {str(tmp_path)}
    assert (
        sub.eval.promote and sub.eval.gate.floor == 0.3 and sub.train.model_name == sub.eval.model_name == "m"
    )
    assert cfg.root_uri.endswith("retrain") and cfg.source_uri.endswith("source")


# --- the lock: one cycle at a time ------------------------------------------------------------------
def test_the_lock_admits_one_holder_and_says_who_holds_it(tmp_path):
    import threading

    from ldm import tracking
    from pipelines.retrain_lock import TAG_EXPIRES, CycleLock

    tracking.configure(tmp_path)
    first, second = CycleLock("m", ttl_s=600, owner="first"), CycleLock("m", ttl_s=600, owner="second")
    assert first.acquire() is None
    busy = second.acquire()
    assert busy is not None and "owner first" in busy and "m.retrain-lock" in busy
    second.release()  # not the holder: releases nothing
    assert CycleLock("m", ttl_s=600, owner="third").acquire() is not None
    first.release()
    assert second.acquire() is None  # free again
    second.release()

    # A holder that died: once its lock expired, the next cycle takes it over.
    from mlflow import MlflowClient

    dead = CycleLock("m", ttl_s=600, owner="dead")
    assert dead.acquire() is None
    MlflowClient().set_registered_model_tag("m.retrain-lock", TAG_EXPIRES, "1")
    heir = CycleLock("m", ttl_s=600, owner="heir")
    assert heir.acquire() is None
    assert "owner heir" in (CycleLock("m", ttl_s=600, owner="x").acquire() or "")
    heir.release()

    # Eight cycles racing for a free lock: exactly one wins (the registry's unique name).
    locks = [CycleLock("race", ttl_s=600, owner=f"racer-{i}") for i in range(8)]
    outcomes: list[str | None] = [None] * len(locks)
    barrier = threading.Barrier(len(locks))

    def take(i: int) -> None:
        barrier.wait()
        outcomes[i] = locks[i].acquire() or "won"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(locks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("won") == 1, outcomes


def test_ldm_retrain_while_another_cycle_runs_says_so_in_one_line_and_exits_0(tmp_path):
    import mlflow
    from typer.testing import CliRunner

    from ldm import tracking
    from ldm.cli import app
    from pipelines.retrain_lock import CycleLock

    source = tmp_path / "source"
    source.mkdir()
    (source / "batch-0.parquet").write_text("not even parquet: a locked cycle must not read it")
    tracking.configure(tmp_path)
    holder = CycleLock("ldm", ttl_s=600, owner="nightly-cycle-1")
    assert holder.acquire() is None
    try:
        result = CliRunner().invoke(app, ["retrain", "--workdir", str(tmp_path), "--source", str(source)])
    finally:
        holder.release()
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[retrain] another retraining cycle holds the lock")
    assert "nightly-cycle-1" in lines[0]
    tracking.configure(tmp_path)
    assert mlflow.get_experiment_by_name("retrain") is None  # no cycle run was started
    assert not (tmp_path / "retrain").exists()


# --- two real cycles -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A work directory with tiny first-stage models, and three synthetic shards served over HTTP."""
    from ingest_fixtures import write_tiny_models

    from ldm.synth.server import ImageServer
    from ldm.synth.source import write_pairs

    work = write_tiny_models(tmp_path_factory.mktemp("retrain-work"))
    servers, pairs = [], []
    for batch in range(3):
        folder = work.root / f"synth-{batch}"
        server = ImageServer(render_shard(folder, seed=batch)).__enter__()
        servers.append(server)
        pairs.append(write_pairs(folder, server.base_url))
    yield work, pairs
    for server in servers:
        server.stop()


def _config(work: WorkDir, floor: float = 0.0) -> RetrainConfig:
    return RetrainConfig(
        workdir=str(work.root),
        ingest=tiny_ingest(work.root),
        train=tiny_train(work.root, sample_every=100),
        eval=tiny_eval(work.root, gate=GateConfig(floor=floor)),
    )


def _land(work: WorkDir, pairs, batch: int) -> None:
    land_shard(pairs[batch], work.root / "source", f"batch-{batch:04d}.parquet")


def _children(parent_run_id: str) -> set[str]:
    """Ids of the runs MLflow lists as children of ``parent_run_id``, in any experiment."""
    import mlflow

    runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", search_all_experiments=True
    )
    return set(runs["run_id"])


def _wait_for_version(base_url: str, version: str, timeout_s: float = 90) -> dict:
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        health = requests.get(f"{base_url}/healthz", timeout=30).json()
        if str(health["model"]["version"]) == version or time.monotonic() > deadline:
            return health
        time.sleep(1)


@pytest.mark.slow  # three training cycles and a live endpoint: ~2-3 minutes on 2 busy cores
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_cycles_promote_refuse_do_nothing_and_the_endpoint_follows(ray_local, shop):
    from mlflow import MlflowClient

    from ldm import tracking
    from ldm.config.serve import ServeConfig
    from ldm.registry import get_alias_version
    from serve.app import run_serve, shutdown_serve

    work, pairs = shop
    tracking.configure(work.root)
    client = MlflowClient()

    # Cycle 1: first shard, no champion: train from scratch; the gate has no champion to beat.
    _land(work, pairs, 0)
    first = retrain.run_retrain(_config(work))
    assert first["status"] == "promoted", first
    assert first["previous_champion"] is None and first["init_from"] is None
    assert first["candidate"] == first["champion"] == "1"
    assert len(first["new_shards"]) == 1 and first["rows_accepted"] == 9  # 1 of 10 rows is a dead URL
    parent = client.get_run(first["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["retrain.status"] == "promoted"
    assert sorted(first["children"]) == [
        "eval",
        "ingest." + retrain.shard_id(first["new_shards"][0]),
        "train",
    ]
    assert _children(first["run_id"]) == set(first["children"].values())
    assert client.get_run(first["children"]["train"]).data.tags["ldm.retrain.cycle"] == first["cycle_id"]

    # The same again with nothing new: nothing happens, and it says so.
    again = retrain.run_retrain(_config(work))
    assert again["status"] == "no_new_data" and "nothing to do" in again["reason"]
    assert len(client.search_model_versions("name='ldm'")) == 1

    base_url = run_serve(
        ServeConfig(
            workdir=str(work.root),
            port=0,
            min_replicas=1,
            max_replicas=1,
            replica_num_cpus=0.25,
            max_batch_size=1,
            reload_interval_s=1.0,
        ),
        block=False,
    )
    try:
        assert _wait_for_version(base_url, "1")["model"]["version"] == "1"

        # Cycle 2: a second shard, a floor no tiny model reaches: a candidate, no promotion.
        _land(work, pairs, 1)
        refused = retrain.run_retrain(_config(work, floor=0.99))
        assert refused["status"] == "refused" and "below the floor 0.990" in refused["reason"]
        assert refused["candidate"] == "2" and refused["champion"] == "1"
        assert refused["rows_accepted"] == 18 and len(refused["new_shards"]) == 1
        assert get_alias_version("ldm", "candidate") == "2" and get_alias_version("ldm", "champion") == "1"
        if "init_from" in TrainConfig.model_fields:
            assert refused["init_from"] == "models:/ldm/1"
        assert client.get_run(refused["run_id"]).data.tags["retrain.reason"] == refused["reason"]

        # Cycle 3: a third shard, floor 0: promoted when it scores at least the champion (v1).
        _land(work, pairs, 2)
        third = retrain.run_retrain(_config(work))
        v1_score = float(client.get_model_version("ldm", "1").tags["eval.overall"])
        promoted = third["scores"]["overall"] >= v1_score
        assert third["status"] == ("promoted" if promoted else "refused"), (third, v1_score)
        assert third["rows_accepted"] == 27 and third["candidate"] == "3"
        expected = "3" if promoted else "1"
        assert get_alias_version("ldm", "champion") == expected
        # The endpoint follows the champion alias by itself (the serving deployment's hot reload).
        assert _wait_for_version(base_url, expected)["model"]["version"] == expected
    finally:
        shutdown_serve()
