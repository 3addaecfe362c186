"""What every `ldm` subcommand shares: the common options, config loading and one-line errors.

A failure the user can fix (a missing or malformed file, an unknown model or alias, a folder that is
not a model, an unreachable cluster, a wrong token, a failed gate, a bad ``--set``) prints one line,
``error: ...``, and exits 2. Anything else is a bug and keeps its traceback; ``LDM_TRACEBACK=1``
shows the traceback of the one-line errors too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")
EXIT_USER_ERROR = 2

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="YAML config for this job (defaults in code).")
]
WorkdirOpt = Annotated[
    str | None,
    typer.Option("--workdir", help="Work directory (models, MLflow DB, checkpoints). [default: ./ldm-demo]"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config field: key.sub=value (the value is read as YAML)."),
]
AddressOpt = Annotated[
    str,
    typer.Option(
        "--address",
        # Ray's own `ray job` CLI reads RAY_API_SERVER_ADDRESS first, then RAY_ADDRESS.
        envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
        help="Ray dashboard/Jobs API address, e.g. http://head:8265 [env: RAY_API_SERVER_ADDRESS, RAY_ADDRESS].",
        show_envvar=False,
    ),
]


class UserError(Exception):
    """A failure the user can fix (bad config, bad input, a quality gate): printed without a traceback."""


def load(cls: type[T], config: Path | None, sets: list[str] | None, **overrides: Any) -> T:
    """The job's config from defaults, ``--config``, flags and ``--set``; a bad one is a `UserError`."""
    import yaml
    from pydantic import ValidationError

    from ldm.config import load_config

    if config is not None and not config.is_file():
        raise UserError(f"--config {config}: no such file")
    try:
        return load_config(cls, config, overrides=overrides, sets=sets)  # type: ignore[type-var]
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
        )
        raise UserError(f"invalid {cls.__name__}: {problems}") from error
    except (OSError, ValueError, yaml.YAMLError) as error:  # unreadable file, YAML syntax, bad --set
        raise UserError(f"{config or '--set'}: {' '.join(str(error).split())}") from error


def save_config(cfg: Any, job: str) -> None:
    from ldm.config import dump_config
    from ldm.contract import WorkDir

    dump_config(cfg, WorkDir(cfg.workdir).root / "configs" / f"{job}.yaml")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the input is wrong", not "the code is wrong"."""
    from mlflow.exceptions import MlflowException

    from ldm.errors import LdmError

    # LookupError: `ldm.registry` raises it for an unknown model or alias (its subclasses KeyError and
    # IndexError are bugs, see `run`).
    return (UserError, LdmError, FileNotFoundError, NotADirectoryError, MlflowException, ConnectionError,
            LookupError)  # fmt: skip


def require_local(flag: str, uri: str | None) -> None:
    """Fail early, before Ray starts, when a local input named by ``flag`` does not exist."""
    if uri and "://" not in uri and not Path(uri).exists():
        raise UserError(f"{flag} {uri}: no such file or folder")


def run(fn: Callable[..., T], *args: Any) -> T:
    """Run a job; turn the errors a user can act on into one line and exit code 2."""
    try:
        return fn(*args)
    except _user_errors() as error:
        if isinstance(error, KeyError | IndexError) or os.environ.get("LDM_TRACEBACK"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
