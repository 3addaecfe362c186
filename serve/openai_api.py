"""OpenAI's images API over our generation request: translation of the request, the answer and errors.

OpenAI's SDK (``client.images.generate``) posts `serve.schemas.OpenAIImageRequest` to
``/v1/images/generations``; ``client.images.edit`` posts a multipart form (the file ``image`` and the
fields of `serve.schemas.OpenAIImageEditRequest`) to ``/v1/images/edits``, served as image to image.
Both expect ``{"created", "data": [{"b64_json"}]}``, with errors as
``{"error": {"message", "type", "param", "code"}}`` (the SDK raises ``openai.BadRequestError`` and
friends from them). The route itself lives on the ingress (`serve.http`); this module is the
translation, plain functions with no Serve in them.
"""

import re
import time
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from ldm.request import MAX_SIDE, GenerationRequest
from serve.schemas import SERVER_DEFAULTS, Img2ImgRequest, OpenAIImageEditRequest, OpenAIImageRequest

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


def validation_error(errors: list[Any]) -> JSONResponse:
    """A 400 in OpenAI's shape naming the first bad field of a pydantic/FastAPI validation error."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    fields = [str(part) for part in first["loc"] if part != "body"]
    param = fields[0] if fields else None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return error(400, message.encode("ascii", "replace").decode(), param, "invalid_value")


class FormError(ValueError):
    """A multipart form of /v1/images/edits that cannot be served; ``param`` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


async def read_edit_form(form: FormData) -> tuple[bytes, OpenAIImageEditRequest]:
    """The image bytes and the validated text fields of an ``images.edit`` form.

    The SDK sends one image as the file ``image`` (several as ``image[]``); this model edits exactly
    one. A ``mask`` (inpainting) would change the answer and is not supported: a 400, not ignored.
    Raises `FormError` or pydantic's ValidationError.
    """
    images = [*form.getlist("image"), *form.getlist("image[]")]
    if len(images) != 1 or not isinstance(images[0], UploadFile):
        raise FormError(f"send exactly one image file as 'image' (got {len(images)})", "image")
    if "mask" in form:
        raise FormError("masks (inpainting) are not supported by this model: send the image only", "mask")
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    body = OpenAIImageEditRequest.model_validate(fields)
    return await images[0].read(), body


def _fields(
    body: OpenAIImageRequest, width: int | None, height: int | None, defaults: dict[str, Any]
) -> dict[str, Any]:
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
    return fields


def to_request(
    body: OpenAIImageRequest, width: int | None, height: int | None, defaults: dict[str, Any]
) -> GenerationRequest:
    """The generation request behind an OpenAI call; fields left out take the server's defaults."""
    return GenerationRequest(**_fields(body, width, height, defaults))


def to_edit_request(
    body: OpenAIImageEditRequest,
    init_image_b64: str,
    width: int | None,
    height: int | None,
    defaults: dict[str, Any],
) -> Img2ImgRequest:
    """The image-to-image request behind an ``images.edit`` call (the image already checked)."""
    fields = _fields(body, width, height, defaults)
    return Img2ImgRequest(**fields, strength=body.strength, init_image=init_image_b64)


def answer(result: dict[str, Any], images_b64: list[str]) -> dict[str, Any]:
    """OpenAI's ImagesResponse, plus what reproduces the images (seed, model) as extra keys."""
    return {
        "created": int(time.time()),
        "data": [{"b64_json": image} for image in images_b64],
        "output_format": "png",
        "seed": result["seed"],
        "model": result["model"],
    }
