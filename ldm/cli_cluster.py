"""`ldm submit` and `ldm jobs`: the Ray-cluster commands of the `ldm` console script.

Registered on the app by `ldm.cli`; the work is done by `pipelines.submit` over Ray's Jobs API.
``--address`` falls back to ``RAY_API_SERVER_ADDRESS`` and then ``RAY_ADDRESS``, as ``ray job`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

import typer

from ldm.cli_common import AddressOpt, ConfigOpt, SetOpt, UserError, WorkdirOpt, load, run


class Job(StrEnum):
    """The jobs `ldm submit` can send (the same as pipelines.submit.SUBMITTABLE; a test checks)."""

    ingest = "ingest"
    train = "train"
    eval = "eval"
    retrain = "retrain"


SubmissionIdArg = Annotated[str, typer.Argument(help="The job's submission id (see `ldm jobs list`).")]


def submit(
    job: Annotated[Job, typer.Argument(help="The job to run on the cluster.")],
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
    submission_id: Annotated[
        str | None, typer.Option("--submission-id", help="Id for the job [default: ldm-JOB-TIMESTAMP].")
    ] = None,
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

        cfg: Any = load(jobs_api.config_class(job.value), config, set_, workdir=workdir)
        env_vars = {}
        for item in env or []:
            if "=" not in item:
                raise UserError(f"--env {item!r} must look like NAME=VALUE")
            name, value = item.split("=", 1)
            env_vars[name] = value
        sid = jobs_api.submit(
            job.value,
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

    run(job_fn)


jobs_app = typer.Typer(no_args_is_help=True, help="List, inspect, follow and stop jobs on a Ray cluster.")


def _jobs(address: str, action: Callable[[Any], Any]) -> None:
    """Run one Jobs API call with the same one-line errors as `ldm submit` (the token is never printed)."""

    def job() -> None:
        from pipelines import submit as jobs_api

        with jobs_api.cluster_errors(address):
            action(jobs_api)

    run(job)


@jobs_app.command("list")
def jobs_list(address: AddressOpt) -> None:
    """All jobs of the cluster, newest last."""

    def action(api: Any) -> None:
        for info in api.list_jobs(address):
            typer.echo(json.dumps(info, default=str))

    _jobs(address, action)


@jobs_app.command("status")
def jobs_status(submission_id: SubmissionIdArg, address: AddressOpt) -> None:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    _jobs(address, lambda api: typer.echo(str(api.client(address).get_job_status(submission_id).value)))


@jobs_app.command("logs")
def jobs_logs(
    submission_id: SubmissionIdArg,
    address: AddressOpt,
    follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends.")] = False,
) -> None:
    """The job's logs so far, or streamed until it ends with --follow."""

    def action(api: Any) -> None:
        if follow:
            typer.echo(
                api.follow(address, submission_id, echo=lambda text, end="": typer.echo(text, nl=False))
            )
        else:
            typer.echo(api.client(address).get_job_logs(submission_id), nl=False)

    _jobs(address, action)


@jobs_app.command("stop")
def jobs_stop(submission_id: SubmissionIdArg, address: AddressOpt) -> None:
    """Ask the cluster to stop the job."""

    def action(api: Any) -> None:
        stopped = api.client(address).stop_job(submission_id)
        typer.echo(f"{submission_id}: {'stop requested' if stopped else 'already finished'}")

    _jobs(address, action)
