"""MLflow set-up shared by every job: where the tracking store is and which experiment a run goes to.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` when set, else a SQLite database in the work
directory (the file store is deprecated and errors from MLflow 3.13). Experiments created here keep
their artifacts in the work directory too, not in a ``./mlruns`` next to wherever the command ran.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm.contract import WorkDir

DEFAULT_MODEL_NAME = "ldm"
ALIAS_CANDIDATE = "candidate"
ALIAS_CHAMPION = "champion"


def tracking_uri(workdir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or WorkDir(workdir).tracking_uri


def configure(workdir: str | Path) -> str:
    """Point mlflow at the tracking store for ``workdir``; returns the URI. Call before any mlflow use."""
    import mlflow

    uri = tracking_uri(workdir)
    WorkDir(workdir).root.mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri/set_registry_uri also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI;
    # left there, the first work directory would win over every later one in this process
    # (tracking_uri() reads the variable). Put the variables back as the user had them.
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return uri


def experiment(name: str, workdir: str | Path) -> str:
    """Get or create experiment ``name`` (artifacts under the work directory when local); returns its id."""
    import mlflow

    configure(workdir)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifact_location = None
    if tracking_uri(workdir).startswith("sqlite:"):
        artifact_location = (WorkDir(workdir).mlflow_artifacts / name).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
