"""`ldm demo`: the whole system once, on the embedded default, in one work directory.

A short recipe over the same job functions the CLI runs one by one: render the synthetic source and
serve it on 127.0.0.1, bootstrap the first-stage models, ingest over real HTTP, train on Ray Train,
register and evaluate, serve with Ray Serve, and call the endpoint for a few prompts. Each stage
prints its progress and its wall time; the summary at the end says where everything is.

The demo reaches the server only over HTTP and through the two functions the caller hands it
(`ldm.cli` passes `serve.app.run_serve`/`shutdown_serve`): `pipelines` never imports `serve`.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ldm.config.demo import DemoConfig
from ldm.config.serve import ServeConfig
from ldm.config.train import TrainConfig
from ldm.contract import Manifest, WorkDir

T = TypeVar("T")
StartServer = Callable[[ServeConfig], str]  # deploys the app, returns its base URL without blocking
StopServer = Callable[[], None]


class StageClock:
    """Prints a header per stage and remembers how long each one took."""

    def __init__(self, total: int):
        self.total = total
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], T]) -> T:
        index = len(self.times) + 1
        print(f"\n=== [{index}/{self.total}] {name} ===", flush=True)
        start = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - start
        print(f"=== {name}: done in {self.times[name]:.0f} s ===", flush=True)
        return result


def fit_training_to_budget(train: TrainConfig, cfg: DemoConfig, elapsed_s: float) -> TrainConfig:
    """``train`` with ``max_minutes`` cut to what the demo's ``budget_minutes`` leaves after ``elapsed_s``.

    The stages before training take 11 to 16 minutes depending on the machine (docs/TRAINING.md, turn
    8), and optimizer steps are what the U-Net's score buys (turns 6-7). A fixed cap either wastes a
    fast machine's minutes or runs a slow one past 20; the budget gives training whatever is left,
    less ``after_train_minutes`` for export, eval and serve, never less than ``min_train_minutes``,
    and never more than ``train.max_minutes`` (when set). With ``lr_horizon: steps_or_time`` the
    cosine still ends at its floor when the minutes end first.
    """
    if cfg.budget_minutes is None:
        return train
    left = cfg.budget_minutes - elapsed_s / 60.0 - cfg.after_train_minutes
    cap = train.max_minutes if train.max_minutes is not None else float("inf")
    minutes = min(cap, max(cfg.min_train_minutes, left))
    return train.model_copy(update={"max_minutes": round(minutes, 2)})


def _call_endpoint(base_url: str, prompts: list[str], cfg: DemoConfig) -> list:
    import requests
    from PIL import Image

    images: list[Any] = []
    for prompt in prompts:
        response = requests.post(
            f"{base_url}/v1/generate",
            json={
                "prompt": prompt,
                "seed": cfg.seed,
                "num_images": cfg.images_per_prompt,
                "num_inference_steps": cfg.eval.num_inference_steps,
                "guidance_scale": cfg.eval.guidance_scale,
                "scheduler": cfg.eval.scheduler,
            },
            timeout=600,
        )
        response.raise_for_status()
        body = response.json()
        images.extend(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB") for b64 in body["images"])
    return images


def _label_grid(images: list, prompts: list[str], per_row: int):
    """A grid with one row per prompt and the prompt written on the left."""
    from PIL import Image, ImageDraw

    size = images[0].width
    scale = 2
    label_width = 260
    grid = Image.new("RGB", (label_width + per_row * size * scale, len(prompts) * size * scale), "white")
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        draw.text((6, row * size * scale + size * scale // 2 - 6), prompt, fill="black")
        for col in range(per_row):
            image = images[row * per_row + col].resize((size * scale, size * scale), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + col * size * scale, row * size * scale))
    return grid


def run_demo(cfg: DemoConfig, start_server: StartServer, stop_server: StopServer) -> dict[str, Any]:
    from ldm import tracking
    from ldm.registry import set_alias
    from ldm.runtime import ensure_ray
    from ldm.synth.server import ImageServer
    from ldm.synth.source import render_source, write_pairs
    from pipelines.bootstrap import run_bootstrap
    from pipelines.eval import run_eval
    from pipelines.ingest import run_ingest
    from pipelines.train import run_train

    work = WorkDir(cfg.workdir)
    work.root.mkdir(parents=True, exist_ok=True)
    sub = cfg.with_workdir()  # every sub-config pointed at the same work directory
    tracking.configure(cfg.workdir)
    started = time.perf_counter()
    ensure_ray(cfg.ray_address, cfg.num_cpus)
    clock = StageClock(total=7)
    summary: dict[str, Any] = {"workdir": str(work.root)}

    source = clock.run("synth: render the synthetic source", lambda: render_source(sub.synth, work.synth))
    summary["synth"] = source
    with ImageServer(work.synth / "www") as server:
        pairs = write_pairs(work.synth, server.base_url)
        print(f"serving {work.synth / 'www'} at {server.base_url}; pairs: {pairs}")
        summary["bootstrap"] = clock.run(
            "bootstrap: first-stage models", lambda: run_bootstrap(sub.bootstrap)
        )
        ingest_cfg = sub.ingest.model_copy(update={"input": str(pairs), "allow_hosts": ["127.0.0.1"]})
        manifest = clock.run("ingest: download, filter, score, encode", lambda: run_ingest(ingest_cfg))
        summary["ingest"] = manifest.model_dump(mode="json")

    train_cfg = fit_training_to_budget(sub.train, cfg, elapsed_s=time.perf_counter() - started)
    summary["train_max_minutes"] = train_cfg.max_minutes
    if cfg.budget_minutes is not None:
        print(
            f"train: {train_cfg.max_minutes} min of the demo's {cfg.budget_minutes} min budget are left for "
            f"training (up to {train_cfg.max_steps} steps)",
            flush=True,
        )
    summary["train"] = train = clock.run("train: U-Net on Ray Train", lambda: run_train(train_cfg))
    version = str(train["model_version"])

    def evaluate() -> dict[str, Any]:
        report = run_eval(sub.eval.model_copy(update={"model": f"models:/{cfg.model_name}/{version}"}))
        # The demo has no earlier champion to beat: the first model it trains becomes champion.
        set_alias(cfg.model_name, tracking.ALIAS_CHAMPION, version)
        return report

    summary["eval"] = clock.run("eval: prompt adherence, champion alias", evaluate)

    def serve_and_call() -> dict[str, Any]:
        base_url = start_server(sub.serve)
        try:
            import requests

            health = requests.get(f"{base_url}/healthz", timeout=60).json()
            images = _call_endpoint(base_url, list(cfg.prompts), cfg)
        finally:
            stop_server()
        work.outputs.mkdir(parents=True, exist_ok=True)
        grid_path = work.outputs / "demo_grid.png"
        _label_grid(images, list(cfg.prompts), cfg.images_per_prompt).save(grid_path)
        return {"endpoint": f"{base_url}/v1/generate", "healthz": health, "grid": str(grid_path)}

    summary["serve"] = clock.run("serve: Ray Serve endpoint, generate", serve_and_call)
    clock.run("summary", lambda: None)
    summary["stage_seconds"] = {name: round(seconds, 1) for name, seconds in clock.times.items()}
    _print_summary(summary, manifest, work)
    (work.outputs / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _print_summary(summary: dict[str, Any], manifest: Manifest, work: WorkDir) -> None:
    train = summary["train"]
    print("\n" + "=" * 72)
    print("ldm demo: summary")
    print("=" * 72)
    print(f"work directory     {work.root}")
    counts = manifest.counts
    print(f"rows per stage     input {counts.input}, accepted {counts.accepted}, rejected {counts.rejected}")
    print("rejected by reason " + json.dumps(counts.rejected_by_reason))
    print(f"hold-out split     {manifest.split.holdout} of {counts.accepted} accepted rows")
    print("first-stage models " + json.dumps(summary["bootstrap"], default=str))
    print(f"final train loss   {train.get('final_loss')}")
    print(f"MLflow train run   {train.get('run_id')}  (model ldm version {train.get('model_version')})")
    print("eval scores        " + json.dumps(summary["eval"]["scores"]))
    print("eval ceiling       " + json.dumps(summary["eval"]["ceiling"]))  # autoencoder round trip
    print(f"MLflow UI          .venv/bin/mlflow ui --backend-store-uri {work.tracking_uri} --port 5000")
    print(f"endpoint (was)     {summary['serve']['endpoint']}")
    print(f"image grid         {summary['serve']['grid']}")
    print("time per stage (s) " + json.dumps(summary["stage_seconds"]))
