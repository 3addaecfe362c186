"""The training run's MLflow record as the driver keeps it: create, config, dataset input, final
metrics, end. Every call goes through ``TrackingCalls`` (retries, counted and shown failures); the
workers log into the same run (``pipelines/train/monitor.py``)."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ldm import storage
from ldm.config.train import TrainConfig
from ldm.contract import MANIFEST_FILE
from ldm.contract import read_manifest as load_manifest
from pipelines.train.data import LatentsFacts
from pipelines.train.monitor import FAILURES_TAG, TrackingCalls


def read_manifest(data_uri: str) -> tuple[str, str] | None:
    """The data manifest's text and the dataset digest it names, or None without a manifest.

    The one place the training job reads the manifest written by ingest.
    """
    manifest_uri = storage.join(data_uri, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        return None
    manifest = load_manifest(manifest_uri)
    return manifest.to_json(), manifest.dataset_digest


class DriverTracking:
    """The MLflow run of this job as seen from the driver; no call ever fails the job."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.run_id: str | None = None
        self.tracking_uri: str = ""
        self.calls = TrackingCalls("ldm train")

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        return None if self.run_id is None else self.calls.call(what, fn, *args)

    @property
    def _run(self) -> str:
        """The run id, for calls that ``_call`` makes only once the run exists."""
        if self.run_id is None:
            raise RuntimeError("no MLflow run")
        return self.run_id

    def start(self, cfg: TrainConfig, run_name: str, data_uri: str, facts: LatentsFacts) -> None:
        def start() -> None:
            import mlflow

            from ldm import tracking

            experiment_id = tracking.experiment(cfg.experiment, self.workdir)
            self.tracking_uri = mlflow.get_tracking_uri()
            run = mlflow.MlflowClient().create_run(
                experiment_id, run_name=run_name, tags={"ldm.job": "train"}
            )
            self.run_id = run.info.run_id

        self.calls.call("run start", start)
        if self.run_id is None:
            warnings.warn("MLflow is unreachable: training goes on without tracking", stacklevel=2)
        self._call("params", self._log_config, cfg, data_uri, facts)
        self._call("dataset input", self._log_dataset, data_uri)

    def _log_config(self, cfg: TrainConfig, data_uri: str, facts: LatentsFacts) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient()
        params = {**cfg.flat(), "data.uri": data_uri, **{f"data.{k}": v for k, v in asdict(facts).items()}}
        client.log_batch(self._run, params=[Param(key, str(value)) for key, value in params.items()])
        client.log_text(self._run, cfg.to_yaml(), "config/train.yaml")

    def _log_dataset(self, data_uri: str) -> None:
        """The manifest as an artifact, and the latents as the run's dataset input (``mlflow.log_input``)."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        manifest = read_manifest(data_uri)
        if manifest is None:
            warnings.warn(f"no {MANIFEST_FILE} in {data_uri}: the run has no dataset input", stacklevel=2)
            return
        text, digest = manifest
        mlflow.MlflowClient().log_text(self._run, text, f"data/{MANIFEST_FILE}")
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are the same
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(data_uri)
        # `profile` is an abstractmethod of Dataset, which is no ABC: MetaDataset instantiates (as MLflow's docs do).
        dataset = MetaDataset(source=source, name="latents", digest=digest[:36])  # type: ignore[abstract]
        # log_input logs to the active run: make this run active for the call, then leave it RUNNING.
        mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None, log_system_metrics=False)
        try:
            mlflow.log_input(dataset, context="train")
        finally:
            mlflow.end_run(status="RUNNING")

    def log_params(self, params: dict[str, object]) -> None:
        """More run params (e.g. ``trainable_params``/``total_params``, known once the U-Net is built)."""

        def log() -> None:
            from mlflow import MlflowClient

            for key, value in params.items():
                MlflowClient().log_param(self._run, key, value)

        self._call("params", log)

    def log_final(self, metrics: dict[str, float], export: Path) -> None:
        def log() -> None:
            from mlflow import MlflowClient

            client = MlflowClient()
            for key, value in metrics.items():
                client.log_metric(self._run, key, float(value))
            client.set_tag(self._run, "ldm.export", str(export))

        self._call("final metrics", log)

    def end(self, status: str) -> None:
        """Add the driver's failures to the workers' ``ldm.tracking_failures`` tag, then end the run."""

        def end() -> None:
            from mlflow import MlflowClient

            client = MlflowClient()
            workers = int(client.get_run(self._run).data.tags.get(FAILURES_TAG, "0"))
            client.set_tag(self._run, FAILURES_TAG, str(workers + self.calls.failures))
            client.set_terminated(self._run, status=status)

        self._call("end", end)
