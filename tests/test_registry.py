"""`ldm.registry`: a tiny pipeline registered into a real SQLite-backed MLflow in a temporary work dir."""

from __future__ import annotations

import os

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


# --- MLflow's own serving path: the registered pyfunc is self-contained ---------------------------------
PREDICT = """
import base64, io, json, sys
import mlflow
model = mlflow.pyfunc.load_model("models:/ldm@champion")
rows = [{"prompt": "a blue square", "seed": 4, "num_inference_steps": 2}]
out = model.predict(rows)
import ldm
print(json.dumps({"ldm": ldm.__file__, "images": out, "signature": str(model.metadata.signature.inputs)}))
"""


def _env(workdir) -> dict[str, str]:
    import os
    import sys
    from pathlib import Path

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    # `mlflow models serve` starts uvicorn by name: the venv's bin/ must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_pyfunc_loads_and_predicts_in_a_fresh_process_from_its_own_code(registered, tmp_path):
    import base64
    import io
    import json
    import subprocess
    import sys

    from PIL import Image

    tracking.configure(registered["workdir"])
    set_alias("ldm", "champion", "2")
    done = subprocess.run(
        [sys.executable, "-c", PREDICT],
        env=_env(registered["workdir"]),
        cwd=tmp_path,  # not the repository: the model's own copy of ldm must be what loads
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    assert "/code/ldm/" in payload["ldm"], payload["ldm"]  # code_paths, not the installed project
    assert "prompt" in payload["signature"] and "seed" in payload["signature"]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload["images"][0]))).convert("RGB"))
    expected = image_of(registered["folders"]["2"])
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2


def image_of(folder) -> np.ndarray:
    return image(load_pipeline(str(folder)).pipe, seed=4)


def test_registered_model_has_signature_input_example_and_pinned_requirements(registered):
    from pathlib import Path

    tracking.configure(registered["workdir"])
    info = mlflow.models.get_model_info("models:/ldm/1")
    assert info.signature is not None and "prompt" in str(info.signature.inputs)
    assert info.saved_input_example_info is not None
    local = Path(mlflow.artifacts.download_artifacts("models:/ldm/1"))
    requirements = (local / "requirements.txt").read_text()
    assert "diffusers==" in requirements and "torch==" in requirements
    assert (local / "code" / "ldm" / "pipeline.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))


def _serve_and_invoke(workdir, cwd, env_manager: str, startup_timeout_s: float) -> None:
    """``mlflow models serve -m models:/ldm@champion --env-manager ENV``, then /invocations as a client would."""
    import base64
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests
    from conftest import free_port

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    command = [mlflow_cli, "models", "serve", "-m", "models:/ldm@champion", "--env-manager", env_manager]
    log = Path(cwd) / "mlflow-serve.log"
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [*command, "-p", str(port), "-h", "127.0.0.1"],
            env=_env(workdir),
            cwd=cwd,  # not the repository: what serves is the model's own code
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (
                f"mlflow models serve did not come up:\n{log.read_text()[-3000:]}"
            )
            time.sleep(1)
        body = {"inputs": [{"prompt": "a blue square", "seed": 4, "num_inference_steps": 2}]}
        reply = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
        (encoded,) = reply.json()["predictions"]
        assert base64.b64decode(encoded)[:8] == b"\x89PNG\r\n\x1a\n"
        bad = requests.post(
            f"http://127.0.0.1:{port}/invocations", json={"inputs": [{"seed": 1}]}, timeout=60
        )
        assert 400 <= bad.status_code < 500, bad.text
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registered, tmp_path):
    tracking.configure(registered["workdir"])
    set_alias("ldm", "champion", "2")
    _serve_and_invoke(registered["workdir"], tmp_path, "local", startup_timeout_s=300)


@pytest.mark.slow
@pytest.mark.nightly  # `make test-all`; see the Makefile
@pytest.mark.skipif(
    os.environ.get("LDM_TEST_MLFLOW_VIRTUALENV") != "1",
    reason="builds a virtualenv from the model's requirements (~8 min, GBs): set LDM_TEST_MLFLOW_VIRTUALENV=1",
)
def test_mlflow_models_serve_from_the_models_own_requirements(registered, tmp_path):
    """MLflow builds a fresh virtualenv from the model's requirements.txt and serves from it.

    Needs ``virtualenv`` (and ``pyenv`` unless this Python's version is available) and a package
    index for the pinned requirements; nothing of this project is installed in that env: the model's
    ``code/ldm`` is what runs.
    """
    tracking.configure(registered["workdir"])
    set_alias("ldm", "champion", "2")
    _serve_and_invoke(registered["workdir"], tmp_path, "virtualenv", startup_timeout_s=1800)
