"""The model deployment of the Serve app: one loaded pipeline per replica, batching, health, hot reload.

- Text-to-image requests go through ``@serve.batch``: whatever arrived within ``batch_wait_timeout_s``
  (up to ``max_batch_size``) is grouped by `GenerationRequest.batch_key` and each group of compatible
  requests is ONE `ldm.pipeline.generate_batch` call.
- ``check_health`` runs a one-step generation and fails on non-finite pixels, so Serve replaces a
  replica whose model broke.
- Hot reload (the choice, documented in docs/SERVING.md): a **watcher inside each replica**. When the
  model is ``models:/NAME@ALIAS`` and ``reload_interval_s > 0``, a daemon thread polls the alias; when
  it points at a new version, the thread loads that version next to the current one, probes it with
  the health check and swaps one attribute. A batch pins the model it started with, so in-flight
  requests finish on the old model and none is dropped; a version that fails the probe is never
  swapped in. ``user_config`` carries the swappable settings (model URI, batching, reload interval),
  so ``serve deploy`` with a new config reconfigures replicas in place.
- The device follows the replica's resources (``num_gpus > 0``: CUDA) and the weights are loaded in
  the configured ``dtype`` (float16/bfloat16 on GPU).
"""

import asyncio
import io
import logging
import threading
import time
from typing import Any

from ray import serve

from ldm.request import GenerationRequest
from serve.schemas import Img2ImgRequest, decode_image

logger = logging.getLogger("ray.serve")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@serve.deployment
class Generator:
    """Holds one loaded pipeline per replica; batches compatible requests into one pipeline call."""

    def __init__(self, tracking_uri: str | None = None, torch_threads: int = 1, dtype: str = "float32"):
        import ray
        import torch

        torch.set_num_threads(torch_threads)
        # The device follows the resources Ray gave this replica (num_gpus in its actor options,
        # from ServeConfig or the config file's deployments section), not a separate setting.
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        if tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.device = device
        self.dtype = dtype
        self.loaded: Any = None  # ldm.pipeline.LoadedModel; replaced whole (never mutated) on reload
        self.model_uri: str | None = None
        self.rejected_versions: set[str] = set()
        self._stop_watcher = threading.Event()

    def _load(self, uri: str):
        from ldm.pipeline import load_pipeline

        return load_pipeline(uri, device=self.device, dtype=self.dtype)  # type: ignore[arg-type]

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply ``user_config``: model URI (a new one reloads), batching, reload interval."""
        # `serve.batch`'s wrapper has these setters (Ray's batching guide: dynamic batch parameters).
        self.generate.set_max_batch_size(config["max_batch_size"])
        self.generate.set_batch_wait_timeout_s(config["batch_wait_timeout_s"])
        if self.model_uri != config["model"]:
            self.loaded = self._load(config["model"])
            self.model_uri = config["model"]
        self._stop_watcher.set()
        self._stop_watcher = threading.Event()
        interval = config["reload_interval_s"]
        uri = self.model_uri or ""
        if interval > 0 and uri.startswith("models:/") and "@" in uri:
            threading.Thread(
                target=self._watch, args=(uri, interval, self._stop_watcher), name="ldm-reload", daemon=True
            ).start()

    def _watch(self, uri: str, interval: float, stop: threading.Event) -> None:
        """Poll the alias; load, probe and swap in the version it points at (see the module docstring)."""
        from ldm.pipeline import LoadedModel, check_pipeline
        from ldm.registry import get_alias_version, parse_models_uri

        name, _, alias = parse_models_uri(uri)
        assert alias is not None
        while not stop.wait(interval):
            version = get_alias_version(name, alias)
            if version is None or version == self.loaded.version or version in self.rejected_versions:
                continue
            try:
                candidate = self._load(f"models:/{name}/{version}")
                check_pipeline(candidate.pipe)
            except Exception as error:  # keep serving the current model; do not retry this version
                self.rejected_versions.add(version)
                logger.warning("hot reload: %s version %s refused: %s", name, version, error)
                continue
            if stop.is_set():  # reconfigured to another model while this one was loading
                return
            old = self.loaded.version
            self.loaded = LoadedModel(pipe=candidate.pipe, name=name, version=version, uri=uri)
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
        """The loaded model: name, version, URI, default image side and the multiple sides must be."""
        from ldm.pipeline import output_size, size_multiple

        pipe = self.loaded.pipe
        return {
            "name": self.loaded.name,
            "version": self.loaded.version,
            "uri": self.loaded.uri,
            "size": output_size(pipe),
            "size_multiple": size_multiple(pipe),
            "dtype": self.dtype,
            "device": self.device,
        }

    def _answer(self, loaded, request: GenerationRequest, images, seed: int, batch: dict[str, int]):
        return {
            "images": [png_bytes(image) for image in images],
            "seed": seed,
            "model": {"name": loaded.name, "version": loaded.version},
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": request.guidance_scale,
            "scheduler": request.scheduler,
            "batch": batch,
        }

    # Defaults only: reconfigure sets the configured max_batch_size and batch_wait_timeout_s.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def generate(self, requests: list[GenerationRequest]) -> list[dict[str, Any]]:
        """One call per request for the caller; one pipeline call per group of compatible requests."""
        from ldm.pipeline import generate_batch

        loaded = self.loaded  # pinned: a hot reload during this batch does not change its model
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(index)
        answers: list[dict[str, Any]] = [{} for _ in requests]
        for indices in groups.values():
            group = [requests[i] for i in indices]
            started = time.perf_counter()
            # A worker thread, so the event loop keeps collecting the next batch and answering health
            # checks while the pipeline runs.
            results = await asyncio.to_thread(generate_batch, loaded.pipe, group)
            elapsed = round(time.perf_counter() - started, 3)
            batch = {"requests": len(group), "images": sum(request.num_images for request in group)}
            for index, request, result in zip(indices, group, results, strict=True):
                answer = self._answer(loaded, request, result.images, result.seed, batch)
                answers[index] = {**answer, "elapsed_s": elapsed}
        return answers

    async def img2img(self, request: Img2ImgRequest) -> dict[str, Any]:
        from ldm.pipeline import generate_img2img

        loaded = self.loaded
        image = decode_image(request.init_image, max_pixels=None)  # checked by the ingress
        started = time.perf_counter()
        result = await asyncio.to_thread(generate_img2img, loaded.pipe, image, request)
        batch = {"requests": 1, "images": len(result.images)}
        answer = self._answer(loaded, request, result.images, result.seed, batch)
        return {**answer, "strength": request.strength, "elapsed_s": round(time.perf_counter() - started, 3)}
