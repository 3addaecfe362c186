"""Config of `ldm serve`: which model, where to listen, how to batch, scale, queue and reload.

It is also the typed argument of the Serve application builder (`serve.app.build_app`). In
``infra/serve/serve-config.yaml`` the application settings are its ``args:``, while replicas,
autoscaling, queueing, health checks and actor resources sit in the file's ``deployments:`` section,
where Ray users override them (Ray applies those over what the builder sets from these fields).

The API key is deliberately not here: configs are dumped and logged, a secret must not be. The server
reads it from ``LDM_API_KEY``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ldm.config.base import ConfigBase
from ldm.request import MAX_GUIDANCE, MAX_STEPS, SchedulerName


class ServeConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    model: str = "models:/ldm@champion"  # local folder, s3:// folder, models:/NAME@ALIAS, runs:/...
    # Weights' dtype in the model replicas. The device follows the replica's resources: a replica with
    # GPUs (replica_num_gpus > 0, or ray_actor_options.num_gpus in the serve config file) runs on
    # CUDA, otherwise on the CPU. float16 needs a GPU (an error otherwise, never a silent fallback);
    # bfloat16 runs on both (slowly on the CPU).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    # HTTP (Ray Serve's proxy). port 0 picks a free port (the base URL is returned and printed).
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = "/"
    # Past this the proxy answers 408 and cancels the request.
    request_timeout_s: float = Field(120.0, gt=0)
    # Bodies over this are refused with 413 before they are parsed (an img2img init image is the
    # largest legitimate body: a 2048 x 2048 PNG in base64 is well under 16 MiB).
    max_body_bytes: int = Field(16 * 2**20, ge=1024)
    # img2img init images with more pixels than this are a 422 (decompression bombs).
    max_init_image_pixels: int = Field(2048 * 2048, ge=64)

    # Dynamic batching (`@serve.batch`): requests that share steps, guidance, scheduler and size run
    # as one pipeline call. A batch closes when max_batch_size requests are in or batch_wait_timeout_s
    # has passed since the first one. max_batch_size 1 turns batching off.
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)

    # Model replicas: autoscaling between min and max on ongoing requests per replica. Ray's default
    # delays (30 s up, 600 s down) are far too slow for a small service (docs/TRAPS.md).
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(2.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    # Window the autoscaler averages the load over; Ray wants it above its metrics push interval
    # (10 s unless RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S say otherwise).
    look_back_period_s: float = Field(15.0, gt=0)
    # Backpressure: past max_ongoing_requests x replicas + max_queued_requests, callers get 503 at once.
    # Ray's default queue is unlimited (a slow death under load), so it is always set here.
    max_ongoing_requests: int = Field(4, ge=1)
    max_queued_requests: int = Field(8, ge=0)
    replica_num_cpus: float = Field(1.0, gt=0)
    replica_num_gpus: float = Field(0.0, ge=0)
    torch_threads: int = Field(1, ge=1)  # per replica; CPU replicas should not fight over cores
    # check_health runs a one-step generation and fails on non-finite pixels (a broken model).
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)

    # Hot reload: with a models:/NAME@ALIAS model, every replica polls the alias this often and
    # switches to the version it points at (0 turns polling off).
    reload_interval_s: float = Field(30.0, ge=0)

    # Defaults for request fields the client leaves out.
    num_inference_steps: int = Field(25, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(4.0, ge=0.0, le=MAX_GUIDANCE)
    scheduler: SchedulerName = "dpmpp"

    # Ray: None joins RAY_ADDRESS if set, else starts a private local Ray with num_cpus.
    ray_address: str | None = None
    num_cpus: int | None = 2

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.dtype == "float16" and self.replica_num_gpus == 0:
            raise ValueError("dtype float16 needs GPU replicas (replica_num_gpus > 0); on CPU use float32")
        if self.max_batch_size > self.max_ongoing_requests:
            # A replica never holds more than max_ongoing_requests, so a larger batch never fills.
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) > max_ongoing_requests ({self.max_ongoing_requests})"
            )
        return self
