"""`ldm retrain`: one scheduled-retraining cycle, safe to run as often as a scheduler likes.

The recipe (`run_retrain`):

1. list the source shards under ``source`` and keep those no earlier ingest output names as its
   ``input`` (each ``root/data/<shard-id>/manifest.json``; a folder without a manifest is an ingest
   that never finished, so its shard counts as new);
2. ingest each new shard into its own data folder (one MLflow ingest run per shard);
3. gather every ingested shard's latents into one training folder, named by the digest of its parts,
   and stop here ("nothing to do") when the last finished cycle already trained on exactly that data;
4. fine-tune from the current ``champion`` (or train from scratch when there is none);
5. evaluate the candidate with `ldm eval` (on the union's hold-out rows) and its gate: ``champion``
   moves only when the candidate is at least as good as the champion and as ``eval.gate.floor`` on
   ``eval.gate.metric`` (any reported key); a serving deployment that follows the ``champion`` alias
   picks the new version up by itself;
6. record the cycle (`pipelines.retrain_record`): an MLflow parent run in experiment ``retrain``
   whose children are the ingest, train and eval runs (tag ``mlflow.parentRunId``), with the decision
   and its reason as tags, and a ``root/cycles/<cycle-id>.json`` record that the next cycle compares
   against.

The whole cycle runs under a lock (`pipelines.retrain_lock`): a second cycle of the same model that
starts while one runs says so in one line and returns (status ``locked``) without touching anything.

A cycle that fails half-way leaves its finished ingest outputs behind; the next cycle reuses them and
trains, because its data differs from the last *finished* cycle's.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ldm import storage, tracking
from ldm.config.retrain import RetrainConfig
from ldm.contract import LATENTS_DIR, MANIFEST_FILE, Manifest, ManifestPart, read_manifest, write_manifest
from ldm.errors import DataError
from pipelines.retrain_lock import CycleLock
from pipelines.retrain_record import CycleRun, last_cycle, write_record

DATA_DIR = "data"
TRAIN_DIR = "train"

STATUS_NO_NEW_DATA = "no_new_data"
STATUS_PROMOTED = "promoted"
STATUS_REFUSED = "refused"
STATUS_LOCKED = "locked"

# Manifest fields that must agree across shards trained together: latents made by other first-stage
# models (or at another size) cannot be mixed in one dataset.
_COMPATIBLE_FIELDS = ("scaling_factor", "latent_shape", "text_embedding_shape", "input_ids_shape")
_COMPATIBLE_MODELS = ("autoencoder", "text_encoder")


def _say(message: str) -> None:
    print(f"[retrain] {message}", flush=True)


# --- 1. which shards are new ------------------------------------------------------------------------
def normalize_uri(uri: str) -> str:
    """One spelling per location (absolute local paths, ``s3://`` kept), so URIs compare as strings."""
    if storage.is_remote(uri):
        return uri.rstrip("/")
    return str(Path(uri.removeprefix("file://")).resolve())


def list_shards(source_uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The shard files under ``source_uri`` (recursive), as normalized URIs in name order."""
    fs, path = storage.filesystem(source_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    names = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.path.lower().endswith(suffixes)
        and not Path(info.path).name.startswith((".", "_"))  # hidden files, _SUCCESS markers
    )
    prefix = "s3://" if storage.is_remote(source_uri) else ""
    return [normalize_uri(prefix + name) for name in names]


def shard_id(uri: str) -> str:
    """A folder name for a shard: its file stem plus a hash of its full URI (stems may repeat)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".parquet", ".csv", ".tsv"):
        name = name.removesuffix(suffix)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return f"{safe}-{digest}"


def ingested(root_uri: str) -> dict[str, dict[str, Any]]:
    """Finished ingest outputs under ``root/data``: shard URI -> {"data": folder, "manifest": ...}."""
    fs, path = storage.filesystem(storage.join(root_uri, DATA_DIR))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    done: dict[str, dict[str, Any]] = {}
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.Directory:
            continue
        folder = storage.join(root_uri, DATA_DIR, Path(info.path).name)
        manifest_uri = storage.join(folder, MANIFEST_FILE)
        if not storage.exists(manifest_uri):
            continue  # ingest never finished: the manifest is written last
        manifest = read_manifest(manifest_uri)
        done[normalize_uri(manifest.input)] = {"data": folder, "manifest": manifest}
    return done


def find_new_shards(cfg: RetrainConfig) -> list[str]:
    """Source shards that no finished ingest output under ``cfg.root`` names as its input."""
    seen = ingested(cfg.root_uri)
    new = [uri for uri in list_shards(cfg.source_uri, cfg.shard_suffixes) if uri not in seen]
    return new[: cfg.max_new_shards] if cfg.max_new_shards else new


# --- 3. the training set: the union of every ingested shard -------------------------------------------
def union_digest(parts: list[dict[str, Any]]) -> str:
    """Digest of a union: sha256 over its parts' sorted dataset digests (same parts, same digest)."""
    digest = hashlib.sha256()
    for part_digest in sorted(part["manifest"].dataset_digest for part in parts):
        digest.update(f"{part_digest}\n".encode())
    return digest.hexdigest()


def check_compatible(parts: list[dict[str, Any]]) -> None:
    """Raise `DataError` when the shards' latents were made by different first-stage models."""
    first: Manifest = parts[0]["manifest"]
    for part in parts[1:]:
        manifest: Manifest = part["manifest"]
        for field in _COMPATIBLE_FIELDS:
            ours_value, first_value = getattr(manifest, field), getattr(first, field)
            if ours_value != first_value:
                raise DataError(
                    f"{part['data']}: {field} {ours_value} differs from {first_value} "
                    f"in {parts[0]['data']}; re-ingest the shard with the same first-stage models"
                )
        for model in _COMPATIBLE_MODELS:
            ours, theirs = getattr(manifest.models, model).sha256, getattr(first.models, model).sha256
            if ours != theirs:
                raise DataError(
                    f"{part['data']}: encoded with another {model} ({ours} vs {theirs}); "
                    "re-ingest it with the current first-stage models"
                )


def _link_or_copy(fs: pafs.FileSystem, src: str, dst: str) -> None:
    # A hard link on local disk costs no space; S3 has no links, but copy_file is a server-side copy.
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            os.link(src, dst)
            return
        except OSError:  # another device, or a filesystem without links
            pass
    fs.copy_file(src, dst)


def build_union(parts: list[dict[str, Any]], root_uri: str) -> Manifest:
    """Gather ``parts``' latents into ``root/train/<digest>/`` with a manifest; returns that manifest.

    Training reads one folder (``latents/`` and ``manifest.json``); this makes one without rewriting
    any data. Named by the union's digest, so a cycle re-run after a crash reuses the same folder.
    """
    check_compatible(parts)
    digest = union_digest(parts)
    out = storage.join(root_uri, TRAIN_DIR, digest[:16])
    first: Manifest = parts[0]["manifest"]
    manifests: list[Manifest] = [part["manifest"] for part in parts]
    manifest = first.model_copy(
        update={
            "kind": "union",
            "input": "",
            "output": out,
            "dataset_digest": digest,
            "parts": [
                ManifestPart(
                    data=p["data"], input=m.input, dataset_digest=m.dataset_digest, accepted=m.counts.accepted
                )
                for p, m in zip(parts, manifests, strict=True)
            ],
            "counts": first.counts.model_copy(
                update={
                    "input": sum(m.counts.input for m in manifests),
                    "accepted": sum(m.counts.accepted for m in manifests),
                    "rejected": sum(m.counts.rejected for m in manifests),
                    "rejected_by_stage": {},
                    "rejected_by_reason": {},
                }
            ),
            "funnel": [],
            "config": {},
        }
    )
    if manifest.counts.accepted == 0:
        raise DataError(f"no accepted rows in {len(parts)} ingested shard(s): nothing to train on")
    if storage.exists(storage.join(out, MANIFEST_FILE)):
        return read_manifest(storage.join(out, MANIFEST_FILE))
    fs, latents_out = storage.filesystem(storage.join(out, LATENTS_DIR))
    fs.create_dir(latents_out, recursive=True)
    for part in parts:
        part_fs, part_latents = storage.filesystem(storage.join(part["data"], LATENTS_DIR))
        selector = pafs.FileSelector(part_latents, recursive=True)
        for info in part_fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.path.endswith(".parquet"):
                name = f"{Path(part['data']).name}--{Path(info.path).name}"
                _link_or_copy(fs, info.path, f"{latents_out}/{name}")
    write_manifest(manifest, out)
    return manifest


# --- the cycle ----------------------------------------------------------------------------------------
def _ingest_shard(cfg: RetrainConfig, shard: str) -> tuple[Manifest, str]:
    """Ingest one source shard into ``root/data/<shard-id>``; returns (manifest, MLflow run id)."""
    from pipelines.ingest import log_to_mlflow, run_ingest

    output = storage.join(cfg.root_uri, DATA_DIR, shard_id(shard))
    # The run is logged here rather than inside run_ingest, to learn its id and adopt it as a child.
    ingest_cfg = cfg.ingest.model_copy(update={"input": shard, "output": output, "log_mlflow": False})
    manifest = run_ingest(ingest_cfg)
    return manifest, log_to_mlflow(ingest_cfg, manifest)


def _train_config(cfg: RetrainConfig, data_uri: str, champion: str | None, cycle_id: str):
    """The train section pointed at the union, fine-tuning from ``champion`` when there is one."""
    update: dict[str, Any] = {"data": data_uri, "run_name": f"retrain-{cycle_id}"}
    if cfg.fine_tune and champion is not None:
        if "init_from" in type(cfg.train).model_fields:
            # A fixed version, not the alias: the cycle fine-tunes from the model it saw at its start.
            update["init_from"] = f"models:/{cfg.model_name}/{champion}"
        else:  # a TrainConfig without fine-tuning support: say so rather than pretend
            _say("this TrainConfig has no init_from: training from scratch")
    return cfg.train.model_copy(update=update)


def _nothing_to_do(cfg: RetrainConfig, new_shards: list[str]) -> str | None:
    """Why this cycle has nothing to do (no new shard, all data already trained on), or None."""
    previous = last_cycle(cfg.root_uri)
    known = list(ingested(cfg.root_uri).values())
    if new_shards or (known and (previous is None or previous["dataset_digest"] != union_digest(known))):
        return None
    since = f" since cycle {previous['cycle_id']}" if previous else ""
    return f"no new shards under {cfg.source_uri} and no data left untrained{since}: nothing to do"


def _evaluate(cfg: RetrainConfig, version: str, data_uri: str) -> dict[str, Any]:
    """`ldm eval` of the candidate with the gate, on the union's hold-out rows unless told otherwise."""
    from pipelines.eval import run_eval

    gate = cfg.eval.gate
    floor = "no floor" if gate.floor is None else f"floor {gate.floor}"
    _say(f"evaluate version {version} with the gate ({gate.metric or 'default metric'}, {floor})")
    update = {"model": f"models:/{cfg.model_name}/{version}", "data": cfg.eval.data or data_uri}
    return run_eval(cfg.eval.model_copy(update=update))


def _cycle(cfg: RetrainConfig, cycle_id: str, new_shards: list[str]) -> dict[str, Any]:
    """Steps 2-6 of the recipe (module docstring) for ``new_shards``; returns the cycle's record."""
    from ldm.registry import get_alias_version
    from pipelines.train import run_train

    _say(f"cycle {cycle_id}: {len(new_shards)} new shard(s) under {cfg.source_uri}")
    run = CycleRun(cfg, cycle_id)
    record: dict[str, Any] = {"cycle_id": cycle_id, "run_id": run.run_id, "new_shards": new_shards}
    try:
        for shard in new_shards:
            _say(f"ingest {shard}")
            manifest, ingest_run = _ingest_shard(cfg, shard)
            run.adopt(f"ingest.{shard_id(shard)}", ingest_run)
            _say(f"  {manifest.counts.accepted} of {manifest.counts.input} rows accepted")

        parts = list(ingested(cfg.root_uri).values())
        union = build_union(parts, cfg.root_uri)
        record |= {"dataset_digest": union.dataset_digest, "rows_accepted": union.counts.accepted}
        champion = get_alias_version(cfg.model_name, tracking.ALIAS_CHAMPION)
        train_cfg = _train_config(cfg, union.output, champion, cycle_id)
        init_from = getattr(train_cfg, "init_from", None)
        _say(
            f"train on {union.counts.accepted} rows from {len(parts)} shard(s), "
            + (f"fine-tuning from {init_from}" if init_from else "from scratch")
        )
        trained = run_train(train_cfg)
        run.adopt("train", trained["run_id"])
        if trained.get("model_version") is None:
            raise RuntimeError("training registered no model version (was MLflow reachable?)")
        version = str(trained["model_version"])

        report = _evaluate(cfg, version, union.output)
        run.adopt("eval", report["run_id"])
        record |= {
            "status": STATUS_PROMOTED if report["promoted"] else STATUS_REFUSED,
            "reason": report["reason"],
            "init_from": init_from,
            "previous_champion": champion,
            "candidate": version,
            "champion": get_alias_version(cfg.model_name, tracking.ALIAS_CHAMPION),
            "kind": report["kind"],
            "gate_metric": report.get("metric"),
            "scores": report["scores"],
            "children": dict(run.children),
            "finished": time.time(),
        }
    except BaseException as error:
        run.finish({"status": "failed", "reason": f"{type(error).__name__}: {error}"}, status="FAILED")
        raise
    run.finish(record)
    write_record(cfg.root_uri, record)
    _say(f"{record['status']}: {record['reason']} (champion: version {record['champion']})")
    return record


def run_retrain(cfg: RetrainConfig) -> dict[str, Any]:
    """Run one cycle under the lock; returns its record (``status``: no_new_data | promoted | refused |
    locked, ``reason``...). A locked cycle prints nothing: its caller says the one line."""
    cfg = cfg.with_workdir()
    tracking.configure(cfg.workdir)
    cycle_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    lock = CycleLock(cfg.model_name, cfg.lock_ttl_s, owner=f"{socket.gethostname()}:{os.getpid()}:{cycle_id}")
    busy = lock.acquire()
    if busy is not None:
        return {"cycle_id": None, "status": STATUS_LOCKED, "reason": busy, "new_shards": []}
    try:
        new_shards = find_new_shards(cfg)
        reason = _nothing_to_do(cfg, new_shards)
        if reason is not None:
            _say(reason)
            return {"cycle_id": None, "status": STATUS_NO_NEW_DATA, "reason": reason, "new_shards": []}
        return _cycle(cfg, cycle_id, new_shards)
    finally:
        lock.release()
