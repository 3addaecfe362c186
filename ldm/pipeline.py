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
- loading from a local folder, an ``s3://`` folder or an MLflow model URI, safetensors only.
"""

from __future__ import annotations

import math
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    multiple = max(8, pipe.vae_scale_factor)
    for label, side in (("height", height), ("width", width)):
        if side is not None and (
            isinstance(side, bool) or not isinstance(side, int) or side < multiple or side % multiple
        ):
            raise ValueError(f"{label} must be a positive multiple of {multiple}, got {side!r}")
    total = len(prompts) * num_images
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - total)  # picking the seed is the only randomness outside torch
    # CPU generators: the same seed means the same initial noise on any device.
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(total)]
    # A per-call pipeline view sharing the (read-only) modules but with its own scheduler, so
    # concurrent calls never step each other's scheduler state.
    components = {**pipe.components, "scheduler": make_scheduler(pipe, scheduler)}
    view = type(pipe)(**components, requires_safety_checker=False)
    view.set_progress_bar_config(disable=True)
    output = view(
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
