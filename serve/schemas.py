"""The request bodies of the HTTP API (CONTRACT.md "HTTP API"), as pydantic models.

FastAPI validates every body against these before any model code runs: a wrong field is a 422 whose
``detail[].loc`` names the field, never a 500. The models also document the API: they are what
``/openapi.json`` (and the ``/docs`` page) show.
"""

import base64
import binascii
import io
import unicodedata
from typing import Annotated, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ldm.pipeline import MAX_SEED

MAX_PROMPT_CHARS = 2000
# Whitespace controls that a pasted prompt may legitimately hold.
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def _clean_text(text: str) -> str:
    """Refuse text the tokenizer and the logs should never see: lone surrogates and control characters.

    JSON allows ``"\\ud800"`` (half of a UTF-16 pair), which Python keeps as an unencodable string;
    NUL and other C0/C1 controls are never part of a real prompt. Everything else (emoji, CJK,
    right-to-left scripts, combining marks, zero-width joiners) is a valid prompt.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from error
    for char in text:
        if unicodedata.category(char) == "Cc" and char not in _ALLOWED_CONTROLS:
            raise ValueError(f"text must not contain control character U+{ord(char):04X}")
    return text


def _not_blank(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must not be blank")
    return prompt


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw."),
    AfterValidator(_clean_text),
    AfterValidator(_not_blank),
]
NegativePrompt = Annotated[
    str,
    Field(max_length=MAX_PROMPT_CHARS, description="What to steer away from (classifier-free guidance)."),
    AfterValidator(_clean_text),
]


class GenerateRequest(BaseModel):
    """Body of ``POST /v1/generate``; fields left out (null) take the server's defaults."""

    # strict: "5" is not a step count and true is not a seed; extra: a misspelt field is an error.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="Sampler steps.")
    guidance_scale: float | None = Field(
        None, ge=0.0, le=30.0, allow_inf_nan=False, description="Classifier-free guidance scale."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i; null picks one (returned)."
    )
    num_images: int = Field(1, ge=1, le=8, description="Images for this prompt.")
    scheduler: Literal["ddim", "dpmpp", "euler"] | None = Field(
        None, description="Sampler, built from the model's own scheduler config."
    )


class Img2ImgRequest(GenerateRequest):
    """Body of ``POST /v1/img2img``: a text-to-image request plus an init image and a strength."""

    init_image: str = Field(
        description="The starting image: base64 PNG/JPEG/WebP (a data: URL prefix is accepted); "
        "resized to the model's output size. Decoded by the server, which answers 422 when it is not "
        "an image or is too large.",
    )
    strength: float = Field(
        0.6,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="How far to move from the init image: noise level in (0, 1]; 1 ignores it.",
    )


def decode_image(encoded: str, max_pixels: int | None) -> Image.Image:
    """base64 (optionally a ``data:image/...;base64,`` URL) -> a fully loaded RGB PIL image.

    Raises ValueError for anything that is not a complete image, or one with more than ``max_pixels``
    pixels (checked from the header, before the pixels are decoded).
    """
    if encoded.startswith("data:"):
        header, _, encoded = encoded.partition(",")
        if not header.endswith(";base64"):
            raise ValueError("a data: URL must be base64-encoded")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("not valid base64") from error
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ValueError(f"image is {width}x{height}, more than {max_pixels} pixels")
        image.load()  # truncated or corrupt files fail here, not later inside the model
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a readable image ({type(error).__name__})") from error
    return image.convert("RGB")
