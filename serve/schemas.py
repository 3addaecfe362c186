"""The request bodies of the HTTP API (docs/SERVING.md), as pydantic models.

``/v1/generate`` takes `ldm.request.GenerationRequest` itself and ``/v1/img2img`` an
`ImageToImageRequest` plus the init image: the fields and limits are the ones the CLI and the library
use, defined once. FastAPI validates every body against these before any model code runs: a wrong
field is a 422 whose ``detail[].loc`` names the field, never a 500. ``/v1/images/generations`` takes
`OpenAIImageRequest`, what OpenAI's SDK sends, and ``/v1/images/edits`` the multipart form of
`OpenAIImageEditRequest`. The models also document the API: they are what
``/openapi.json`` (and the ``/docs`` page) show.
"""

import base64
import binascii
import io
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ldm.request import (
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    GenerationRequest,
    ImageToImageRequest,
    NegativePrompt,
    Prompt,
    SchedulerName,
)

# Fields the server fills from its config when a request leaves them out.
SERVER_DEFAULTS = ("num_inference_steps", "guidance_scale", "scheduler")

GenerateRequest = GenerationRequest  # the body of /v1/generate


class Img2ImgRequest(ImageToImageRequest):
    """Body of ``POST /v1/img2img``: an image-to-image request plus the init image."""

    init_image: str = Field(
        description="The starting image: base64 PNG/JPEG/WebP (a data: URL prefix is accepted); "
        "resized to the requested (or the model's) size. Decoded by the server, which answers 422 when "
        "it is not an image or is too large.",
    )


class OpenAIImageRequest(BaseModel):
    """Body of ``POST /v1/images/generations`` as OpenAI's SDK sends it (``client.images.generate``).

    Fields OpenAI defines that mean nothing for this model (``quality``, ``style``, ``user``,
    ``background``, ``moderation``, ...) are accepted and ignored; those that would change the answer
    and cannot be honoured (``response_format: url``, a non-PNG ``output_format``, ``stream``) are a
    400. Through the SDK's ``extra_body`` the generation fields of ``/v1/generate`` are accepted too.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: Prompt
    model: str | None = Field(None, description="Ignored: the server serves the model it loaded.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Number of images.")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" in pixels, or "auto" (the model\'s size).')
    response_format: Literal["b64_json"] | None = Field(
        None, description="Only b64_json: this server stores no images to link to."
    )
    output_format: Literal["png"] | None = None
    stream: Literal[False] | None = None
    # extra_body fields: the generation options of /v1/generate.
    negative_prompt: NegativePrompt = ""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
    scheduler: SchedulerName | None = None


class OpenAIImageEditRequest(OpenAIImageRequest):
    """The form fields of ``POST /v1/images/edits`` (``client.images.edit``), served as image to image.

    The image itself is the multipart file ``image``; these are the text fields beside it. Form fields
    arrive as text, so numbers are parsed here (lax mode: ``"2"`` is 2) where the JSON bodies are strict.
    ``strength`` (through ``extra_body``) is the img2img noise level of `ImageToImageRequest`.
    """

    model_config = ConfigDict(extra="ignore", strict=False)

    strength: float = Field(
        0.6, gt=0.0, le=1.0, allow_inf_nan=False, description="How far to move from the image (0, 1]."
    )


def decode_image(encoded: str, max_pixels: int | None) -> Image.Image:
    """base64 (optionally a ``data:image/...;base64,`` URL) -> a fully loaded RGB PIL image.

    Raises ValueError for anything that is not valid base64 or not a complete image (see `read_image`).
    """
    if encoded.startswith("data:"):
        header, _, encoded = encoded.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data: URL must be base64-encoded")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("not valid base64") from error
    return read_image(raw, max_pixels)


def read_image(raw: bytes, max_pixels: int | None) -> Image.Image:
    """Image file bytes -> a fully loaded RGB PIL image.

    Raises ValueError for anything that is not a complete image, or one with more than ``max_pixels``
    pixels (checked from the header, before the pixels are decoded).
    """
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"image is {width}x{height}, more than {max_pixels} pixels")
        image.load()  # truncated or corrupt files fail here, not later inside the model
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({type(error).__name__})") from error
    return image.convert("RGB")
