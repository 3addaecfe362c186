"""Shared fixtures: a private local Ray instance, offline environment, free ports."""

from __future__ import annotations

import os
import socket

import pytest

# Offline by construction: no hub lookups, no albumentations phone-home, tokenizers quiet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # tests share the cores with Ray workers: ldm/runtime.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray (never joins another cluster on this machine); shared by the session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    # Left running on purpose: Serve and Train tests reuse it; it is torn down at interpreter exit.
