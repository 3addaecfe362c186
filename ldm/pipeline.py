"""The one generation entry point: assemble, save, load and run the diffusers pipeline.

The CLI (`ldm generate`), the Ray Serve app, the MLflow pyfunc, the demo, the notebooks and the tests
all generate through this module (STYLE.md 8), so the same request with the same seed gives the same
images wherever it runs. Requests are `ldm.request.GenerationRequest` (validated once, there).
Sampling itself is diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline` with
diffusers' schedulers; this module only adds what the project promises on top:

- seeds: one CPU `torch.Generator` per image, seeded ``seed + i``, so image ``i`` of a batch equals
  the single image generated with seed ``seed + i`` (CPU generators also make a seed mean the same
  image on a GPU, up to float rounding);
- a fresh scheduler per call, built from the model's own scheduler config, on a per-call pipeline
  made with diffusers' ``from_pipe`` (shared weights), so concurrent requests on one loaded pipeline
  never share scheduler state;
- loading from a local folder, an ``s3://`` folder or an MLflow model URI, safetensors only, on a
  device and in a dtype (float16/bfloat16 on CUDA for serving);
- one private runner, `_run`, behind `generate` (text to image), `generate_batch` (compatible
  requests as one pipeline call: the server's dynamic batching) and `generate_img2img`;
- `check_pipeline`: a one-step probe that fails on non-finite pixels (the server's health check).
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ldm.diffusion import make_noise_scheduler
from ldm.request import (
    MAX_SEED,
    SCHEDULERS,
    GenerationRequest,
    ImageToImageRequest,
    SchedulerName,
)

__all__ = [
    "MAX_SEED",
    "SCHEDULERS",
    "GenerationRequest",
    "GenerationResult",
    "ImageToImageRequest",
    "LoadedModel",
    "assemble_pipeline",
    "check_pipeline",
    "check_size",
    "generate",
    "generate_batch",
    "generate_img2img",
    "load_pipeline",
    "make_grid",
    "make_scheduler",
    "output_size",
    "save_pipeline",
    "size_multiple",
]

DType = Literal["float32", "float16", "bfloat16"]
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class LoadedModel:
    """A ready pipeline and where it came from (name/version are None for a plain folder version)."""

    pipe: Any  # diffusers.StableDiffusionPipeline (kept untyped so importing this module stays light)
    name: str | None
    version: str | None
    uri: str


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]
    seed: int  # the seed of the first image; image i used seed + i


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """A `StableDiffusionPipeline` from our parts; ``scheduler`` should be the training scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler if scheduler is not None else make_noise_scheduler(),
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


def _from_folder(folder: Path, model_uri: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    # diffusers resolves a component saved from outside its own libraries (model_index.json names
    # ["ldm.positional_unet", "PositionalUNet2DConditionModel"]) only from modules already imported.
    import ldm.positional_unet  # noqa: F401

    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_uri}: not a diffusers pipeline folder (no model_index.json)")
    # use_safetensors=True: a folder holding only pickled weights fails instead of being unpickled.
    return StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, dtype=dtype
    )


def check_device_dtype(device: str, dtype: DType) -> None:
    """Refuse what cannot run: half precision on the CPU (float16 kernels are missing or very slow)."""
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(TORCH_DTYPES)}, got {dtype!r}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise ValueError(f"dtype float16 needs a CUDA device, got device {device!r}: use float32 or bfloat16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")


def load_pipeline(model_uri: str, device: str = "cpu", dtype: DType = "float32") -> LoadedModel:
    """Load a pipeline from a local folder, an ``s3://`` folder or ``models:/...``/``runs:/...``."""
    from ldm import storage

    check_device_dtype(device, dtype)
    model_uri = str(model_uri)
    if model_uri.startswith(("models:/", "runs:/")):
        from ldm.registry import resolve_model_uri

        # The MLflow download is a private temporary copy: the weights are in memory once loaded.
        with tempfile.TemporaryDirectory(prefix="ldm-model-") as tmp:
            folder, name, version = resolve_model_uri(model_uri, dst_path=tmp)
            pipe = _from_folder(folder, model_uri, TORCH_DTYPES[dtype])
    else:
        folder = storage.materialize(model_uri)
        # the folder's own name (for s3:// the last part of the URI, not the cache folder's hash)
        name, version = model_uri.rstrip("/").rsplit("/", 1)[-1] or folder.resolve().name, None
        pipe = _from_folder(folder, model_uri, TORCH_DTYPES[dtype])
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


def output_size(pipe) -> int:
    """Side of the images the pipeline makes by default: U-Net sample size x VAE scale factor."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's downsampling factor, and at least 8."""
    return max(8, int(pipe.vae_scale_factor))


def check_size(pipe, height: int | None, width: int | None) -> None:
    """Raise ValueError naming ``height``/``width`` unless each is None or a multiple of `size_multiple`."""
    multiple = size_multiple(pipe)
    for label, side in (("height", height), ("width", width)):
        if side is not None and (side < multiple or side % multiple):
            raise ValueError(f"{label} must be a positive multiple of {multiple}, got {side!r}")


def _pick_seed(seed: int | None, total: int) -> int:
    # Picking the seed is the only randomness outside torch.
    return secrets.randbelow(MAX_SEED - total) if seed is None else seed


def _per_call_pipeline(pipe, scheduler: SchedulerName, image_to_image: bool = False):
    """A pipeline sharing the (read-only) modules of ``pipe`` but with its own fresh scheduler.

    diffusers' ``from_pipe`` builds it without copying weights. Its ``dtype`` defaults to
    float32 and it casts the SHARED modules to that dtype, so the loaded dtype is passed explicitly
    (otherwise an fp16 model would be silently upcast by its first request).
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if image_to_image else StableDiffusionPipeline
    # unet passed explicitly: from_pipe drops a model whose type is not exactly the signature's, and
    # the U-Net may be a subclass (ldm/positional_unet.py).
    scheduler_obj = make_scheduler(pipe, scheduler)
    view = cls.from_pipe(pipe, unet=pipe.unet, scheduler=scheduler_obj, dtype=pipe.dtype)
    view.set_progress_bar_config(disable=True)
    return view


def _run(
    pipe,
    requests: Sequence[GenerationRequest],
    seeds: Sequence[int],
    init_image: Image.Image | None = None,
) -> list[GenerationResult]:
    """THE generation call: compatible ``requests`` (one `batch_key`) as one pipeline call.

    One row per image: each request's prompt repeated ``num_images`` times, each image with its own
    CPU generator seeded ``seed + i``. With ``init_image`` the requests are `ImageToImageRequest`s
    and the init image, resized to the requested (or the model's) size, is their starting point.
    """
    first = requests[0]
    if len({request.batch_key() for request in requests}) > 1:
        raise ValueError("requests in one call must share steps, guidance, scheduler and size")
    check_size(pipe, first.height, first.width)
    prompts: list[str] = []
    negatives: list[str] = []
    generators: list[torch.Generator] = []
    for request, seed in zip(requests, seeds, strict=True):
        prompts += [request.prompt] * request.num_images
        negatives += [request.negative_prompt] * request.num_images
        generators += [torch.Generator("cpu").manual_seed(seed + i) for i in range(request.num_images)]
    arguments: dict[str, Any] = {
        "prompt": prompts,
        "negative_prompt": negatives,
        "num_inference_steps": first.num_inference_steps,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
        "generator": generators,
        "output_type": "pil",
    }
    if init_image is None:
        arguments |= {"height": first.height, "width": first.width}
    else:
        assert isinstance(first, ImageToImageRequest)
        side = output_size(pipe)
        size = (first.width or side, first.height or side)
        arguments |= {
            "image": init_image.convert("RGB").resize(size, Image.Resampling.BICUBIC),
            "strength": first.strength,
        }
    output = _per_call_pipeline(pipe, first.scheduler, init_image is not None)(**arguments)
    results, start = [], 0
    for request, seed in zip(requests, seeds, strict=True):
        results.append(GenerationResult(list(output.images[start : start + request.num_images]), seed))
        start += request.num_images
    return results


def generate(pipe, prompts: str | list[str] | GenerationRequest, **options: Any) -> GenerationResult:
    """Generate ``num_images`` images per prompt; the same arguments and seed give the same images.

    ``prompts`` is a `GenerationRequest`, or one prompt or a list of prompts with the other fields of
    `GenerationRequest` as keyword arguments (validated there: a bad value raises ValueError naming
    the field). Images come in prompt order, ``num_images`` per prompt; image ``i`` (counted over all
    prompts) is drawn from a generator seeded ``seed + i``. With no seed one is picked and returned.
    """
    if isinstance(prompts, GenerationRequest):
        if options:
            raise ValueError("pass either a GenerationRequest or prompts with options, not both")
        requests = [prompts]
    else:
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise ValueError("prompts must be a string or a non-empty list of strings")
        requests = [GenerationRequest(prompt=prompt, **options) for prompt in prompt_list]
    per_prompt = requests[0].num_images
    seed = _pick_seed(requests[0].seed, per_prompt * len(requests))
    results = _run(pipe, requests, [seed + j * per_prompt for j in range(len(requests))])
    return GenerationResult([image for result in results for image in result.images], seed)


def generate_batch(pipe, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Run compatible requests (equal `GenerationRequest.batch_key`) as ONE pipeline call.

    Each request keeps its own prompt, negative prompt, seed and ``num_images``, so a batched image
    equals the image the request would get alone (up to the last-bit rounding of batched matmuls).
    This is what the server's dynamic batching calls.
    """
    if not requests:
        raise ValueError("requests must not be empty")
    keys = {request.batch_key() for request in requests}
    if len(keys) > 1:
        raise ValueError(f"requests in one batch must share steps, guidance, scheduler and size, got {keys}")
    return _run(pipe, requests, [_pick_seed(request.seed, request.num_images) for request in requests])


def generate_img2img(
    pipe, init_image: Image.Image, request: ImageToImageRequest | str, **options: Any
) -> GenerationResult:
    """Image to image: noise ``init_image`` to ``strength`` and denoise toward the prompt.

    ``request`` is an `ImageToImageRequest`, or a prompt with its other fields as keyword arguments.
    diffusers' `StableDiffusionImg2ImgPipeline` over the same components as ``pipe`` (no second copy
    of the weights). The init image is converted to RGB and resized to the requested size (default:
    the model's output size). Seeds work as in `generate`: image ``i`` uses ``seed + i``.
    """
    if isinstance(request, str):
        request = ImageToImageRequest(prompt=request, **options)
    elif options:
        raise ValueError("pass either an ImageToImageRequest or a prompt with options, not both")
    if not isinstance(init_image, Image.Image):
        raise ValueError(f"init_image must be a PIL image, got {type(init_image).__name__}")
    if request.denoising_steps() < 1:
        raise ValueError(
            f"strength {request.strength} x num_inference_steps {request.num_inference_steps} "
            "leaves no denoising step"
        )
    seed = _pick_seed(request.seed, request.num_images)
    return _run(pipe, [request], [seed], init_image=init_image)[0]


def check_pipeline(pipe) -> None:
    """Raise RuntimeError unless a one-step generation of ``pipe`` gives finite pixels.

    The server's health check: a model whose weights went NaN/inf (a diverged run, corrupted
    memory, a lost GPU) still "generates" black images without any error, so look at the numbers.
    """
    generator = torch.Generator("cpu").manual_seed(0)
    output = _per_call_pipeline(pipe, "ddim")(
        prompt=["health check"],
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=[generator],
        output_type="np",
    )
    if not np.isfinite(output.images).all():
        raise RuntimeError("the model produced non-finite pixels: weights are broken")


def make_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """``rows`` x ``cols`` grid of equally sized images, row by row, blank (white) cells at the end.

    diffusers' `make_image_grid` does the pasting; it needs exactly rows x cols images, so the
    missing cells are padded with white images here.
    """
    from diffusers.utils import make_image_grid

    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows}x{cols}")
    if not images or len(images) > rows * cols:
        raise ValueError(f"need 1..{rows * cols} images for a {rows}x{cols} grid, got {len(images)}")
    size = images[0].size
    if any(image.size != size for image in images):
        raise ValueError("all images in a grid must have the same size")
    cells = [image.convert("RGB") for image in images]
    cells += [Image.new("RGB", size, "white")] * (rows * cols - len(cells))
    return make_image_grid(cells, rows=rows, cols=cols)
