"""The Ray Serve app over real HTTP on a private local Ray, serving a registered tiny model.

One module-scoped application (starting Serve costs ~10 s): `models:/ldm@champion` from a SQLite
MLflow registry in a temporary work dir, an API key, and a deliberately small capacity (1 replica,
1 ongoing, 1 queued) so that overload is easy to provoke.
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from ldm.config.serve import ServeConfig
from ldm.pipeline import generate, load_pipeline
from ldm.registry import register_pipeline
from ldm.testing import tiny_pipeline_folder

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEFAULT_STEPS = 2


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from serve.app import run_serve, shutdown_serve

    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("serve-workdir")
    folder = tiny_pipeline_folder(workdir / "exports" / "tiny", seed=0)
    version = register_pipeline(folder, workdir=workdir, aliases=("candidate", "champion"))
    cfg = ServeConfig(
        workdir=str(workdir),
        model="models:/ldm@champion",
        port=0,
        min_replicas=1,
        max_replicas=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        num_inference_steps=DEFAULT_STEPS,
        num_cpus=2,
    )
    os.environ["LDM_API_KEY"] = API_KEY
    try:
        base_url = run_serve(cfg, block=False)
    finally:
        os.environ.pop("LDM_API_KEY")  # the app keeps only its digest
    yield {"url": base_url, "folder": folder, "version": version}
    shutdown_serve()
    assert not serve.status().applications


def post(server, body, headers=AUTH, **kwargs):
    return requests.post(f"{server['url']}/v1/generate", json=body, headers=headers, timeout=60, **kwargs)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_healthz_names_the_model_without_auth(server):
    response = requests.get(f"{server['url']}/healthz", timeout=30)
    assert response.status_code == 200
    assert response.json()["model"]["name"] == "ldm"
    assert response.json()["model"]["version"] == server["version"] == "1"


def test_generate_returns_pngs_and_the_same_seed_gives_the_same_bytes(server):
    body = {"prompt": "a small red circle in the top left", "seed": 42, "num_images": 2}
    first = post(server, body)
    assert first.status_code == 200, first.text
    payload = first.json()
    assert payload["seed"] == 42
    assert payload["model"] == {"name": "ldm", "version": "1"}
    assert payload["num_inference_steps"] == DEFAULT_STEPS  # server default filled in
    images = [decode(b64) for b64 in payload["images"]]
    assert [(im.format, im.size) for im in images] == [("PNG", (32, 32))] * 2
    assert post(server, body).json()["images"] == payload["images"]
    # The server is a thin adapter: its image is exactly what ldm.pipeline.generate makes locally.
    local = load_pipeline(str(server["folder"])).pipe
    expected = generate(local, body["prompt"], seed=43, num_inference_steps=DEFAULT_STEPS).images[0]
    assert np.array_equal(np.asarray(images[1].convert("RGB")), np.asarray(expected))


def test_accept_png_returns_raw_bytes(server):
    body = {"prompt": "a blue square", "seed": 7, "scheduler": "euler", "num_inference_steps": 3}
    response = post(server, body, headers={**AUTH, "Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    as_json = post(server, body).json()["images"][0]
    assert base64.b64decode(as_json) == response.content


def test_seed_left_out_is_picked_and_reported(server):
    payload = post(server, {"prompt": "a green star"}).json()
    assert isinstance(payload["seed"], int) and payload["seed"] >= 0
    again = post(server, {"prompt": "a green star", "seed": payload["seed"]}).json()
    assert again["images"] == payload["images"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 201}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": "5"}, "num_inference_steps"),
        ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": -0.1}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": 30.5}, "guidance_scale"),
        ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**60}, "seed"),
        ({"prompt": "x", "seed": True}, "seed"),
        ({"prompt": "x", "seed": "1"}, "seed"),
        ({"prompt": "x", "num_images": 0}, "num_images"),
        ({"prompt": "x", "num_images": 9}, "num_images"),
        ({"prompt": "x", "scheduler": "plms"}, "scheduler"),
        ({"prompt": "x", "steps": 5}, "steps"),
    ],
)
def test_invalid_input_is_422_naming_the_field(server, body, field):
    response = post(server, body)
    assert response.status_code == 422, response.text
    assert field in {str(part) for error in response.json()["detail"] for part in error["loc"]}


@pytest.mark.parametrize("raw", ["{bad json", "[1, 2]", "null", ""])
def test_malformed_body_is_422(server, raw):
    response = requests.post(
        f"{server['url']}/v1/generate",
        data=raw,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422, response.text


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}],
)
def test_missing_or_wrong_key_is_401(server, headers):
    response = post(server, {"prompt": "x", "seed": 1}, headers=headers)
    assert response.status_code == 401
    assert API_KEY not in response.text


def test_overload_is_503_and_the_service_recovers(server):
    # capacity is 1 running + 1 queued; 10 slow requests at once must shed some with 503
    body = {"prompt": "x", "num_inference_steps": 40, "num_images": 2}
    with ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(lambda _: post(server, body).status_code, range(10)))
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert post(server, {"prompt": "x", "seed": 1}).status_code == 200
