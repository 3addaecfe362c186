"""The records of `ldm retrain` cycles: the MLflow parent run of a cycle and its JSON record on storage.

The record of the last *finished* cycle (``root/cycles/<cycle-id>.json``) is what the next cycle
compares its data against; the parent run is what an operator reads in the MLflow UI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ldm import storage, tracking
from ldm.config.retrain import RetrainConfig

CYCLES_DIR = "cycles"


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
            "eval.gate.metric": cfg.eval.gate.metric or "default",
            "eval.gate.floor": cfg.eval.gate.floor,
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
        prefix = "geneval." if record.get("kind") == "geneval" else ""
        for key, value in record.get("scores", {}).items():
            if value == value:  # NaN: a value the evaluation could not measure
                self.client.log_metric(self.run_id, f"{prefix}{key}", float(value))
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


def write_record(root_uri: str, record: dict[str, Any]) -> None:
    uri = storage.join(root_uri, CYCLES_DIR, f"{record['cycle_id']}.json")
    storage.write_bytes(uri, json.dumps(record, indent=2, default=str).encode())
