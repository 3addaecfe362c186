"""Starting or joining Ray, one way for every job.

``address=None`` means: join the cluster named by ``RAY_ADDRESS`` when it is set (a job submitted with
`ldm submit` runs inside a cluster), otherwise start a private local instance with ``num_cpus``
(``address="local"``) so that a laptop run never joins somebody else's cluster by accident.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations phones home on import otherwise
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",  # nothing downloads weights at run time
}

# For Ray workers only. Several worker processes share the cores, and OpenMP threads that spin while
# they wait collapse throughput there: an autoencoder step took 2.3-3.2 s instead of 0.5-0.7 s under
# load. The driver keeps libgomp's default (spin briefly, then sleep): it trains the bootstrap's CLIP
# and autoencoder alone on the machine, where PASSIVE cost 20-30% of the step (CLIP 154 against 105-117
# ms, autoencoder 339-389 against 274-286; docs/TRAINING.md, turn 18). OpenMP reads the variable when
# torch loads, so it only changes a process started with it.
WORKER_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def offline_env() -> dict[str, str]:
    """The offline defaults, set in this process where the user has not set them; returns the values.

    A value the user set wins (``HF_HUB_OFFLINE=0`` to reach the hub on purpose, say).
    """
    return {name: os.environ.setdefault(name, default) for name, default in OFFLINE_DEFAULTS.items()}


def worker_env() -> dict[str, str]:
    """What every Ray worker gets: the offline defaults and ``WORKER_DEFAULTS``; a value set here wins."""
    return offline_env() | {name: os.environ.get(name, default) for name, default in WORKER_DEFAULTS.items()}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}  # the same for every Ray worker
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is None or address == "local":
        ray.init(
            address="local",
            num_cpus=num_cpus,
            # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls;
            # without it that cleaner logs a warning every few seconds and can never clean up.
            include_dashboard=True,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env)
