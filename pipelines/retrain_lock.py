"""The lock that keeps two retraining cycles of one model from training or promoting at once.

It lives in the MLflow model registry, the one store every cycle of a deployment already shares
(whatever its storage root): a registered model named ``<model_name>.retrain-lock`` whose tags say who
holds it and until when. Creating a registered model is atomic in every MLflow backend (a unique name;
the second ``create_registered_model`` fails with RESOURCE_ALREADY_EXISTS), which is the whole lock.

A holder that died leaves its lock behind; after ``ttl_s`` the next cycle takes it over. Taking over
is not atomic (two cycles that find the same expired lock at the same moment could both proceed), so
``ttl_s`` should be well above the longest cycle; a live holder is never displaced.
"""

from __future__ import annotations

import os
import socket
import time

LOCK_SUFFIX = ".retrain-lock"
TAG_OWNER = "owner"
TAG_ACQUIRED = "acquired_at"
TAG_EXPIRES = "expires_at"  # unix seconds


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class CycleLock:
    """``acquire()`` -> None when this cycle holds the lock, else a line saying who does; ``release()``."""

    def __init__(self, model_name: str, ttl_s: float, owner: str | None = None):
        self.name = f"{model_name}{LOCK_SUFFIX}"
        self.ttl_s = ttl_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self.held = False

    def _create(self) -> bool:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        now = time.time()
        tags = {TAG_OWNER: self.owner, TAG_ACQUIRED: _iso(now), TAG_EXPIRES: f"{now + self.ttl_s:.0f}"}
        try:
            MlflowClient().create_registered_model(
                self.name, tags=tags, description="held by a running `ldm retrain` cycle; not a model"
            )
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            return False
        self.held = True
        return True

    def acquire(self) -> str | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if self._create():
            return None
        client = MlflowClient()
        try:
            tags = client.get_registered_model(self.name).tags
        except MlflowException:  # released between our attempt and this read
            return None if self._create() else self._busy({})
        if float(tags.get(TAG_EXPIRES, "inf")) < time.time():
            print(f"[retrain] taking over the expired lock of {tags.get(TAG_OWNER)}", flush=True)
            try:
                client.delete_registered_model(self.name)
            except MlflowException:
                pass  # another cycle took it over first; the create below tells
            if self._create():
                return None
            tags = client.get_registered_model(self.name).tags
        return self._busy(tags)

    def _busy(self, tags: dict[str, str]) -> str:
        expires = tags.get(TAG_EXPIRES)
        until = _iso(float(expires)) if expires else "?"
        return (
            f"another retraining cycle holds the lock {self.name} (owner {tags.get(TAG_OWNER, '?')}, "
            f"since {tags.get(TAG_ACQUIRED, '?')}, expires {until}): not starting"
        )

    def release(self) -> None:
        """Drop the lock if this cycle still holds it (never another owner's)."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        client = MlflowClient()
        try:
            if client.get_registered_model(self.name).tags.get(TAG_OWNER) == self.owner:
                client.delete_registered_model(self.name)
        except MlflowException:
            pass  # already gone (taken over after expiry and released)
        self.held = False
