"""The `ldm` console script: one subcommand per job, each a typed config + flag overrides.

Every subcommand takes ``--config FILE.yaml`` (a config of that job; defaults live in code),
``--workdir DIR`` and ``--set key.sub=value`` (repeatable) for any other field, plus the flags that
CONTRACT.md names. Heavy imports (torch, ray, mlflow) happen inside the commands so that ``--help``
stays fast. Known failures (bad config, bad input, a failed quality gate) print one clear line and
exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Text-to-image latent diffusion, end to end on Ray: synth, bootstrap, ingest, train, eval, serve.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML config for this job (defaults in code).")
]
WorkdirOpt = Annotated[
    str | None,
    typer.Option("--workdir", help="Work directory (models, MLflow DB, checkpoints). [default: ./ldm-demo]"),
]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config field: key.sub=value.")]

# Offline by default: no hub lookups, no albumentations phone-home (TRAPS.md).
# OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while waiting collapse throughput when the cores
# are shared (Ray workers, data stages); measured here, an autoencoder step went from 2.3-3.2 s to
# 0.5-0.7 s under load. It must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class UserError(Exception):
    """A failure the user can fix (bad config, bad input, a quality gate): printed without a traceback."""


def _load(cls: type, config: Path | None, sets: list[str] | None, **overrides: Any):
    from pydantic import ValidationError

    from ldm.config import load_config

    try:
        return load_config(cls, config, overrides=overrides, sets=sets)
    except ValidationError as error:
        raise UserError(f"invalid {cls.__name__}:\n{error}") from error
    except (OSError, ValueError) as error:
        raise UserError(str(error)) from error


def _save_config(cfg: Any, job: str) -> None:
    from ldm.config import dump_config
    from ldm.contract import WorkDir

    dump_config(cfg, WorkDir(cfg.workdir).root / "configs" / f"{job}.yaml")


def _run(fn, *args: Any) -> Any:
    """Run a job; turn the errors a user can act on into one line and exit code 2."""
    from ldm.errors import LdmError

    try:
        return fn(*args)
    except (UserError, LdmError) as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


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
        from ldm.synth.source import run_synth, serve_forever

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
        from ldm.first_stage.bootstrap import run_bootstrap

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
        int | None, typer.Option("--seed", min=0, help="Image i uses seed + i. [default: random, printed]")
    ] = None,
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", help="What to steer away from (needs guidance > 1).")
    ] = "",
    steps: Annotated[int, typer.Option("--steps", min=1, max=200, help="Sampler steps.")] = 25,
    guidance: Annotated[
        float, typer.Option("--guidance", min=0.0, max=30.0, help="Classifier-free guidance scale.")
    ] = 4.0,
    scheduler: Annotated[str, typer.Option("--scheduler", help="Sampler: ddim | dpmpp | euler.")] = "dpmpp",
    num_images: Annotated[int, typer.Option("--num-images", min=1, max=8, help="Images to make.")] = 1,
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
                    "scheduler": scheduler,
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
        int | None, typer.Option("--port", help="HTTP port (0 picks a free one). [default: 8000]")
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

        cfg = _load(DemoConfig, config, set_, workdir=workdir)
        _save_config(cfg, "demo")
        run_demo(cfg)

    _run(job)


AddressOpt = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="Ray dashboard/Jobs API address, e.g. http://head:8265.",
    ),
]


@app.command()
def submit(
    job: Annotated[str, typer.Argument(help="ingest | train | eval | retrain")],
    address: AddressOpt,
    config: ConfigOpt = None,
    workdir: WorkdirOpt = None,
    set_: SetOpt = None,
    working_dir: Annotated[
        str | None,
        typer.Option("--working-dir", help="Folder uploaded as the job's runtime_env working_dir."),
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="Env var for the job: NAME=VALUE.")] = None,
    entrypoint_num_cpus: Annotated[
        float | None, typer.Option(help="CPUs reserved for the entrypoint.")
    ] = None,
    entrypoint_num_gpus: Annotated[
        float | None, typer.Option(help="GPUs reserved for the entrypoint.")
    ] = None,
    submission_id: Annotated[str | None, typer.Option("--submission-id")] = None,
    python: Annotated[
        str, typer.Option(help="Python on the cluster that has this project installed.")
    ] = "python",
    wait: Annotated[
        bool, typer.Option("--wait", help="Stream the logs until the job ends; exit 1 if it failed.")
    ] = False,
) -> None:
    """Submit ingest/train/eval/retrain to a Ray cluster via the Ray Jobs API (token auth as Ray does it)."""

    def job_fn() -> None:
        from pipelines import submit as jobs_api

        try:
            cls = jobs_api.config_class(job)
        except ValueError as error:
            raise UserError(str(error)) from error
        cfg = _load(cls, config, set_, workdir=workdir)
        env_vars = {}
        for item in env or []:
            if "=" not in item:
                raise UserError(f"--env {item!r} must look like NAME=VALUE")
            name, value = item.split("=", 1)
            env_vars[name] = value
        sid = jobs_api.submit(
            job,
            address,
            cfg,
            working_dir=working_dir,
            env_vars=env_vars,
            entrypoint_num_cpus=entrypoint_num_cpus,
            entrypoint_num_gpus=entrypoint_num_gpus,
            submission_id=submission_id,
            python=python,
        )
        typer.echo(f"submitted {sid}")
        if wait:
            status = jobs_api.follow(address, sid, echo=lambda text, end="": typer.echo(text, nl=False))
            typer.echo(f"\n{sid}: {status}")
            if status != "SUCCEEDED":
                raise typer.Exit(1)

    _run(job_fn)


jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and stop jobs on a Ray cluster.")
app.add_typer(jobs_app, name="jobs")


def _jobs(address: str, action) -> None:
    """Run one Jobs API call with the same one-line errors as `ldm submit` (the token is never printed)."""
    from pipelines import submit as jobs_api

    def job() -> None:
        with jobs_api.cluster_errors(address):
            action(jobs_api)

    _run(job)


@jobs_app.command("list")
def jobs_list(address: AddressOpt) -> None:
    """All jobs of the cluster, newest last."""
    _jobs(address, lambda api: [typer.echo(json.dumps(info, default=str)) for info in api.list_jobs(address)])


@jobs_app.command("status")
def jobs_status(submission_id: str, address: AddressOpt) -> None:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    _jobs(address, lambda api: typer.echo(str(api.client(address).get_job_status(submission_id).value)))


@jobs_app.command("logs")
def jobs_logs(
    submission_id: str,
    address: AddressOpt,
    follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends.")] = False,
) -> None:
    """The job's logs so far, or streamed until it ends with --follow."""

    def action(api) -> None:
        if follow:
            typer.echo(
                api.follow(address, submission_id, echo=lambda text, end="": typer.echo(text, nl=False))
            )
        else:
            typer.echo(api.client(address).get_job_logs(submission_id), nl=False)

    _jobs(address, action)


@jobs_app.command("stop")
def jobs_stop(submission_id: str, address: AddressOpt) -> None:
    """Ask the cluster to stop the job."""

    def action(api) -> None:
        stopped = api.client(address).stop_job(submission_id)
        typer.echo(f"{submission_id}: {'stop requested' if stopped else 'already finished'}")

    _jobs(address, action)


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
        _save_config(cfg, "retrain")
        record = run_retrain(cfg)
        if record["status"] == STATUS_LOCKED:  # another cycle runs: one line, exit 0
            typer.echo(f"[retrain] {record['reason']}")
            return
        typer.echo(json.dumps(record, indent=2, default=str))

    _run(job)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # img2dataset spawns workers that re-import __main__ (TRAPS.md)
    main()
