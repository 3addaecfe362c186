"""MLflow from inside a training worker: every call through one wrapper that retries, counts and shows.

Rank 0 logs metrics, sample grids and system metrics to the run the driver opened. A call that fails
is tried again (3 tries, back-off 0.5 s then 1 s); a call that still fails is counted and printed to
the worker's stderr (Ray forwards it to the driver's console), and the next call is tried afresh: one
failure never ends the rest of the record. ``finish`` tags the run ``ldm.tracking_failures=N``.

Why: a failure that only called ``warnings.warn`` inside a Ray Train worker and then switched all
tracking off once left a 500-step demo run with no grids and a loss history that stopped at step 200,
with nothing on any console (docs/TRAINING.md, "Tracking failures").
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

FAILURES_TAG = "ldm.tracking_failures"


class TrackingCalls:
    """Runs tracking calls with retries; never raises. ``failures`` counts calls that gave up."""

    def __init__(self, label: str, tries: int = 3, backoff_seconds: float = 0.5):
        self.label, self.tries, self.backoff_seconds = label, tries, backoff_seconds
        self.failures = 0

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        for attempt in range(1, self.tries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - tracking must never stop training
                if attempt == self.tries:
                    self.failed(what, error, attempt)
                    return None
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
        return None

    def failed(self, what: str, error: BaseException, tries: int = 1) -> None:
        """Count and show a failure (also for work that is not an MLflow call, such as a sample grid)."""
        self.failures += 1
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(
            f"{self.label}: MLflow {what} failed after {tries} tries "
            f"({type(error).__name__}: {first_line}); training goes on, failures so far: {self.failures}",
            file=sys.stderr,
            flush=True,
        )


class WorkerTracking:
    """The driver's MLflow run as seen from rank 0 of the training workers."""

    def __init__(self, run_id: str, tracking_uri: str, label: str = "ldm train rank 0"):
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self.calls = TrackingCalls(label)
        self._system_metrics = False

    def _client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def start(self, resumed_from: int | None, system_metrics: bool, interval: float) -> None:
        """System metrics through MLflow's public API (``start_run(log_system_metrics=True)`` on the
        driver's run); a resumed attempt notes where it started again."""
        import mlflow

        if resumed_from is not None:
            self.log_metrics(resumed_from, {"resumed_from_step": resumed_from})
        if not system_metrics:
            return

        def start_run() -> None:
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_system_metrics_sampling_interval(interval)
            mlflow.start_run(run_id=self.run_id, log_system_metrics=True)
            self._system_metrics = True

        self.calls.call("system metrics start", start_run)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        self.calls.call(
            f"metrics of step {step}", lambda: self._client().log_batch(self.run_id, metrics=entries)
        )

    def log_image(self, step: int, image: Any, key: str) -> None:
        self.calls.call(
            f"{key} image of step {step}",
            lambda: self._client().log_image(self.run_id, image, key=key, step=step),
        )

    def finish(self) -> None:
        """Stop system metrics (the run stays RUNNING: the driver ends it) and tag the failure count."""
        import mlflow

        if self._system_metrics:
            self._system_metrics = False
            self.calls.call("system metrics stop", mlflow.end_run, status="RUNNING")
        failures = str(self.calls.failures)
        self.calls.call("failure tag", lambda: self._client().set_tag(self.run_id, FAILURES_TAG, failures))
