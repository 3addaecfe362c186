"""The Ray Serve application builder: a thin HTTP adapter over `ldm.pipeline` (STYLE.md 8).

Two deployments and a typed builder, the shape of Ray's own Stable Diffusion example:

- `serve.http.Ingress` (FastAPI, no CPU reserved): validates, authenticates, translates (the project's
  API and OpenAI's images API) and encodes;
- `serve.generator.Generator`: one loaded pipeline per replica, dynamic batching, health check, hot
  reload of a ``models:/NAME@ALIAS`` model;
- `build_app(cfg)`: typed `ServeConfig` in, bound application out (``serve run serve.app:build_app``,
  or ``infra/serve/serve-config.yaml``, whose ``deployments:`` section overrides the replica,
  autoscaling, queue, health-check and resource options set here); `run_serve(cfg)` starts Ray Serve
  and deploys it (``ldm serve``).
"""

# No `from __future__ import annotations` here: Ray reads the builder's `ServeConfig` annotation as a
# class to validate the YAML ``args:`` with it.
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Deployment

from ldm import storage
from ldm.config.serve import ServeConfig
from serve.generator import Generator
from serve.http import Ingress

APP_NAME = "ldm"
API_KEY_ENV = "LDM_API_KEY"
# `@serve.deployment` turns each class into a Deployment, but Ray annotates the bare decorator as
# returning a decorator, so type checkers still see the class: say what they are.
GENERATOR = cast(Deployment, Generator)
INGRESS = cast(Deployment, Ingress)


def _absolute_model_uri(model: str) -> str:
    """Local model folders as absolute paths: replicas need not share the caller's working directory."""
    if "://" in model or model.startswith(("models:/", "runs:/")):
        return model
    return str(Path(model).resolve())


def generator_options(cfg: ServeConfig) -> dict[str, Any]:
    """The model deployment's Ray options from ``cfg``: replicas or autoscaling, queue, health, resources.

    Also what `serve.deploy_config` writes into the ``deployments:`` section of the serve config file.
    """
    options: dict[str, Any]
    if cfg.min_replicas == cfg.max_replicas:
        options = {"num_replicas": cfg.max_replicas}
    else:
        options = {
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
                "upscale_delay_s": cfg.upscale_delay_s,
                "downscale_delay_s": cfg.downscale_delay_s,
                "look_back_period_s": cfg.look_back_period_s,
            }
        }
    return options | {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "ray_actor_options": {"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus},
    }


def build_app(cfg: ServeConfig) -> serve.Application:
    """The application builder: typed config in, bound Serve application out.

    Ray validates the ``args:`` of a Serve config file into `ServeConfig` through this signature.
    """
    from ldm.tracking import tracking_uri

    options = generator_options(cfg)
    # Replicas do not see variables set in the driver after `ray.init`: an s3:// model needs this
    # process's S3 settings (as the ingest tasks and actors get them, `ldm.storage.s3_ray_options`).
    # Kept out of `generator_options`, which is written into serve config files: no credentials in a file.
    options["ray_actor_options"] = options["ray_actor_options"] | storage.s3_ray_options()
    generator = GENERATOR.options(
        user_config={
            "model": _absolute_model_uri(cfg.model),
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "reload_interval_s": cfg.reload_interval_s,
        },
        **options,
    ).bind(tracking_uri(Path(cfg.workdir).resolve()), cfg.torch_threads, cfg.dtype)
    key = os.environ.get(API_KEY_ENV)
    key_digest = hashlib.sha256(key.encode()).hexdigest() if key else None
    defaults = {
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
    }
    return INGRESS.options(user_config=defaults).bind(
        generator, key_digest, cfg.max_body_bytes, cfg.max_init_image_pixels
    )


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_serve(cfg: ServeConfig, block: bool = True, name: str = APP_NAME) -> str:
    """Deploy the app on Ray Serve as application ``name``; returns the base URL.

    Starts Serve's HTTP proxy when it is not running yet (with ``host``/``port``/``request_timeout_s``
    of ``cfg``); a second application joins the running proxy under its own ``route_prefix``.
    ``block`` waits for Ctrl-C, then shuts Serve down.
    """
    from ldm.runtime import ensure_ray

    ensure_ray(cfg.ray_address, cfg.num_cpus)
    port = _running_http_port()
    if port is None:
        port = cfg.port or _free_port(cfg.host)
        serve.start(http_options={"host": cfg.host, "port": port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name=name, route_prefix=cfg.route_prefix, blocking=False)
    url_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base_url = f"http://{url_host}:{port}{cfg.route_prefix.rstrip('/')}"
    if block:
        print(f"serving {cfg.model} at {base_url}/v1/generate (health: {base_url}/healthz); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            shutdown_serve()
    return base_url


def _running_http_port() -> int | None:
    """The port of the running Serve HTTP proxy, or None when Serve is not running."""
    from ray.serve.context import _get_global_client

    # A private helper of Ray's: the public API has no "is Serve running, on which port" call.
    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.http_config.port


def shutdown_serve() -> None:
    """Stop every Serve application and the HTTP proxy (Ray itself keeps running)."""
    serve.shutdown()
