"""`ldm submit` and `ldm jobs`: run ingest/train/eval/retrain on a Ray cluster through the Ray Jobs API.

The job's config is validated here, on the submitting machine, and shipped as explicit ``--set``
overrides on the entrypoint, so the cluster runs exactly the config that was checked, and the job's
log shows it. Authentication is Ray's own: ``JobSubmissionClient`` adds the bearer token from
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` when token auth is on
(``RAY_AUTH_MODE=token``); this module never reads, prints or logs the token itself.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ldm.errors import LdmError

SUBMITTABLE = ("ingest", "train", "eval", "retrain")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class ClusterError(LdmError):
    """The Jobs API refused or could not be reached: wrong or missing token, wrong address."""


@contextlib.contextmanager
def cluster_errors(address: str) -> Iterator[None]:
    """Turn Ray's authentication and connection failures into one `ClusterError` line.

    Ray's own message says whether the token was missing (401) or wrong (403); it never contains the
    token, and neither does this one.
    """
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as error:
        detail = " ".join(str(error).split())
        raise ClusterError(
            f"{address} refused the request: {detail} Set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, "
            "~/.ray/auth_token) to the cluster's token and RAY_AUTH_MODE=token."
        ) from None
    except ConnectionError as error:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {error}") from None


def config_class(job: str) -> type:
    if job == "ingest":
        from ldm.config.ingest import IngestConfig

        return IngestConfig
    if job == "train":
        from ldm.config.train import TrainConfig

        return TrainConfig
    if job == "eval":
        from ldm.config.eval import EvalConfig

        return EvalConfig
    if job == "retrain":
        from ldm.config.retrain import RetrainConfig

        return RetrainConfig
    raise ValueError(f"cannot submit {job!r}: choose one of {', '.join(SUBMITTABLE)}")


def entrypoint(job: str, config: Any, python: str = "python") -> str:
    """The shell command the cluster runs: ``python -m ldm.cli JOB --set k=v ...`` for every field."""
    parts = [python, "-m", "ldm.cli", job]
    for key, value in _leaves(config.to_dict()):
        # JSON is YAML, so strings stay strings ("true", "1") when `--set` parses them back.
        parts += ["--set", f"{key}={json.dumps(value)}"]
    return " ".join(shlex.quote(part) for part in parts)


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Dotted key -> value for every non-None leaf (lists stay values)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, dotted + ".")
        elif value is not None:
            yield dotted, value


def client(address: str):
    """A `JobSubmissionClient`; it reads the token as Ray does (connecting checks it at once)."""
    from ray.job_submission import JobSubmissionClient

    with cluster_errors(address):
        return JobSubmissionClient(address)


def submit(
    job: str,
    address: str,
    config: Any,
    *,
    working_dir: str | None = None,
    env_vars: dict[str, str] | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    submission_id: str | None = None,
    python: str = "python",
) -> str:
    """Submit ``job`` with ``config``; returns the submission id."""
    runtime_env: dict[str, Any] = {
        "env_vars": {
            "HF_HUB_OFFLINE": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            # The job's driver calls ray.init with its own runtime_env (`ldm.runtime.ensure_ray`);
            # Ray refuses two runtime_envs that set the same variable unless told to merge them.
            "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1",
            **(env_vars or {}),
        }
    }
    if working_dir:
        if not Path(working_dir).is_dir():
            raise FileNotFoundError(f"--working-dir {working_dir} is not a folder")
        runtime_env["working_dir"] = working_dir
        runtime_env["excludes"] = [".venv", ".git", "ldm-demo", "**/__pycache__", "*.db", "mlartifacts"]
    submission_id = submission_id or f"ldm-{job}-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs = client(address)
    with cluster_errors(address):
        return jobs.submit_job(
            entrypoint=entrypoint(job, config, python),
            submission_id=submission_id,
            runtime_env=runtime_env,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            metadata={"ldm.job": job},
        )


def follow(address: str, submission_id: str, timeout_s: float = 3600, echo=print) -> str:
    """Stream the job's logs until it ends; returns its final status name."""
    import asyncio

    jobs = client(address)

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(submission_id):
            echo(lines, end="")

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except TimeoutError:
        echo(f"\n(stopped following {submission_id} after {timeout_s:.0f} s; the job goes on)")
    return wait(address, submission_id, timeout_s=60)


def wait(address: str, submission_id: str, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(jobs.get_job_status(submission_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def list_jobs(address: str) -> Iterable[dict[str, Any]]:
    for info in client(address).list_jobs():
        yield {
            "submission_id": info.submission_id,
            "status": str(info.status.value),
            "entrypoint": info.entrypoint[:120],
            "start_time": info.start_time,
            "end_time": info.end_time,
        }
