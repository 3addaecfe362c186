"""The Ray Serve app over real HTTP on a private local Ray, serving registered tiny models.

One Serve instance for the module (starting Serve costs ~10 s) with two applications:

- ``ldm`` at ``/``: ``models:/ldm@champion`` (version 1) from a SQLite MLflow registry in a temporary
  work dir, an API key, a small capacity (1 replica, 4 ongoing, 8 queued) so that overload is easy
  to provoke, and a batch window long enough that concurrent requests meet in one batch;
- ``reload`` at ``/reload``: the same alias with hot reload polling every second, for the tests that
  move ``champion`` (the ``ldm`` app does not poll, so its model never changes under other tests).
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from ldm.config.serve import ServeConfig
from ldm.pipeline import generate, generate_img2img, load_pipeline
from ldm.registry import register_pipeline, set_alias
from ldm.testing import tiny_pipeline, tiny_pipeline_folder

API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
DEFAULT_STEPS = 2
MAX_BODY = 64 * 1024
MAX_PIXELS = 64 * 64


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from serve.app import run_serve, shutdown_serve

    torch.set_num_threads(1)
    workdir = tmp_path_factory.mktemp("serve-workdir")
    folder = tiny_pipeline_folder(workdir / "exports" / "tiny", seed=0)
    version = register_pipeline(folder, workdir=workdir, aliases=("candidate", "champion"))
    common = dict(
        workdir=str(workdir),
        model="models:/ldm@champion",
        port=0,
        min_replicas=1,
        max_replicas=1,
        replica_num_cpus=0.1,  # both apps and the tests share the 2 CPUs of the session Ray
        num_inference_steps=DEFAULT_STEPS,
        num_cpus=2,
    )
    cfg = ServeConfig(
        **common,
        max_ongoing_requests=4,
        max_queued_requests=8,
        max_batch_size=4,
        batch_wait_timeout_s=0.5,
        reload_interval_s=0,
        max_body_bytes=MAX_BODY,
        max_init_image_pixels=MAX_PIXELS,
    )
    reload_cfg = ServeConfig(**common, route_prefix="/reload", reload_interval_s=1.0, max_queued_requests=32)
    os.environ["LDM_API_KEY"] = API_KEY
    try:
        base_url = run_serve(cfg, block=False)
        reload_url = run_serve(reload_cfg, block=False, name="reload")
    finally:
        os.environ.pop("LDM_API_KEY")  # the app keeps only its digest
    yield {
        "url": base_url,
        "reload_url": reload_url,
        "folder": folder,
        "version": version,
        "workdir": workdir,
    }
    shutdown_serve()
    assert not serve.status().applications


@pytest.fixture(scope="module")
def local_pipe(server):
    return load_pipeline(str(server["folder"])).pipe


def post(server, body, headers=AUTH, route="/v1/generate", **kwargs):
    return requests.post(f"{server['url']}{route}", json=body, headers=headers, timeout=60, **kwargs)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_healthz_names_the_model_without_auth(server):
    response = requests.get(f"{server['url']}/healthz", timeout=30)
    assert response.status_code == 200
    assert response.json()["model"]["name"] == "ldm"
    assert response.json()["model"]["version"] == server["version"] == "1"


def test_generate_returns_pngs_and_the_same_seed_gives_the_same_bytes(server, local_pipe):
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
    # The server is a thin adapter: its image is what ldm.pipeline.generate makes locally (up to the
    # last-bit rounding of batched matmuls, the tolerance of the pipeline tests).
    expected = generate(local_pipe, body["prompt"], seed=43, num_inference_steps=DEFAULT_STEPS).images[0]
    assert np.abs(pixels(images[1]) - pixels(expected)).max() <= 2


def test_concurrent_compatible_requests_share_one_pipeline_call(server, local_pipe):
    bodies = [
        {"prompt": prompt, "seed": 100 + i, "negative_prompt": "blurry" if i % 2 else ""}
        for i, prompt in enumerate(["a red circle", "a blue square", "a green star", "a pink triangle"])
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(server, body), bodies))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    sizes = [r.json()["batch"]["requests"] for r in responses]
    assert max(sizes) >= 2, sizes  # the 0.5 s batch window merged concurrent requests
    for body, response in zip(bodies, responses, strict=True):
        alone = generate(
            local_pipe,
            body["prompt"],
            negative_prompt=body["negative_prompt"],
            seed=body["seed"],
            num_inference_steps=DEFAULT_STEPS,
        ).images[0]
        assert np.abs(pixels(decode(response.json()["images"][0])) - pixels(alone)).max() <= 2


def test_incompatible_requests_are_not_merged(server):
    bodies = [{"prompt": "x", "seed": i, "num_inference_steps": 2 + i % 2} for i in range(4)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        payloads = [r.json() for r in pool.map(lambda body: post(server, body), bodies)]
    # Two step counts: a pipeline call holds at most the two requests that share one.
    assert all(p["batch"]["requests"] <= 2 for p in payloads), payloads
    assert [p["num_inference_steps"] for p in payloads] == [2, 3, 2, 3]


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
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "a red\u0000 circle"}, "prompt"),
        ({"prompt": "half a pair \ud800"}, "prompt"),
        ({"prompt": "x", "negative_prompt": 3}, "negative_prompt"),
        ({"prompt": "x", "negative_prompt": "\u0007bell"}, "negative_prompt"),
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
        ({"prompt": "x", "num_images": None}, "num_images"),
        ({"prompt": "x", "scheduler": "plms"}, "scheduler"),
        ({"prompt": "x", "scheduler": 1}, "scheduler"),
        ({"prompt": "x", "steps": 5}, "steps"),
        ({"prompt": "x", "width": 36}, "width"),  # not a multiple of the model's factor (8)
        ({"prompt": "x", "height": 4}, "height"),
        ({"prompt": "x", "width": 4096}, "width"),
        ({"prompt": "x", "height": "32"}, "height"),
    ],
)
def test_invalid_input_is_422_naming_the_field(server, body, field):
    response = post(server, body)
    assert response.status_code == 422, response.text
    assert field in {str(part) for error in response.json()["detail"] for part in error["loc"]}


@pytest.mark.parametrize("raw", ["{bad json", "[1, 2]", "null", "", '"prompt"', "\xff\xfe"])
def test_malformed_body_is_422(server, raw):
    response = requests.post(
        f"{server['url']}/v1/generate",
        data=raw.encode("latin-1"),
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422, response.text


def test_oversized_body_is_413_before_parsing(server):
    body = {"prompt": "x" * (MAX_BODY + 10)}
    assert post(server, body).status_code == 413
    assert post(server, body, route="/v1/img2img").status_code == 413


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle 🔴 in the top left",
        "一个红色的圆",
        "دائرة حمراء",
        "e\u0301te\u0301 square",  # combining accents
        "a family 👨\u200d👩\u200d👧 of circles",  # zero-width joiners
        "tab\tand\nnewline",
    ],
)
def test_odd_but_valid_unicode_generates(server, prompt):
    response = post(server, {"prompt": prompt, "seed": 3, "num_inference_steps": 1})
    assert response.status_code == 200, response.text
    assert decode(response.json()["images"][0]).size == (32, 32)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}],
)
@pytest.mark.parametrize("route", ["/v1/generate", "/v1/img2img", "/openapi.json"])
def test_missing_or_wrong_key_is_401(server, headers, route):
    response = requests.post(f"{server['url']}{route}", json={"prompt": "x"}, headers=headers, timeout=30)
    assert response.status_code == 401
    assert API_KEY not in response.text


def test_openapi_documents_the_api(server):
    schema = requests.get(f"{server['url']}/openapi.json", headers=AUTH, timeout=30).json()
    assert {"/v1/generate", "/v1/img2img", "/healthz"} <= set(schema["paths"])
    components = schema["components"]["schemas"]
    fields = set(components["GenerationRequest"]["properties"])
    assert fields == {
        "width",
        "height",
        "prompt",
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "seed",
        "num_images",
        "scheduler",
    }
    assert components["GenerationRequest"]["required"] == ["prompt"]
    assert {"init_image", "strength"} <= set(components["Img2ImgRequest"]["properties"])
    assert "dpmpp" in str(components["GenerationRequest"]["properties"]["scheduler"])
    assert "/v1/images/generations" in schema["paths"]


def test_img2img_follows_the_local_pipeline_and_the_seed(server, local_pipe):
    init_image = Image.new("RGB", (48, 40), (200, 30, 30))
    body = {"prompt": "a blue square", "init_image": png_b64(init_image), "strength": 0.5}
    body |= {"seed": 9, "num_inference_steps": 4, "num_images": 2}
    response = post(server, body, route="/v1/img2img")
    assert response.status_code == 200, response.text
    payload = response.json()
    assert payload["strength"] == 0.5 and payload["seed"] == 9
    images = [decode(b64) for b64 in payload["images"]]
    assert [im.size for im in images] == [(32, 32)] * 2
    assert post(server, body, route="/v1/img2img").json()["images"] == payload["images"]
    local = generate_img2img(
        local_pipe, init_image, "a blue square", strength=0.5, seed=9, num_inference_steps=4, num_images=2
    ).images
    assert np.abs(pixels(images[1]) - pixels(local[1])).max() <= 2
    # strength matters: a weaker strength stays closer to the (uniform red) init image
    weak = post(server, {**body, "strength": 0.25}, route="/v1/img2img").json()["images"][0]
    red = np.array([200, 30, 30])
    assert np.abs(pixels(decode(weak)) - red).mean() < np.abs(pixels(images[0]) - red).mean()


def _truncated_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[:60]).decode("ascii")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"init_image": None}, "init_image"),
        ({"init_image": "not base64 at all!"}, "init_image"),
        ({"init_image": base64.b64encode(b"hello, not an image").decode()}, "init_image"),
        ({"init_image": _truncated_png()}, "init_image"),
        ({"init_image": png_b64(Image.new("RGB", (65, 64)))}, "init_image"),  # over MAX_PIXELS
        ({"strength": 0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"strength": "half"}, "strength"),
        ({"strength": 0.1, "num_inference_steps": 5}, "strength"),  # int(5 x 0.1) = 0 steps
        ({"prompt": ""}, "prompt"),
        ({"num_images": 9}, "num_images"),
    ],
)
def test_img2img_invalid_input_is_422_naming_the_field(server, change, field):
    body = {"prompt": "x", "init_image": png_b64(Image.new("RGB", (16, 16))), "strength": 0.5, **change}
    body = {key: value for key, value in body.items() if value is not None}
    response = post(server, body, route="/v1/img2img")
    assert response.status_code == 422, response.text
    assert field in {str(part) for error in response.json()["detail"] for part in error["loc"]}


def test_img2img_accepts_a_data_url(server):
    init = "data:image/png;base64," + png_b64(Image.new("RGB", (32, 32), "blue"))
    response = post(server, {"prompt": "x", "init_image": init, "seed": 1}, route="/v1/img2img")
    assert response.status_code == 200, response.text


def test_overload_is_503_and_the_service_recovers(server):
    # capacity is 4 running + 8 queued; 32 slow requests at once must shed some with 503
    body = {"prompt": "x", "num_inference_steps": 60, "num_images": 4}
    with ThreadPoolExecutor(32) as pool:
        codes = sorted(pool.map(lambda _: post(server, body).status_code, range(32)))
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    assert post(server, {"prompt": "x", "seed": 1}).status_code == 200


def _health_version(url: str) -> str:
    return requests.get(f"{url}/healthz", timeout=30).json()["model"]["version"]


def _wait_for_version(url: str, version: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while _health_version(url) != version:
        assert time.monotonic() < deadline, f"/healthz never reported version {version}"
        time.sleep(0.5)


def test_hot_reload_switches_version_without_dropping_requests(server):
    url, workdir = server["reload_url"], server["workdir"]
    assert _health_version(url) == "1"
    new_folder = tiny_pipeline_folder(workdir / "exports" / "tiny-v2", seed=1)
    new_version = register_pipeline(new_folder, workdir=workdir, aliases=("candidate",))
    assert new_version == "2"

    # Keep requests in flight while the alias moves and the replica swaps models.
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def keep_calling() -> None:
        while not stop.is_set():
            response = requests.post(
                f"{url}/v1/generate",
                json={"prompt": "a red circle", "seed": 0, "num_inference_steps": 20},
                headers=AUTH,
                timeout=60,
            )
            version = response.json()["model"]["version"] if response.ok else None
            answers.append((response.status_code, version))

    callers = [threading.Thread(target=keep_calling) for _ in range(3)]
    for caller in callers:
        caller.start()
    try:
        time.sleep(1.0)
        set_alias("ldm", "champion", new_version)
        _wait_for_version(url, new_version)
        # Batches that started before the swap finish on version 1; wait for one that started after
        # (no fixed sleep: a 20-step batch can take seconds on a loaded machine).
        deadline = time.monotonic() + 120
        while (new_version, 200) not in {(version, code) for code, version in answers}:
            assert time.monotonic() < deadline, answers
            time.sleep(0.2)
    finally:
        stop.set()
        for caller in callers:
            caller.join()
    assert {code for code, _ in answers} == {200}, answers
    versions = [version for _, version in answers]
    # One replica runs one batch at a time: once version 2 answered, version 1 never answers again.
    assert versions[0] == "1" and versions[-1] == "2" and versions == sorted(versions), versions
    # The new version really serves the new weights: the image is the v2 model's.
    served = post({"url": url}, {"prompt": "a red circle", "seed": 4}).json()
    assert served["model"]["version"] == "2"
    expected = generate(load_pipeline(str(new_folder)).pipe, "a red circle", seed=4, num_inference_steps=2)
    assert np.abs(pixels(decode(served["images"][0])) - pixels(expected.images[0])).max() <= 2


def test_hot_reload_refuses_a_broken_version(server):
    url, workdir = server["reload_url"], server["workdir"]
    before = _health_version(url)
    broken = tiny_pipeline(seed=2)
    with torch.no_grad():
        for parameter in broken.unet.parameters():
            parameter.fill_(float("nan"))
    from ldm.pipeline import save_pipeline

    folder = save_pipeline(broken, workdir / "exports" / "tiny-nan")
    bad_version = register_pipeline(folder, workdir=workdir, aliases=("champion",))
    time.sleep(6)  # several polls (1 s) and a load: time enough to have swapped, had it been accepted
    assert _health_version(url) == before != bad_version
    assert post({"url": url}, {"prompt": "x", "seed": 1}).status_code == 200


def test_width_and_height_set_the_image_size(server, local_pipe):
    body = {"prompt": "a red circle", "seed": 6, "width": 48, "height": 32}
    response = post(server, body)
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0])
    assert image.size == (48, 32)
    local = generate(
        local_pipe, "a red circle", seed=6, width=48, height=32, num_inference_steps=DEFAULT_STEPS
    )
    assert np.abs(pixels(image) - pixels(local.images[0])).max() <= 2


def openai_client(server, api_key: str = API_KEY):
    from openai import OpenAI

    # max_retries=0: the SDK retries 5xx by itself, which would hide what the server answered.
    return OpenAI(base_url=f"{server['url']}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_openai_sdk_images_generate(server, local_pipe):
    client = openai_client(server)
    result = client.images.generate(
        model="ldm",
        prompt="a small red circle in the top left",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 11},
    )
    assert isinstance(result.created, int) and len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (32, 32))] * 2
    expected = generate(
        local_pipe, "a small red circle in the top left", seed=12, num_inference_steps=DEFAULT_STEPS
    )
    assert np.abs(pixels(images[1]) - pixels(expected.images[0])).max() <= 2
    # size left out ("auto"), fields OpenAI defines but this model has no use for: ignored
    plain = client.images.generate(prompt="a blue square", quality="high", user="someone")
    assert decode(plain.data[0].b64_json).size == (32, 32)
    wide = client.images.generate(prompt="a blue square", size="64x32")
    assert decode(wide.data[0].b64_json).size == (64, 32)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"response_format": "url"}, "response_format"),
        ({"size": "30x30"}, "size"),  # not a multiple of 8
        ({"size": "big"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"n": 9}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"extra_body": {"scheduler": "plms"}}, "scheduler"),
    ],
)
def test_openai_sdk_errors_are_400_in_openais_shape(server, options, param):
    import openai

    arguments = {"prompt": "x", **options}
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(server).images.generate(**arguments)
    error = raised.value.response.json()["error"]
    assert raised.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


def test_openai_sdk_wrong_key_is_401(server):
    import openai

    with pytest.raises(openai.AuthenticationError) as raised:
        openai_client(server, api_key="wrong").images.generate(prompt="x")
    assert raised.value.response.json()["error"]["code"] == "invalid_api_key"


def png_file(image: Image.Image) -> bytes:
    return base64.b64decode(png_b64(image))


def test_openai_sdk_images_edit_is_image_to_image(server, local_pipe):
    init_image = Image.new("RGB", (48, 40), (200, 30, 30))
    client = openai_client(server)
    result = client.images.edit(
        image=("init.png", png_file(init_image), "image/png"),
        prompt="a blue square",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 9, "strength": 0.5, "num_inference_steps": 4},
    )
    images = [decode(item.b64_json) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (32, 32))] * 2
    # The same image-to-image run as /v1/img2img and the local pipeline (the multipart fields are text
    # on the wire: "9", "0.5" and "4" arrive as numbers).
    local = generate_img2img(
        local_pipe, init_image, "a blue square", strength=0.5, seed=9, num_inference_steps=4, num_images=2
    ).images
    assert np.abs(pixels(images[1]) - pixels(local[1])).max() <= 2
    # A plain call (size "auto", server defaults) answers the model's own size.
    plain = client.images.edit(image=("init.png", png_file(init_image), "image/png"), prompt="x")
    assert decode(plain.data[0].b64_json).size == (32, 32)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"image": ("x.png", b"hello, not an image", "image/png")}, "image"),
        ({"image": ("x.png", png_file(Image.new("RGB", (65, 64))), "image/png")}, "image"),  # > MAX_PIXELS
        ({"image": [("a.png", png_file(Image.new("RGB", (8, 8))), "image/png")] * 2}, "image"),
        ({"mask": ("m.png", png_file(Image.new("RGBA", (16, 16))), "image/png")}, "mask"),
        ({"response_format": "url"}, "response_format"),
        ({"size": "30x30"}, "size"),
        ({"n": 9}, "n"),
        ({"extra_body": {"strength": 1.5}}, "strength"),
        ({"extra_body": {"strength": 0.1, "num_inference_steps": 5}}, "strength"),
    ],
)
def test_openai_sdk_edit_errors_are_400_in_openais_shape(server, options, param):
    import openai

    arguments = {"image": ("x.png", png_file(Image.new("RGB", (16, 16))), "image/png"), "prompt": "x"}
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client(server).images.edit(**(arguments | options))
    error = raised.value.response.json()["error"]
    assert raised.value.status_code == 400
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


def test_images_edit_without_a_file_is_400_and_needs_the_key(server):
    url = f"{server['url']}/v1/images/edits"
    missing = requests.post(url, data={"prompt": "x"}, headers=AUTH, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image", missing.text
    files = {"image": ("x.png", png_file(Image.new("RGB", (16, 16))), "image/png")}
    unauthorised = requests.post(url, data={"prompt": "x"}, files=files, timeout=60)
    assert unauthorised.status_code == 401
