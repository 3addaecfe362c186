"""The one generation entry point: assemble, save, load and run the diffusers pipeline.

The CLI (`ldm generate`), the Ray Serve app, the demo, the notebooks and the tests all generate
through `generate()` (STYLE.md 8), so the same request with the same seed gives the same images
wherever it runs. Sampling itself is diffusers' `StableDiffusionPipeline` with diffusers' schedulers
(STYLE.md 3: reuse them where they fit); this module only adds what the project promises on top:

- seeds: one CPU `torch.Generator` per image, seeded ``seed + i``, so image ``i`` of a batch equals
  the single image generated with seed ``seed + i`` (CPU generators also make a seed mean the same
  image on a GPU, up to float rounding);
- a fresh scheduler per call, built from the model's own scheduler config, so concurrent requests
  on one loaded pipeline never share scheduler state;
- loading from a local folder, an ``s3://`` folder or an MLflow model URI, safetensors only;
- `generate_batch`: compatible requests (same steps, guidance, scheduler, size) as one pipeline call,
  each with its own prompt, negative prompt and seed (the server's dynamic batching);
- `generate_img2img`: image-to-image over the same components (`StableDiffusionImg2ImgPipeline`);
- `check_pipeline`: a one-step probe that fails on non-finite pixels (the server's health check).
"""

from __future__ import annotations

import math
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

SchedulerName = Literal["ddim", "dpmpp", "euler"]
SCHEDULERS: tuple[SchedulerName, ...] = ("ddim", "dpmpp", "euler")

# Seeds up to 2**53 - 1 survive a round trip through JSON in every client (JavaScript numbers are
# doubles), and seed + image index stays far below torch's 64-bit limit.
MAX_SEED = 2**53 - 1

# The training noise schedule of Stable Diffusion (scaled_linear 0.00085 -> 0.012 over 1000 steps).
# steps_offset/clip_sample/set_alpha_to_one as below, or StableDiffusionPipeline rewrites the config
# with a deprecation warning (TRAPS.md).
DEFAULT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}


@dataclass(frozen=True)
class LoadedModel:
    """A ready pipeline and where it came from (name/version are None for a plain folder version)."""

    pipe: object  # diffusers.StableDiffusionPipeline (kept untyped so importing this module stays light)
    name: str | None
    version: str | None
    uri: str


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seed: int  # the seed of the first image; image i used seed + i


def default_scheduler():
    from diffusers import DDPMScheduler

    # from_config (not the constructor) so that set_alpha_to_one, a DDIM-only key, stays in the
    # saved config and reaches the DDIM sampler built from it.
    return DDPMScheduler.from_config(DEFAULT_SCHEDULER_CONFIG)


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """A `StableDiffusionPipeline` from our parts; ``scheduler`` should be the training scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler if scheduler is not None else default_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str | Path) -> Path:
    """Write the pipeline as a diffusers folder (``model_index.json`` + safetensors weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _from_folder(folder: Path, model_uri: str):
    from diffusers import StableDiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_uri}: not a diffusers pipeline folder (no model_index.json)")
    # use_safetensors=True: a folder holding only pickled weights fails instead of being unpickled.
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)


def load_pipeline(model_uri: str, device: str = "cpu") -> LoadedModel:
    """Load a pipeline from a local folder, an ``s3://`` folder or ``models:/...``/``runs:/...``."""
    from ldm import storage

    model_uri = str(model_uri)
    if model_uri.startswith(("models:/", "runs:/")):
        from ldm.registry import resolve_model_uri

        # The MLflow download is a private temporary copy: the weights are in memory once loaded.
        with tempfile.TemporaryDirectory(prefix="ldm-model-") as tmp:
            folder, name, version = resolve_model_uri(model_uri, dst_path=tmp)
            pipe = _from_folder(folder, model_uri)
    else:
        folder = storage.materialize(model_uri)
        # the folder's own name (for s3:// the last part of the URI, not the cache folder's hash)
        name, version = model_uri.rstrip("/").rsplit("/", 1)[-1] or folder.resolve().name, None
        pipe = _from_folder(folder, model_uri)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, name=name, version=version, uri=model_uri)


def make_scheduler(pipe, name: SchedulerName):
    """A new sampler of kind ``name`` built from the model's own (training) scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpmpp": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    # diffusers' from_config lets the target class re-default the keys listed in `_use_default_values`,
    # a list that save_pretrained drops: without removing it here, an in-memory pipeline and the same
    # pipeline reloaded from disk would sample with different timestep spacings (measured).
    config = {key: value for key, value in pipe.scheduler.config.items() if key != "_use_default_values"}
    return classes[name].from_config(config)


def _validate(prompts, negative_prompt, num_inference_steps, guidance_scale, seed, num_images, scheduler):
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    if not isinstance(negative_prompt, str):
        raise ValueError("negative_prompt must be a string")
    if (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float):
        raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be finite and >= 0, got {guidance_scale!r}")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED
    ):
        raise ValueError(f"seed must be None or an integer in [0, {MAX_SEED}], got {seed!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")


def output_size(pipe) -> int:
    """Side of the images the pipeline makes by default: U-Net sample size x VAE scale factor."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def _check_size(pipe, height: int | None, width: int | None) -> None:
    multiple = max(8, pipe.vae_scale_factor)
    for label, side in (("height", height), ("width", width)):
        if side is not None and (
            isinstance(side, bool) or not isinstance(side, int) or side < multiple or side % multiple
        ):
            raise ValueError(f"{label} must be a positive multiple of {multiple}, got {side!r}")


def _pick_seed(seed: int | None, total: int) -> int:
    # Picking the seed is the only randomness outside torch.
    return secrets.randbelow(MAX_SEED - total) if seed is None else seed


def _view(pipe, scheduler: SchedulerName, cls=None):
    """A per-call pipeline sharing the (read-only) modules of ``pipe`` but with its own scheduler.

    Concurrent calls never step each other's scheduler state; ``cls`` picks another pipeline class
    over the same components (image-to-image).
    """
    components = {**pipe.components, "scheduler": make_scheduler(pipe, scheduler)}
    view = (cls or type(pipe))(**components, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    return view


def generate(
    pipe,
    prompts: list[str] | str,
    *,
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int | None = None,
    num_images: int = 1,
    scheduler: SchedulerName = "dpmpp",
    height: int | None = None,
    width: int | None = None,
) -> GenerationResult:
    """Generate ``num_images`` images per prompt; the same arguments and seed give the same images.

    Images come in prompt order, ``num_images`` per prompt; image ``i`` is drawn from a generator
    seeded ``seed + i``. With ``seed=None`` a seed is picked and returned in the result.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _validate(prompts, negative_prompt, num_inference_steps, guidance_scale, seed, num_images, scheduler)
    _check_size(pipe, height, width)
    total = len(prompts) * num_images
    seed = _pick_seed(seed, total)
    # CPU generators: the same seed means the same initial noise on any device.
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(total)]
    output = _view(pipe, scheduler)(
        prompt=prompts,
        negative_prompt=[negative_prompt] * len(prompts),
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        num_images_per_prompt=num_images,
        generator=generators,
        height=height,
        width=width,
        output_type="pil",
    )
    return GenerationResult(images=list(output.images), seed=seed)


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-image request, the unit that `generate_batch` merges with compatible others."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    seed: int | None = None
    num_images: int = 1
    scheduler: SchedulerName = "dpmpp"
    height: int | None = None
    width: int | None = None

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (one sampler, one guidance, one size)."""
        return (self.num_inference_steps, float(self.guidance_scale), self.scheduler, self.height, self.width)


def generate_batch(pipe, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Run compatible requests (equal `GenerationRequest.batch_key`) as ONE pipeline call.

    Each request keeps its own prompt, negative prompt, seed and ``num_images``; image ``i`` of a
    request is drawn from a generator seeded ``request.seed + i``, exactly as in `generate`, so a
    batched image equals the image the request would get alone (up to the last-bit rounding of batched
    matmuls). This is what the server's dynamic batching calls.
    """
    if not requests:
        raise ValueError("requests must not be empty")
    keys = {request.batch_key() for request in requests}
    if len(keys) > 1:
        raise ValueError(f"requests in one batch must share steps, guidance, scheduler and size, got {keys}")
    for request in requests:
        _validate(
            [request.prompt],
            request.negative_prompt,
            request.num_inference_steps,
            request.guidance_scale,
            request.seed,
            request.num_images,
            request.scheduler,
        )
    first = requests[0]
    _check_size(pipe, first.height, first.width)
    seeds = [_pick_seed(request.seed, request.num_images) for request in requests]
    # One row per image: prompts repeated num_images times, so every image has its own generator.
    prompts, negatives, generators = [], [], []
    for request, seed in zip(requests, seeds, strict=True):
        prompts += [request.prompt] * request.num_images
        negatives += [request.negative_prompt] * request.num_images
        generators += [torch.Generator("cpu").manual_seed(seed + i) for i in range(request.num_images)]
    output = _view(pipe, first.scheduler)(
        prompt=prompts,
        negative_prompt=negatives,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=float(first.guidance_scale),
        num_images_per_prompt=1,
        generator=generators,
        height=first.height,
        width=first.width,
        output_type="pil",
    )
    results, start = [], 0
    for request, seed in zip(requests, seeds, strict=True):
        images = list(output.images[start : start + request.num_images])
        results.append(GenerationResult(images=images, seed=seed))
        start += request.num_images
    return results


def generate_img2img(
    pipe,
    init_image: Image.Image,
    prompt: str,
    *,
    strength: float = 0.6,
    negative_prompt: str = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int | None = None,
    num_images: int = 1,
    scheduler: SchedulerName = "dpmpp",
) -> GenerationResult:
    """Image-to-image: noise ``init_image`` to ``strength`` (0 < strength <= 1) and denoise toward ``prompt``.

    diffusers' `StableDiffusionImg2ImgPipeline` over the same components as ``pipe`` (no second copy
    of the weights). The init image is converted to RGB and resized to the model's output size; the
    sampler runs ``int(num_inference_steps * strength)`` steps, which must be at least 1.
    Seeds work as in `generate`: image ``i`` uses ``seed + i``.
    """
    from diffusers import StableDiffusionImg2ImgPipeline

    _validate([prompt], negative_prompt, num_inference_steps, guidance_scale, seed, num_images, scheduler)
    if not isinstance(init_image, Image.Image):
        raise ValueError(f"init_image must be a PIL image, got {type(init_image).__name__}")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if int(num_inference_steps * strength) < 1:
        raise ValueError(
            f"strength {strength} x num_inference_steps {num_inference_steps} leaves no denoising step"
        )
    side = output_size(pipe)
    image = init_image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    seed = _pick_seed(seed, num_images)
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
    output = _view(pipe, scheduler, StableDiffusionImg2ImgPipeline)(
        prompt=[prompt],
        image=image,
        strength=float(strength),
        negative_prompt=[negative_prompt],
        num_inference_steps=num_inference_steps,
        guidance_scale=float(guidance_scale),
        num_images_per_prompt=num_images,
        generator=generators,
        output_type="pil",
    )
    return GenerationResult(images=list(output.images), seed=seed)


def check_pipeline(pipe) -> None:
    """Raise RuntimeError unless a one-step generation of ``pipe`` gives finite pixels.

    The server's health check: a model whose weights went NaN/inf (a diverged run, corrupted
    memory, a lost GPU) still "generates" black images without any error, so look at the numbers.
    """
    generator = torch.Generator("cpu").manual_seed(0)
    output = _view(pipe, "ddim")(
        prompt=["health check"],
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=[generator],
        output_type="np",
    )
    if not np.isfinite(output.images).all():
        raise RuntimeError("the model produced non-finite pixels: weights are broken")


def make_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste equally sized images row by row into one ``rows`` x ``cols`` grid (blank cells at the end)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
    if not images or len(images) > rows * cols:
        raise ValueError(f"need 1..{rows * cols} images for a {rows}x{cols} grid, got {len(images)}")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError("all images in a grid must have the same size")
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        grid.paste(image.convert("RGB"), (col * width, row * height))
    return grid
