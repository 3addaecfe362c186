"""The Ray Serve application: a thin HTTP adapter over `ldm.pipeline` (STYLE.md 8).

Two deployments and an application builder, the shape of Ray's own Stable Diffusion example:

- ``Ingress`` (FastAPI, no CPU reserved): refuses oversized bodies (413), checks the API key (401),
  validates the request with `serve.schemas` (bad input is a 422 naming the field, never a 500),
  fills in the server's defaults and turns results into JSON (base64 PNGs) or raw PNG bytes;
- ``Generator``: one loaded pipeline per replica. Text-to-image requests go through ``@serve.batch``:
  whatever arrived within ``batch_wait_timeout_s`` (up to ``max_batch_size``) is grouped by
  `GenerationRequest.batch_key` and each group of compatible requests is ONE `generate_batch` call.
  It autoscales between ``min_replicas`` and ``max_replicas``, sheds load with Ray's backpressure
  (``max_queued_requests``: 503 at once, never a hang) and has a ``check_health`` that runs a one-step
  generation and fails on non-finite pixels, so Serve replaces a replica whose model broke;
- `build_app(cfg)`: the typed application builder (``serve run serve.app:build_app``, or
  ``infra/serve/serve-config.yaml``); `run_serve(cfg)` starts Ray Serve and deploys it.

Hot reload (the choice, documented in docs/SERVING.md): a **watcher inside each Generator replica**.
When the model is ``models:/NAME@ALIAS`` and ``reload_interval_s > 0``, a daemon thread polls the alias;
when it points at a new version, the thread loads that version next to the current one, probes it with
the health check and swaps one attribute. A batch pins the model it started with, so in-flight
requests finish on the old model and none is dropped; a version that fails the probe is never
swapped in. This needs nothing from the job that moves the alias (no redeploy, no Serve API access);
the price is up to ``reload_interval_s`` of lag and one MLflow query per interval per replica.
``user_config`` still carries the swappable settings (model URI, batching, reload interval, request
defaults), so ``serve deploy`` with a new config reconfigures replicas in place.

Auth: with ``LDM_API_KEY`` set, every route but ``/healthz`` needs ``Authorization: Bearer <key>``.
The key is read when the app is built and only its SHA-256 digest travels to the replicas.
"""

# No `from __future__ import annotations` here: Ray reads the builder's `ServeConfig` annotation as a
# class to validate the YAML ``args:`` with it.
import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ldm.config.serve import ServeConfig
from serve.schemas import GenerateRequest, Img2ImgRequest, decode_image

APP_NAME = "ldm"
API_KEY_ENV = "LDM_API_KEY"

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="ldm text-to-image",
    version="1",
    description="Text-to-image and image-to-image with a latent diffusion model served by Ray Serve. "
    "With LDM_API_KEY set on the server, every route but /healthz needs `Authorization: Bearer <key>`.",
)


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _field_error(field: str, message: str) -> JSONResponse:
    """A 422 shaped like FastAPI's own validation errors, for checks that need the server's state."""
    detail = [{"type": "value_error", "loc": ["body", field], "msg": message}]
    return JSONResponse({"detail": detail}, status_code=422)


def _overloaded() -> JSONResponse:
    return JSONResponse(
        {"detail": "server overloaded, retry later"}, status_code=503, headers={"Retry-After": "1"}
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    """FastAPI's 422, minus the echoed input, with ASCII-escaped JSON.

    The default handler echoes each bad value back (a 16 MiB init image, say) and encodes the body as
    UTF-8, which fails with a 500 on a lone surrogate ("\\ud800" is valid JSON but not valid UTF-8).
    """
    detail = [{"type": item["type"], "loc": list(item["loc"]), "msg": item["msg"]} for item in error.errors()]
    return Response(json.dumps({"detail": detail}), status_code=422, media_type="application/json")


@api.middleware("http")
async def _guard(request: Request, call_next):
    """413 for oversized bodies, then 401 unless the bearer token matches (/healthz stays open)."""
    limit: int | None = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length", "")
    if limit is not None and length.isdigit() and int(length) > limit:
        return JSONResponse({"detail": f"body larger than {limit} bytes"}, status_code=413)
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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256, max_queued_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        generator: DeploymentHandle,
        api_key_sha256: str | None = None,
        max_body_bytes: int | None = None,
        max_init_image_pixels: int | None = None,
    ):
        self.generator = generator
        api.state.api_key_sha256 = api_key_sha256
        api.state.max_body_bytes = max_body_bytes
        self.max_init_image_pixels = max_init_image_pixels
        self.defaults: dict[str, Any] = {}
        self.last_model: dict[str, Any] | None = None

    def reconfigure(self, defaults: dict[str, Any]) -> None:
        """Defaults for omitted request fields: num_inference_steps, guidance_scale, scheduler."""
        self.defaults = dict(defaults)

    def _options(self, body: GenerateRequest) -> dict[str, Any]:
        options = body.model_dump()
        for key, value in self.defaults.items():
            if options.get(key) is None:
                options[key] = value
        return options

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 with the loaded model's name and version; 503 when no model replica answers."""
        try:
            self.last_model = await self.generator.info.remote()
        except BackPressureError:
            if self.last_model is None:  # never reached the model yet: not healthy
                return _overloaded()
        except Exception as error:  # a dead or failing model deployment: report it, do not 500
            return JSONResponse({"status": "unavailable", "detail": type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.last_model})

    @api.post("/v1/generate", response_model=None)
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        """Text to image. JSON: {images: [base64 PNG], seed, model, batch, ...}; or PNG bytes (Accept)."""
        accept = request.headers.get("accept", "")
        if "image/png" in accept and body.num_images > 1 and "json" not in accept and "*/*" not in accept:
            return JSONResponse(
                {"detail": "Accept: image/png returns one image; ask for num_images=1 or accept JSON"},
                status_code=406,
            )
        return await self._call(self.generator.generate, self._options(body), accept)

    @api.post("/v1/img2img", response_model=None)
    async def img2img(self, body: Img2ImgRequest, request: Request) -> Response:
        """Image to image: the init image noised to `strength`, then denoised toward the prompt."""
        options = self._options(body)
        try:
            decode_image(body.init_image, self.max_init_image_pixels)
        except ValueError as error:
            return _field_error("init_image", str(error))
        if int(options["num_inference_steps"] * body.strength) < 1:
            return _field_error("strength", "strength x num_inference_steps leaves no denoising step")
        accept = request.headers.get("accept", "")
        if "image/png" in accept and body.num_images > 1 and "json" not in accept and "*/*" not in accept:
            return JSONResponse({"detail": "Accept: image/png returns one image"}, status_code=406)
        return await self._call(self.generator.img2img, options, accept)

    async def _call(self, method, options: dict[str, Any], accept: str) -> Response:
        try:
            result = await method.remote(options)
        except BackPressureError:
            return _overloaded()
        except ValueError as error:  # the pipeline refused an argument the schema let through
            return JSONResponse({"detail": str(error)}, status_code=422)
        if "image/png" in accept and len(result["images"]) == 1:
            headers = {
                "X-Seed": str(result["seed"]),
                "X-Model-Name": str(result["model"]["name"]),
                "X-Model-Version": str(result["model"]["version"]),
                "X-Batch-Size": str(result["batch"]["requests"]),
            }
            return Response(result["images"][0], media_type="image/png", headers=headers)
        images = [base64.b64encode(png).decode("ascii") for png in result.pop("images")]
        return JSONResponse({"images": images, **result})


@serve.deployment
class Generator:
    """Holds one loaded pipeline per replica; batches compatible requests into one pipeline call."""

    def __init__(self, tracking_uri: str | None = None, torch_threads: int = 1, device: str = "cpu"):
        import torch

        torch.set_num_threads(torch_threads)
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.device = device
        self.loaded = None  # ldm.pipeline.LoadedModel; replaced whole (never mutated) on reload
        self.model_uri: str | None = None
        self.rejected_versions: set[str] = set()
        self._stop_watcher = threading.Event()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``user_config``: model URI (a new one reloads), batching, reload interval."""
        from ldm.pipeline import load_pipeline

        self.generate.set_max_batch_size(config["max_batch_size"])
        self.generate.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])
        if self.model_uri != config["model"]:
            self.loaded = load_pipeline(config["model"], device=self.device)
            self.model_uri = config["model"]
        self._stop_watcher.set()
        self._stop_watcher = threading.Event()
        interval = config["reload_interval_s"]
        if interval > 0 and self.model_uri.startswith("models:/") and "@" in self.model_uri:
            threading.Thread(
                target=self._watch, args=(interval, self._stop_watcher), name="ldm-reload", daemon=True
            ).start()

    def _watch(self, interval: float, stop: threading.Event) -> None:
        """Poll the alias; load, probe and swap in the version it points at (see the module docstring)."""
        from ldm.pipeline import LoadedModel, check_pipeline, load_pipeline
        from ldm.registry import get_alias_version, parse_models_uri

        name, _, alias = parse_models_uri(self.model_uri)
        while not stop.wait(interval):
            version = get_alias_version(name, alias)
            if version is None or version == self.loaded.version or version in self.rejected_versions:
                continue
            try:
                candidate = load_pipeline(f"models:/{name}/{version}", device=self.device)
                check_pipeline(candidate.pipe)
            except Exception as error:  # keep serving the current model; do not retry this version
                self.rejected_versions.add(version)
                logger.warning("hot reload: %s version %s refused: %s", name, version, error)
                continue
            if stop.is_set():  # reconfigured to another model while this one was loading
                return
            old = self.loaded.version
            self.loaded = LoadedModel(pipe=candidate.pipe, name=name, version=version, uri=self.model_uri)
            logger.info("hot reload: %s@%s moved from version %s to %s", name, alias, old, version)

    def __del__(self):
        self._stop_watcher.set()

    async def check_health(self) -> None:
        """Raise (so Serve restarts this replica) unless a one-step generation gives finite pixels."""
        from ldm.pipeline import check_pipeline

        if self.loaded is None:
            raise RuntimeError("no model loaded")
        # In a worker thread: the replica's event loop keeps taking requests while the probe runs.
        await asyncio.to_thread(check_pipeline, self.loaded.pipe)

    def info(self) -> dict[str, Any]:
        return {"name": self.loaded.name, "version": self.loaded.version, "uri": self.loaded.uri}

    def _model(self, loaded) -> dict[str, Any]:
        return {"name": loaded.name, "version": loaded.version}

    # Defaults only: reconfigure sets the configured max_batch_size and batch_wait_timeout_s.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One call per request for the caller; one pipeline call per group of compatible requests."""
        from ldm.pipeline import GenerationRequest, generate_batch

        loaded = self.loaded  # pinned: a hot reload during this batch does not change its model
        requests = [GenerationRequest(**options) for options in batch]
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(index)
        answers: list[dict[str, Any]] = [{} for _ in batch]
        for indices in groups.values():
            group = [requests[i] for i in indices]
            started = time.perf_counter()
            # A worker thread, so the event loop keeps collecting the next batch and answering health
            # checks while the pipeline runs.
            results = await asyncio.to_thread(generate_batch, loaded.pipe, group)
            elapsed = round(time.perf_counter() - started, 3)
            images_in_call = sum(request.num_images for request in group)
            for index, request, result in zip(indices, group, results, strict=True):
                answers[index] = {
                    "images": [_png_bytes(image) for image in result.images],
                    "seed": result.seed,
                    "model": self._model(loaded),
                    "num_inference_steps": request.num_inference_steps,
                    "guidance_scale": request.guidance_scale,
                    "scheduler": request.scheduler,
                    "batch": {"requests": len(group), "images": images_in_call},
                    "elapsed_s": elapsed,
                }
        return answers

    async def img2img(self, options: dict[str, Any]) -> dict[str, Any]:
        from ldm.pipeline import generate_img2img

        loaded = self.loaded
        init_image = decode_image(options.pop("init_image"), max_pixels=None)  # checked by the ingress
        prompt = options.pop("prompt")
        started = time.perf_counter()
        result = await asyncio.to_thread(generate_img2img, loaded.pipe, init_image, prompt, **options)
        return {
            "images": [_png_bytes(image) for image in result.images],
            "seed": result.seed,
            "model": self._model(loaded),
            "num_inference_steps": options["num_inference_steps"],
            "guidance_scale": options["guidance_scale"],
            "scheduler": options["scheduler"],
            "strength": options["strength"],
            "batch": {"requests": 1, "images": len(result.images)},
            "elapsed_s": round(time.perf_counter() - started, 3),
        }


def _absolute_model_uri(model: str) -> str:
    """Local model folders as absolute paths: replicas need not share the caller's working directory."""
    if "://" in model or model.startswith(("models:/", "runs:/")):
        return model
    return str(Path(model).resolve())


def build_app(cfg: ServeConfig) -> serve.Application:
    """The application builder: typed config in, bound Serve application out.

    Ray validates the ``args:`` of a Serve config file into `ServeConfig` through this signature.
    """
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
                "look_back_period_s": cfg.look_back_period_s,
            }
        }
    generator = Generator.options(
        ray_actor_options={"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        user_config={
            "model": _absolute_model_uri(cfg.model),
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "reload_interval_s": cfg.reload_interval_s,
        },
        **scaling,
    ).bind(tracking_uri(Path(cfg.workdir).resolve()), cfg.torch_threads, cfg.device)
    key = os.environ.get(API_KEY_ENV)
    key_digest = hashlib.sha256(key.encode()).hexdigest() if key else None
    defaults = {
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
    }
    return Ingress.options(user_config=defaults).bind(
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
