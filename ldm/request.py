"""One generation request: the fields, their limits and the sampler names, defined once.

`GenerationRequest` (text to image) and `ImageToImageRequest` are what every caller speaks: the CLI
(`ldm generate` builds one from its flags), `ldm.pipeline` (`generate`, `generate_batch`,
`generate_img2img` run them), the HTTP API (the bodies of ``/v1/generate`` and ``/v1/img2img`` are
these models, so FastAPI's 422 names the same fields with the same limits), the OpenAI-compatible
route and the MLflow pyfunc (both translate their own shapes into a `GenerationRequest`).

The models are strict (``"5"`` is not a step count, ``true`` is not a seed) and forbid unknown fields
(a misspelt option is an error, not silently ignored). What depends on the loaded model (the image
size must be a multiple of its downsampling factor) is checked where the model is known:
`ldm.pipeline.check_size`.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SchedulerName = Literal["ddim", "dpmpp", "euler"]
SCHEDULERS: tuple[SchedulerName, ...] = get_args(SchedulerName)

# Seeds up to 2**53 - 1 survive a round trip through JSON in every client (JavaScript numbers are
# doubles), and seed + image index stays far below torch's 64-bit limit.
MAX_SEED = 2**53 - 1
MAX_PROMPT_CHARS = 2000
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_IMAGES = 8
# Largest image side a request may ask for; the model's own factor is checked by the pipeline.
MAX_SIDE = 2048

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
Side = Annotated[
    int | None,
    Field(
        ge=8,
        le=MAX_SIDE,
        description="Image side in pixels, a multiple of the model's downsampling factor; "
        "null is the model's own size.",
    ),
]


class GenerationRequest(BaseModel):
    """One text-to-image request: ``num_images`` images of ``prompt``; image ``i`` uses ``seed + i``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: Prompt
    negative_prompt: NegativePrompt = ""
    num_inference_steps: int = Field(25, ge=1, le=MAX_STEPS, description="Sampler steps.")
    guidance_scale: float = Field(
        4.0, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False, description="Classifier-free guidance scale."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i; null picks one (returned)."
    )
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="Images for this prompt.")
    scheduler: SchedulerName = Field(
        "dpmpp", description="Sampler, built from the model's own (training) scheduler config."
    )
    width: Side = None
    height: Side = None

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one pipeline call (one sampler, one guidance, one size)."""
        return (self.num_inference_steps, self.guidance_scale, self.scheduler, self.height, self.width)


class ImageToImageRequest(GenerationRequest):
    """Image to image: the init image noised to ``strength``, then denoised toward the prompt.

    The sampler runs ``int(num_inference_steps * strength)`` steps, which must be at least 1.
    """

    strength: float = Field(
        0.6,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="How far to move from the init image: noise level in (0, 1]; 1 ignores it.",
    )

    def denoising_steps(self) -> int:
        return int(self.num_inference_steps * self.strength)
