"""The `ldm` console script: one subcommand per job, each a typed config + flag overrides.

Every subcommand takes ``--config FILE.yaml`` (a config of that job; defaults live in code),
``--workdir DIR`` and ``--set key.sub=value`` (repeatable) for any other field, plus the flags
documented in the README. Heavy imports (torch, ray, mlflow) happen inside the commands so that
``--help`` stays fast. Known failures (bad config, bad input, a failed quality gate) print one clear
line and exit 2 (`ldm.cli_common`); anything else is a bug and keeps its traceback.

This is the one module that imports all three packages (``ldm``, ``pipelines``, ``serve``); the
cluster commands live in `ldm.cli_cluster` (docs/DEVELOPING.md states the import rule).
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ldm.cli_cluster import jobs_app, submit
from ldm.cli_common import ConfigOpt, SetOpt, UserError, WorkdirOpt, require_local
from ldm.cli_common import load as _load
from ldm.cli_common import run as _run
from ldm.cli_common import save_config as _save_config
from ldm.runtime import offline_env

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Text-to-image latent diffusion, end to end on Ray: synth, bootstrap, ingest, train, eval, serve.",
)

# Offline by default (ldm.runtime.OFFLINE_DEFAULTS says why each); a value the user set wins. Ray
# workers also get OMP_WAIT_POLICY=PASSIVE (ldm.runtime.WORKER_DEFAULTS); this process keeps OpenMP's
# default unless the user set one, which must be in the environment before torch is imported.
offline_env()


class Scheduler(StrEnum):
    """The samplers `ldm.pipeline` knows (its SCHEDULERS; a test checks they agree)."""

    ddim = "ddim"
    dpmpp = "dpmpp"
    euler = "euler"


@app.command()
def synth(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    num_pairs: Annotated[int | None, typer.Option(help="Number of caption-image rows.")] = None,
    base_url: Annotated[str | None, typer.Option(help="URL prefix written into pairs.parquet.")] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve the images on base_url until interrupted.")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Render the synthetic caption-image source and its URL list (pairs.parquet)."""
    from ldm.config.synth import SynthConfig

    def job() -> None:
        from pipelines.synth import run_synth, serve_forever

        cfg = _load(SynthConfig, config, set_, workdir=workdir, num_pairs=num_pairs, base_url=base_url)
        _save_config(cfg, "synth")
        summary = run_synth(cfg)
        typer.echo(json.dumps(summary, indent=2, default=str))
        if serve:
            serve_forever(cfg)

    _run(job)


@app.command()
def bootstrap(config: ConfigOpt = None, workdir: WorkdirOpt = None, set_: SetOpt = None) -> None:
    """Train the small first-stage models of the offline default: CLIP scorer, autoencoder, text encoder."""
    from ldm.config.bootstrap import BootstrapConfig

    def job() -> None:
        from pipelines.bootstrap import run_bootstrap

        cfg = _load(BootstrapConfig, config, set_, workdir=workdir)
        _save_config(cfg, "bootstrap")
        typer.echo(json.dumps(run_bootstrap(cfg), indent=2, default=str))

    _run(job)


@app.command()
def ingest(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    input: Annotated[
        str | None, typer.Option("--input", help="Parquet/CSV/TSV of url, caption (local or s3://).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="Output prefix for latents/, rejects/, manifest.json.")
    ] = None,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="Lift the private-address guard for this host.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Download, filter, CLIP-score and encode caption-image pairs into latents (Ray Data)."""
    from ldm.config.ingest import IngestConfig

    def job() -> None:
        from pipelines.ingest import run_ingest

        cfg = _load(
            IngestConfig, config, set_, workdir=workdir, input=input, output=output, allow_hosts=allow_host
        )
        require_local("--input", cfg.input_uri)
        _save_config(cfg, "ingest")
        typer.echo(run_ingest(cfg).to_json())

    _run(job)


@app.command()
def train(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Latents dataset written by ingest (local or s3://).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Train the text-conditioned U-Net on Ray Train; track in MLflow; export and register the model."""
    from ldm.config.train import TrainConfig

    def job() -> None:
        from pipelines.train import run_train

        cfg = _load(TrainConfig, config, set_, workdir=workdir, data=data)
        require_local("--data", cfg.data)
        _save_config(cfg, "train")
        typer.echo(json.dumps(run_train(cfg), indent=2, default=str))

    _run(job)


@app.command(name="eval")
def eval_(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model URI: folder or models:/NAME@ALIAS.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a model (synthetic: held-out and seen prompts by category; any data: clip_score, cmmd).

    Logs to MLflow; progress goes to stderr; the last line of stdout is JSON."""
    from ldm.config.eval import EvalConfig

    def job() -> None:
        from pipelines.eval import run_eval

        cfg = _load(EvalConfig, config, set_, workdir=workdir, model=model)
        _save_config(cfg, "eval")
        report = run_eval(cfg)
        for line in report["summary"]:
            typer.echo(line)
        typer.echo(json.dumps(report["final"]))

    _run(job)


@app.command()
def generate(
    model: Annotated[
        str, typer.Option("--model", help="Model URI: folder, s3://, models:/NAME@ALIAS, runs:/...")
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="Text prompt.")],
    out: Annotated[Path, typer.Option("--out", help="Output PNG (a grid when --num-images > 1).")],
    seed: Annotated[
        int | None,
        typer.Option("--seed", min=0, help="Random seed; same seed, same image [default: random]."),
    ] = None,
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", help="What the image should not show.")
    ] = "",
    steps: Annotated[int, typer.Option("--steps", min=1, max=200, help="Denoising steps.")] = 25,
    guidance: Annotated[
        float, typer.Option("--guidance", min=0.0, max=30.0, help="Classifier-free guidance scale.")
    ] = 4.0,
    scheduler: Annotated[Scheduler, typer.Option("--scheduler", help="Sampler.")] = Scheduler.dpmpp,
    num_images: Annotated[
        int, typer.Option("--num-images", min=1, max=8, help="Images for the prompt (saved as one grid).")
    ] = 1,
    width: Annotated[
        int | None, typer.Option("--width", help="Image width, a multiple of the model's factor.")
    ] = None,
    height: Annotated[
        int | None, typer.Option("--height", help="Image height, a multiple of the model's factor.")
    ] = None,
    workdir: WorkdirOpt = None,
) -> None:
    """Generate images from a model without the server."""

    def job() -> None:
        from pydantic import ValidationError

        from ldm import tracking
        from ldm.pipeline import generate as run_generate
        from ldm.pipeline import load_pipeline, make_grid
        from ldm.request import GenerationRequest

        try:  # the request is checked before the model is loaded
            request = GenerationRequest.model_validate(
                {
                    "prompt": prompt,
                    "negative_prompt": negative_prompt,
                    "num_inference_steps": steps,
                    "guidance_scale": guidance,
                    "seed": seed,
                    "num_images": num_images,
                    "scheduler": scheduler.value,
                    "width": width,
                    "height": height,
                }
            )
        except ValidationError as error:
            problem = error.errors()[0]
            raise UserError(f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}") from error
        tracking.configure(workdir or "./ldm-demo")
        try:
            loaded = load_pipeline(model)
            result = run_generate(loaded.pipe, request)
        except (ValueError, FileNotFoundError) as error:
            raise UserError(str(error)) from error
        image = result.images[0] if num_images == 1 else make_grid(result.images, 1, num_images)
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        typer.echo(
            json.dumps(
                {"out": str(out), "seed": result.seed, "model": loaded.name, "version": loaded.version}
            )
        )

    _run(job)


@app.command()
def serve(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model URI [default: models:/ldm@champion].")
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="HTTP port (0 picks a free one). [default: 8000]"),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Deploy the Ray Serve application (HTTP API + OpenAI images API) and run until interrupted."""
    from ldm.config.serve import ServeConfig

    def job() -> None:
        from serve.app import run_serve

        cfg = _load(ServeConfig, config, set_, workdir=workdir, model=model, port=port)
        _save_config(cfg, "serve")
        run_serve(cfg, block=True)

    _run(job)


@app.command()
def demo(config: ConfigOpt = None, workdir: WorkdirOpt = None, set_: SetOpt = None) -> None:
    """The whole pipeline on the embedded default: synth, bootstrap, ingest, train, register, serve, generate."""
    from ldm.config.demo import DemoConfig

    def job() -> None:
        from pipelines.demo import run_demo
        from serve.app import run_serve, shutdown_serve

        cfg = _load(DemoConfig, config, set_, workdir=workdir)
        _save_config(cfg, "demo")
        run_demo(cfg, lambda serve_cfg: run_serve(serve_cfg, block=False), shutdown_serve)

    _run(job)


@app.command()
def retrain(
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    source: Annotated[
        str | None,
        typer.Option("--source", help="Prefix of the source shards (pairs files, local or s3://)."),
    ] = None,
    root: Annotated[
        str | None,
        typer.Option("--root", help="Where cycles keep data and records. [default: WORKDIR/retrain]"),
    ] = None,
    floor: Annotated[
        float | None, typer.Option("--floor", help="Worst gate.metric value to promote (eval.gate.floor).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """One retraining cycle: ingest new shards, fine-tune from champion, evaluate, promote if the gate passes."""
    from ldm.config.retrain import RetrainConfig

    def job() -> None:
        from pipelines.retrain import STATUS_LOCKED, run_retrain

        cfg = _load(
            RetrainConfig,
            config,
            set_,
            workdir=workdir,
            source=source,
            root=root,
            **{"eval.gate.floor": floor},
        )
        require_local("--source", cfg.source_uri)
        _save_config(cfg, "retrain")
        record = run_retrain(cfg)
        if record["status"] == STATUS_LOCKED:  # another cycle runs: one line, exit 0
            typer.echo(f"[retrain] {record['reason']}")
            return
        typer.echo(json.dumps(record, indent=2, default=str))

    _run(job)


app.command()(submit)
app.add_typer(jobs_app, name="jobs")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # img2dataset starts workers with spawn: they re-import __main__
    main()
