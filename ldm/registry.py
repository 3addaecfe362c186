"""The MLflow model registry: register an exported pipeline folder, move aliases, resolve model URIs.

A trained model is a diffusers pipeline folder. `register_pipeline` logs it as an MLflow pyfunc model
(the folder is the ``pipeline`` artifact, the wrapper is model code, see `ldm.pyfunc_model`), registers
a new version under ``name`` and points aliases at it: ``candidate`` after training, ``champion`` once
the evaluation gate passed (registry stages are deprecated; aliases replace them).

`resolve_model_uri` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``
into a local folder holding ``model_index.json``, for `ldm.pipeline.load_pipeline`.

The tracking/registry URI is whatever `ldm.tracking.configure` set (SQLite in the work directory unless
``MLFLOW_TRACKING_URI``); pass ``workdir`` to configure it here.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ldm.tracking import ALIAS_CANDIDATE, DEFAULT_MODEL_NAME

REGISTER_EXPERIMENT = "register"
MODEL_ARTIFACT = "model"  # name of the logged model inside its run
PIPELINE_ARTIFACT = "pipeline"  # the diffusers folder inside the logged model (see ldm.pyfunc_model)
# The pyfunc wrapper, referenced by path and never imported here: importing it would close the circle
# ldm.pipeline -> ldm.registry -> ldm.pyfunc_model -> ldm.pipeline.
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
LDM_PACKAGE = Path(__file__).resolve().parent

# What the pyfunc imports, pinned to the versions installed here (MLflow would otherwise spend 5-9 s
# inferring them by loading the model). A serve with an env MLflow builds (virtualenv, conda, a
# model-serving image) installs exactly these.
REQUIRED_PACKAGES = (
    "mlflow",
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "accelerate",
    "pillow",
    "numpy",
    "pydantic",
    "pyyaml",
)
INPUT_EXAMPLE = [{"prompt": "a small red circle in the top left", "seed": 0, "num_inference_steps": 2}]


def pip_requirements() -> list[str]:
    """``name==version`` of each installed required package (local build tags like ``+cu126`` dropped)."""
    pinned = []
    for name in REQUIRED_PACKAGES:
        try:
            pinned.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue  # optional here (accelerate): not installed, not required
    return pinned


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _run_context(run_id: str | None, workdir: str | Path | None):
    """The run to log into: ``run_id``, the active run, or a new run in experiment "register"."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and run_id in (None, active.info.run_id):
        return contextlib.nullcontext(active)
    if run_id is not None:
        return mlflow.start_run(run_id=run_id, nested=active is not None)
    if workdir is not None:
        from ldm.tracking import experiment

        experiment_id = experiment(REGISTER_EXPERIMENT, workdir)
    else:
        experiment_id = mlflow.set_experiment(REGISTER_EXPERIMENT).experiment_id
    return mlflow.start_run(experiment_id=experiment_id, run_name="register", nested=active is not None)


def register_pipeline(
    folder: str | Path,
    *,
    name: str = DEFAULT_MODEL_NAME,
    run_id: str | None = None,
    aliases: Iterable[str] = (ALIAS_CANDIDATE,),
    tags: dict[str, str] | None = None,
    workdir: str | Path | None = None,
) -> str:
    """Log ``folder`` (a diffusers pipeline) as a pyfunc model, register it as ``name``; returns the version.

    The model goes into run ``run_id`` (or the active run, or a new run in experiment "register");
    each alias in ``aliases`` then points at the new version, and ``tags`` are set on it.
    """
    import mlflow

    if workdir is not None:
        from ldm.tracking import configure

        configure(workdir)
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    with _run_context(run_id, workdir), tempfile.TemporaryDirectory(prefix="ldm-code-") as code:
        # The ldm package travels with the model (code_paths), without bytecode caches.
        package = shutil.copytree(
            LDM_PACKAGE, Path(code) / "ldm", ignore=shutil.ignore_patterns("__pycache__")
        )
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(PYFUNC_MODEL_FILE),  # model code, not a pickle
            artifacts={PIPELINE_ARTIFACT: str(folder)},
            code_paths=[str(package)],
            pip_requirements=pip_requirements(),
            input_example=INPUT_EXAMPLE,
        )
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
        mlflow.set_tag(f"registered.{name}", str(version))
    client = _client()
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(version))
    return str(version)


def set_alias(name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` (e.g. ``champion``) of registered model ``name`` at ``version``."""
    _client().set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"not a models:/ URI: {uri!r}")
    body = uri[len("models:/") :].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in name + alias:
            return name, None, alias
    elif body.count("/") == 1:
        name, version = body.split("/")
        if name and version.isdigit():
            return name, version, None
    raise ValueError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")


def _find_pipeline_folder(root: Path, uri: str) -> Path:
    found = sorted(root.rglob("model_index.json"), key=lambda path: len(path.parts))
    if not found:
        raise FileNotFoundError(f"{uri}: no diffusers pipeline (model_index.json) in the downloaded model")
    return found[0].parent


def resolve_model_uri(uri: str, dst_path: str | Path | None = None) -> tuple[Path, str | None, str | None]:
    """Download the model behind ``uri``; returns (folder holding model_index.json, name, version).

    ``models:/NAME@ALIAS`` is resolved to a version first, so the name/version returned are exactly
    what was downloaded even if the alias moves meanwhile. Files go to ``dst_path`` (default: a new
    temporary folder that the caller owns).
    """
    import mlflow

    dst = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="ldm-model-"))
    if uri.startswith("models:/"):
        name, version, alias = parse_models_uri(uri)
        if alias is not None:
            version = get_alias_version(name, alias)
            if version is None:
                raise LookupError(f"{uri}: registered model {name!r} has no alias {alias!r}")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)
        )
        return _find_pipeline_folder(Path(local), uri), name, version
    if uri.startswith("runs:/"):
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
        return _find_pipeline_folder(Path(local), uri), None, None
    raise ValueError(
        f"unsupported model URI {uri!r}: use models:/NAME@ALIAS, models:/NAME/VERSION or runs:/..."
    )
