"""`ldm retrain`: one scheduled-retraining cycle, safe to run as often as a scheduler likes.

The recipe (`run_retrain`):

1. list the source shards under ``source`` and keep those no earlier ingest output names as its
   ``input`` (each ``root/data/<shard-id>/manifest.json``; a folder without a manifest is an ingest
   that never finished, so its shard counts as new);
2. ingest each new shard into its own data folder (one MLflow ingest run per shard);
3. gather every ingested shard's latents into one training folder, named by the digest of its parts,
   and stop here ("nothing to do") when the last finished cycle already trained on exactly that data;
4. fine-tune from the current ``champion`` (or train from scratch when there is none);
5. evaluate the candidate with `ldm eval` and its gate: ``champion`` moves only when the candidate
   scores at least the champion and at least ``eval.floor``; a serving deployment that follows the
   ``champion`` alias picks the new version up by itself;
6. record the cycle: an MLflow parent run in experiment ``retrain`` whose children are the ingest,
   train and eval runs (tag ``mlflow.parentRunId``), with the decision and its reason as tags, and a
   ``root/cycles/<cycle-id>.json`` record that the next cycle compares against.

A cycle that fails half-way leaves its finished ingest outputs behind; the next cycle reuses them and
trains, because its data differs from the last *finished* cycle's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ldm import storage, tracking
from ldm.config.retrain import RetrainConfig
from ldm.contract import LATENTS_DIR, MANIFEST_FILE, Manifest, ManifestPart, read_manifest, write_manifest
from ldm.errors import DataError

DATA_DIR = "data"
TRAIN_DIR = "train"
CYCLES_DIR = "cycles"

STATUS_NO_NEW_DATA = "no_new_data"
STATUS_PROMOTED = "promoted"
STATUS_REFUSED = "refused"

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


# --- 6. cycle records ---------------------------------------------------------------------------------
def last_cycle(root_uri: str) -> dict[str, Any] | None:
    """The most recently finished cycle's record, or None before the first one."""
    fs, path = storage.filesystem(storage.join(root_uri, CYCLES_DIR))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    records = [
        json.loads(storage.read_bytes(storage.join(root_uri, CYCLES_DIR, Path(info.path).name)))
        for info in infos
        if info.type == pafs.FileType.File and info.path.endswith(".json")
    ]
    return max(records, key=lambda record: record["finished"], default=None)


class CycleRun:
    """The cycle's MLflow parent run, made with the client API (never the active run).

    The jobs start their own runs with ``mlflow.start_run``, which refuses to start while another run
    is active; so the parent stays inactive and each child is attached afterwards by the tag MLflow
    itself uses for nesting, ``mlflow.parentRunId``.
    """

    def __init__(self, cfg: RetrainConfig, cycle_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        self.experiment_id = tracking.experiment(cfg.experiment, cfg.workdir)
        run = self.client.create_run(
            self.experiment_id, run_name=f"retrain-{cycle_id}", tags={"ldm.job": "retrain"}
        )
        self.run_id = run.info.run_id
        self.cycle_id = cycle_id
        self.children: dict[str, str] = {}
        params = {
            "source": cfg.source_uri,
            "root": cfg.root_uri,
            "model_name": cfg.model_name,
            "fine_tune": cfg.fine_tune,
            "eval.floor": cfg.eval.floor,
        }
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value))
        self.client.log_text(self.run_id, cfg.to_yaml(), "config/retrain.yaml")

    def adopt(self, role: str, run_id: str | None) -> None:
        """Make ``run_id`` a child of this cycle, remembered under ``role`` (e.g. "train")."""
        if run_id is None:
            return
        self.client.set_tag(run_id, "mlflow.parentRunId", self.run_id)
        self.client.set_tag(run_id, "ldm.retrain.cycle", self.cycle_id)
        self.children[role] = run_id
        self.client.set_tag(self.run_id, f"child.{role}", run_id)

    def finish(self, record: dict[str, Any], status: str = "FINISHED") -> None:
        tags = {"retrain.status": record["status"], "retrain.reason": record["reason"]}
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        for key in ("new_shards", "rows_accepted"):
            if key in record:
                value = record[key]
                self.client.log_metric(
                    self.run_id, key, float(len(value) if isinstance(value, list) else value)
                )
        for key, value in record.get("scores", {}).items():
            self.client.log_metric(self.run_id, f"geneval.{key}", float(value))
        self.client.log_dict(self.run_id, record, "cycle.json")
        self.client.set_tag(self.run_id, "mlflow.note.content", self._note(record))
        self.client.set_terminated(self.run_id, status=status)

    def _note(self, record: dict[str, Any]) -> str:
        """The run's description in the MLflow UI: the decision, with links to the child runs."""
        from mlflow import MlflowClient

        lines = [f"**{record['status']}**: {record['reason']}", ""]
        for role, run_id in self.children.items():
            experiment_id = MlflowClient().get_run(run_id).info.experiment_id
            lines.append(f"- {role}: [{run_id}](#/experiments/{experiment_id}/runs/{run_id})")
        return "\n".join(lines)


# --- the cycle ----------------------------------------------------------------------------------------
def _write_record(root_uri: str, record: dict[str, Any]) -> None:
    uri = storage.join(root_uri, CYCLES_DIR, f"{record['cycle_id']}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, default=str).encode())


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


def run_retrain(cfg: RetrainConfig) -> dict[str, Any]:
    """Run one cycle; returns its record (``status``: no_new_data | promoted | refused, ``reason``...)."""
    from ldm.evaluate import run_eval
    from ldm.registry import get_alias_version
    from pipelines.train import run_train

    cfg = cfg.with_workdir()
    tracking.configure(cfg.workdir)
    cycle_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    new_shards = find_new_shards(cfg)
    previous = last_cycle(cfg.root_uri)
    known = list(ingested(cfg.root_uri).values())
    if not new_shards and (
        not known or (previous is not None and previous["dataset_digest"] == union_digest(known))
    ):
        reason = (
            f"no new shards under {cfg.source_uri} and no data left untrained"
            + (f" since cycle {previous['cycle_id']}" if previous else "")
            + ": nothing to do"
        )
        _say(reason)
        return {"cycle_id": None, "status": STATUS_NO_NEW_DATA, "reason": reason, "new_shards": []}

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

        _say(f"evaluate version {version} with the gate (floor {cfg.eval.floor})")
        report = run_eval(cfg.eval.model_copy(update={"model": f"models:/{cfg.model_name}/{version}"}))
        run.adopt("eval", report["run_id"])
        record |= {
            "status": STATUS_PROMOTED if report["promoted"] else STATUS_REFUSED,
            "reason": report["reason"],
            "init_from": init_from,
            "previous_champion": champion,
            "candidate": version,
            "champion": get_alias_version(cfg.model_name, tracking.ALIAS_CHAMPION),
            "scores": report["scores"],
            "children": dict(run.children),
            "finished": time.time(),
        }
    except BaseException as error:
        run.finish({"status": "failed", "reason": f"{type(error).__name__}: {error}"}, status="FAILED")
        raise
    run.finish(record)
    _write_record(cfg.root_uri, record)
    _say(f"{record['status']}: {record['reason']} (champion: version {record['champion']})")
    return record
