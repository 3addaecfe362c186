"""The Ray Serve application: a thin HTTP adapter over `ldm.pipeline.generate` (STYLE.md 8).

Two deployments and an application builder, the shape of Ray's own Stable Diffusion example:

- ``Ingress`` (FastAPI, no CPU reserved): checks the API key, validates the request with
  `GenerateRequest` (bad input is a 422 naming the field, never a 500), fills in the server's
  defaults and turns the result into JSON (base64 PNGs) or raw PNG bytes;
- ``Generator``: loads the model once per replica and calls `generate`; it autoscales between
  ``min_replicas`` and ``max_replicas`` and sheds load with Ray's backpressure (``max_queued_requests``)
  so an overloaded service answers 503 at once and keeps serving afterwards;
- `build_app(cfg)` wires them from a typed `ServeConfig`; `run_serve(cfg)` starts Ray Serve.

Swappable settings travel as ``user_config`` (``reconfigure``): the model URI of ``Generator`` (a new
URI reloads the model in place) and the generation defaults of ``Ingress``.

API (CONTRACT.md): ``POST /v1/generate``, ``GET /healthz``; with ``LDM_API_KEY`` set, every route but
``/healthz`` needs ``Authorization: Bearer <key>``. The key is read when the app is built and only its
SHA-256 digest travels to the replicas, so the secret itself is never part of a deployment's config.
"""

import base64
import hashlib
import hmac
import io
import os
import socket
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ldm.config.serve import ServeConfig
from ldm.pipeline import MAX_SEED

APP_NAME = "ldm"
API_KEY_ENV = "LDM_API_KEY"
MAX_PROMPT_CHARS = 2000


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``; fields left out (None) take the server's defaults."""

    # strict: "5" is not a step count and true is not a seed; extra: a misspelt field is an error.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1, le=8)
    scheduler: Literal["ddim", "dpmpp", "euler"] | None = None

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt must not be blank")
        return prompt


api = FastAPI(title="ldm text-to-image", version="1")


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@api.middleware("http")
async def _require_api_key(request: Request, call_next):
    """401 unless the bearer token matches; /healthz stays open for load balancers and probes."""
    expected: str | None = getattr(request.app.state, "api_key_sha256", None)
    if expected is None or request.url.path.rstrip("/").endswith("/healthz"):
        return await call_next(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    provided = hashlib.sha256(token.strip().encode()).hexdigest() if scheme.lower() == "bearer" else ""
    # Digests of equal length, compared in constant time: the response time says nothing about the key.
    if not hmac.compare_digest(provided, expected):
        return JSONResponse(
            {"detail": "missing or wrong API key"}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
        )
    return await call_next(request)


def _overloaded() -> JSONResponse:
    return JSONResponse(
        {"detail": "server overloaded, retry later"}, status_code=503, headers={"Retry-After": "1"}
    )


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, max_queued_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, api_key_sha256: str | None = None):
        self.generator = generator
        api.state.api_key_sha256 = api_key_sha256
        self.defaults: dict[str, Any] = {}
        self.last_model: dict[str, Any] | None = None

    def reconfigure(self, defaults: dict[str, Any]) -> None:
        """Defaults for omitted request fields: num_inference_steps, guidance_scale, scheduler."""
        self.defaults = dict(defaults)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            self.last_model = await self.generator.info.remote()
        except BackPressureError:
            if self.last_model is None:  # never reached the model yet: not healthy
                return _overloaded()
        return JSONResponse({"status": "ok", "model": self.last_model})

    @api.post("/v1/generate", response_model=None)
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        options = body.model_dump()
        for key, value in self.defaults.items():
            if options.get(key) is None:
                options[key] = value
        wants_png = "image/png" in request.headers.get("accept", "")
        if (
            wants_png
            and body.num_images > 1
            and not any(kind in request.headers.get("accept", "") for kind in ("application/json", "*/*"))
        ):
            return JSONResponse(
                {"detail": "Accept: image/png returns one image; ask for num_images=1 or accept JSON"},
                status_code=406,
            )
        try:
            result = await self.generator.generate.remote(options)
        except BackPressureError:
            return _overloaded()
        if wants_png and len(result["images"]) == 1:
            headers = {"X-Seed": str(result["seed"]), "X-Model-Name": str(result["model"]["name"])}
            headers["X-Model-Version"] = str(result["model"]["version"])
            return Response(result["images"][0], media_type="image/png", headers=headers)
        images = [base64.b64encode(png).decode("ascii") for png in result.pop("images")]
        return JSONResponse({"images": images, **result})


@serve.deployment
class Generator:
    """Holds one loaded pipeline per replica; `generate` is a plain call of `ldm.pipeline.generate`."""

    def __init__(self, tracking_uri: str | None = None, torch_threads: int = 1, device: str = "cpu"):
        import torch

        torch.set_num_threads(torch_threads)
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.device = device
        self.loaded = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Load ``config["model"]``; a changed URI (`serve deploy` with a new user_config) reloads."""
        from ldm.pipeline import load_pipeline

        if self.loaded is None or self.loaded.uri != config["model"]:
            self.loaded = load_pipeline(config["model"], device=self.device)

    def info(self) -> dict[str, Any]:
        return {"name": self.loaded.name, "version": self.loaded.version, "uri": self.loaded.uri}

    def generate(self, options: dict[str, Any]) -> dict[str, Any]:
        from ldm.pipeline import generate

        started = time.perf_counter()
        result = generate(self.loaded.pipe, options.pop("prompt"), **options)
        return {
            "images": [_png_bytes(image) for image in result.images],
            "seed": result.seed,
            "model": {"name": self.loaded.name, "version": self.loaded.version},
            "num_inference_steps": options["num_inference_steps"],
            "guidance_scale": options["guidance_scale"],
            "scheduler": options["scheduler"],
            "elapsed_s": round(time.perf_counter() - started, 3),
        }


def _absolute_model_uri(model: str) -> str:
    """Local model folders as absolute paths: replicas need not share the caller's working directory."""
    if "://" in model or model.startswith(("models:/", "runs:/")):
        return model
    return str(Path(model).resolve())


def build_app(cfg: ServeConfig) -> serve.Application:
    """The application builder: typed config in, bound Serve application out."""
    from ldm.tracking import tracking_uri

    scaling: dict[str, Any]
    if cfg.min_replicas == cfg.max_replicas:
        scaling = {"num_replicas": cfg.max_replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
                "upscale_delay_s": cfg.upscale_delay_s,
                "downscale_delay_s": cfg.downscale_delay_s,
            }
        }
    generator = Generator.options(
        ray_actor_options={"num_cpus": cfg.replica_num_cpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        user_config={"model": _absolute_model_uri(cfg.model)},
        **scaling,
    ).bind(tracking_uri(Path(cfg.workdir).resolve()), cfg.torch_threads, cfg.device)
    key = os.environ.get(API_KEY_ENV)
    key_digest = hashlib.sha256(key.encode()).hexdigest() if key else None
    defaults = {
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
    }
    return Ingress.options(user_config=defaults).bind(generator, key_digest)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_serve(cfg: ServeConfig, block: bool = True) -> str:
    """Deploy the app on Ray Serve; returns the base URL. ``block`` waits for Ctrl-C, then shuts down."""
    from ldm.runtime import ensure_ray

    ensure_ray(cfg.ray_address, cfg.num_cpus)
    port = cfg.port or _free_port(cfg.host)
    serve.start(http_options={"host": cfg.host, "port": port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
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


def shutdown_serve() -> None:
    """Stop every Serve application and the HTTP proxy (Ray itself keeps running)."""
    serve.shutdown()
