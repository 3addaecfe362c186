"""OpenAI's images API over our generation request: translation of the request, the answer and errors.

OpenAI's SDK (``client.images.generate``) posts `serve.schemas.OpenAIImageRequest` to
``/v1/images/generations`` and expects ``{"created", "data": [{"b64_json"}]}``, with errors as
``{"error": {"message", "type", "param", "code"}}`` (the SDK raises ``openai.BadRequestError`` and
friends from them). The route itself lives on the ingress (`serve.http`); this module is the
translation, plain functions with no Serve in them.
"""

import re
import time
from typing import Any

from fastapi.responses import JSONResponse

from ldm.request import MAX_SIDE, GenerationRequest
from serve.schemas import SERVER_DEFAULTS, OpenAIImageRequest

ROUTE_PREFIX = "/v1/images/"
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def is_openai_route(path: str) -> bool:
    return ROUTE_PREFIX in path


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape; ``type`` follows OpenAI's names for the status."""
    kind = {401: "invalid_request_error", 503: "server_error", 500: "server_error"}.get(
        status, "invalid_request_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def parse_size(size: str | None, model: dict[str, Any]) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (width, height); None or ``"auto"`` -> the model's own size (None, None).

    Raises ValueError (a 400 naming ``size``) for sizes the model cannot make: sides must be
    multiples of the model's factor (``model["size_multiple"]``) and at most `MAX_SIDE`.
    """
    if size is None or size == "auto":
        return None, None
    multiple = model["size_multiple"]
    match = _SIZE.match(size)
    sides = (int(match[1]), int(match[2])) if match else None
    if sides is None or any(side < multiple or side % multiple or side > MAX_SIDE for side in sides):
        raise ValueError(
            f"size {size!r} is not one this model can make: use 'WIDTHxHEIGHT' with sides that are "
            f"multiples of {multiple} up to {MAX_SIDE} (its own size is {model['size']}x{model['size']}), "
            "or 'auto'"
        )
    return sides


def to_request(
    body: OpenAIImageRequest, width: int | None, height: int | None, defaults: dict[str, Any]
) -> GenerationRequest:
    """The generation request behind an OpenAI call; fields left out take the server's defaults."""
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "num_images": body.n,
        "seed": body.seed,
        "width": width,
        "height": height,
    }
    for key in SERVER_DEFAULTS:
        value = getattr(body, key)
        if value is not None:
            fields[key] = value
        elif key in defaults:
            fields[key] = defaults[key]
    return GenerationRequest(**fields)


def answer(result: dict[str, Any], images_b64: list[str]) -> dict[str, Any]:
    """OpenAI's ImagesResponse, plus what reproduces the images (seed, model) as extra keys."""
    return {
        "created": int(time.time()),
        "data": [{"b64_json": image} for image in images_b64],
        "output_format": "png",
        "seed": result["seed"],
        "model": result["model"],
    }
