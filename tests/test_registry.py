"""`ldm.registry`: a tiny pipeline registered into a real SQLite-backed MLflow in a temporary work dir."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from ldm import tracking
from ldm.pipeline import generate, load_pipeline
from ldm.registry import (
    get_alias_version,
    parse_models_uri,
    register_pipeline,
    resolve_model_uri,
    set_alias,
)
from ldm.testing import tiny_pipeline_folder


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A work dir whose registry holds model `ldm` v1 (candidate) and v2 (candidate, champion)."""
    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("workdir")
    first = tiny_pipeline_folder(workdir / "exports" / "v1", seed=0)
    second = tiny_pipeline_folder(workdir / "exports" / "v2", seed=1)
    v1 = register_pipeline(first, workdir=workdir, tags={"source": "test"})
    v2 = register_pipeline(second, workdir=workdir, aliases=("candidate", "champion"))
    return {"workdir": workdir, "folders": {v1: first, v2: second}, "versions": (v1, v2)}


def image(pipe, seed: int = 4) -> np.ndarray:
    return np.asarray(generate(pipe, "a blue square", seed=seed, num_inference_steps=2).images[0])


def test_versions_aliases_and_sqlite_store(registered):
    tracking.configure(registered["workdir"])
    assert mlflow.get_tracking_uri().startswith("sqlite:///")
    assert (registered["workdir"] / "mlflow.db").is_file()
    assert registered["versions"] == ("1", "2")
    assert get_alias_version("ldm", "candidate") == "2"
    assert get_alias_version("ldm", "champion") == "2"
    assert get_alias_version("ldm", "no-such-alias") is None
    assert get_alias_version("no-such-model", "champion") is None
    version = mlflow.MlflowClient().get_model_version("ldm", "1")
    assert version.tags == {"source": "test"}
    run = mlflow.get_run(version.run_id)
    assert mlflow.get_experiment(run.info.experiment_id).name == "register"


def test_alias_load_equals_folder_load(registered):
    tracking.configure(registered["workdir"])
    set_alias("ldm", "champion", "1")
    assert get_alias_version("ldm", "champion") == "1"
    from_registry = load_pipeline("models:/ldm@candidate")
    assert (from_registry.name, from_registry.version) == ("ldm", "2")
    from_folder = load_pipeline(str(registered["folders"]["2"]))
    assert np.array_equal(image(from_registry.pipe), image(from_folder.pipe))
    champion = load_pipeline("models:/ldm@champion")
    assert (champion.name, champion.version) == ("ldm", "1")
    # v1 and v2 were built from different seeds: the alias really selects the weights
    assert np.abs(image(champion.pipe).astype(int) - image(from_registry.pipe).astype(int)).mean() > 5
    set_alias("ldm", "champion", "2")


def test_version_and_run_uris_resolve_to_the_pipeline_folder(registered, tmp_path):
    tracking.configure(registered["workdir"])
    folder, name, version = resolve_model_uri("models:/ldm/1", dst_path=tmp_path / "a")
    assert (name, version) == ("ldm", "1")
    assert (folder / "model_index.json").is_file()
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    run_id = mlflow.MlflowClient().get_model_version("ldm", "1").run_id
    folder, name, version = resolve_model_uri(f"runs:/{run_id}/model", dst_path=tmp_path / "b")
    assert (folder / "model_index.json").is_file() and (name, version) == (None, None)


def test_register_into_an_existing_run(registered):
    tracking.configure(registered["workdir"])
    with mlflow.start_run(experiment_id=tracking.experiment("train", registered["workdir"])) as run:
        version = register_pipeline(registered["folders"]["1"], run_id=run.info.run_id, aliases=())
    assert version == "3"
    assert mlflow.MlflowClient().get_model_version("ldm", "3").run_id == run.info.run_id
    assert get_alias_version("ldm", "candidate") == "2"  # no aliases asked for, none moved


def test_bad_uris_raise(registered, tmp_path):
    tracking.configure(registered["workdir"])
    with pytest.raises(LookupError, match="no alias"):
        resolve_model_uri("models:/ldm@nobody")
    for bad in ("models:/ldm", "models:/ldm/latest", "models:/@x", "ftp://x"):
        with pytest.raises(ValueError):
            resolve_model_uri(bad)
    assert parse_models_uri("models:/ldm@champion") == ("ldm", None, "champion")
    assert parse_models_uri("models:/ldm/12") == ("ldm", "12", None)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        register_pipeline(tmp_path, workdir=registered["workdir"])
