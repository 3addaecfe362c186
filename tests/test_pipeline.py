"""`ldm.pipeline`: the one generation entry point, on a tiny real pipeline (32-px images, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.pipeline import (
    SCHEDULERS,
    generate,
    load_pipeline,
    make_grid,
    make_scheduler,
    output_size,
    save_pipeline,
)
from ldm.testing import tiny_pipeline

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_default_size_is_unet_sample_size_times_vae_factor(pipe):
    assert output_size(pipe) == 8 * 4 == 32
    result = generate(pipe, "a red circle", seed=0, num_inference_steps=1)
    assert [image.size for image in result.images] == [(32, 32)]
    assert result.images[0].mode == "RGB"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_seed_same_image_different_seed_different_image(pipe, scheduler):
    first = generate(pipe, "a red circle", seed=7, num_inference_steps=STEPS, scheduler=scheduler)
    again = generate(pipe, "a red circle", seed=7, num_inference_steps=STEPS, scheduler=scheduler)
    other = generate(pipe, "a red circle", seed=8, num_inference_steps=STEPS, scheduler=scheduler)
    assert first.seed == 7
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert np.abs(pixels(first.images[0]) - pixels(other.images[0])).mean() > 5


def test_batch_image_i_equals_single_image_with_seed_plus_i(pipe):
    batch = generate(pipe, ["a red circle", "a blue square"], seed=3, num_images=2, num_inference_steps=STEPS)
    assert len(batch.images) == 4  # prompt order, num_images per prompt: seeds 3, 4 | 5, 6
    single = generate(pipe, "a blue square", seed=5, num_inference_steps=STEPS)
    # Batched matmuls may round differently in the last bit; the images agree to one grey level.
    assert np.abs(pixels(batch.images[2]) - pixels(single.images[0])).max() <= 2
    assert np.abs(pixels(batch.images[0]) - pixels(batch.images[1])).mean() > 5


def test_schedulers_are_built_from_the_model_config_and_differ(pipe):
    made = {name: make_scheduler(pipe, name) for name in SCHEDULERS}
    assert {type(s).__name__ for s in made.values()} == {
        "DDIMScheduler",
        "DPMSolverMultistepScheduler",
        "EulerDiscreteScheduler",
    }
    for scheduler in made.values():
        assert scheduler.config.num_train_timesteps == 1000
        assert scheduler.config.beta_schedule == "scaled_linear"
    assert made["ddim"].config.set_alpha_to_one is False
    ddim = generate(pipe, "x", seed=1, num_inference_steps=STEPS, scheduler="ddim").images[0]
    euler = generate(pipe, "x", seed=1, num_inference_steps=STEPS, scheduler="euler").images[0]
    assert not np.array_equal(pixels(ddim), pixels(euler))
    # generate() never swaps the scheduler of the shared pipeline
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"


def test_seed_none_picks_one_that_reproduces(pipe):
    result = generate(pipe, "a green star", num_inference_steps=STEPS)
    assert isinstance(result.seed, int) and result.seed >= 0
    again = generate(pipe, "a green star", seed=result.seed, num_inference_steps=STEPS)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_save_and_load_give_identical_images(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "model")
    weights = sorted(
        path.name for path in folder.rglob("*") if path.suffix in {".safetensors", ".bin", ".pt"}
    )
    assert weights and all(name.endswith(".safetensors") for name in weights)
    loaded = load_pipeline(str(folder))
    assert (loaded.name, loaded.version, loaded.uri) == ("model", None, str(folder))
    for scheduler in SCHEDULERS:
        a = generate(pipe, "a small red circle", seed=11, num_inference_steps=STEPS, scheduler=scheduler)
        b = generate(
            loaded.pipe, "a small red circle", seed=11, num_inference_steps=STEPS, scheduler=scheduler
        )
        assert np.array_equal(pixels(a.images[0]), pixels(b.images[0])), scheduler


def test_load_refuses_folders_without_a_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pipeline(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": [3]}, "prompt"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**60}, "seed"),
        ({"num_images": 0}, "num_images"),
        ({"scheduler": "plms"}, "scheduler"),
        ({"height": 30}, "height"),
        ({"negative_prompt": None}, "negative_prompt"),
    ],
)
def test_bad_arguments_raise_value_error(pipe, kwargs, match):
    args = {"prompts": "x", "num_inference_steps": 1, **kwargs}
    prompts = args.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(pipe, prompts, **args)


def test_explicit_size(pipe):
    result = generate(pipe, "x", seed=0, num_inference_steps=1, height=64, width=32)
    assert result.images[0].size == (32, 64)


def test_make_grid(pipe):
    images = generate(pipe, "x", seed=0, num_images=3, num_inference_steps=1).images
    grid = make_grid(images, rows=2, cols=2)
    assert grid.size == (64, 64)
    assert np.array_equal(np.asarray(grid)[32:, :32], np.asarray(images[2]))
    assert (np.asarray(grid)[32:, 32:] == 255).all()  # the empty cell stays white
    with pytest.raises(ValueError, match="grid"):
        make_grid(images, rows=1, cols=2)


def test_generate_batch_equals_each_request_alone(pipe):
    from ldm.pipeline import GenerationRequest, generate_batch

    requests = [
        GenerationRequest(prompt="a red circle", seed=5, num_images=2, num_inference_steps=STEPS),
        GenerationRequest(prompt="a blue square", negative_prompt="green", seed=9, num_inference_steps=STEPS),
        GenerationRequest(prompt="a yellow star", seed=None, num_inference_steps=STEPS),
    ]
    results = generate_batch(pipe, requests)
    assert [len(r.images) for r in results] == [2, 1, 1]
    assert [r.seed for r in results[:2]] == [5, 9] and isinstance(results[2].seed, int)
    for request, result in zip(requests, results, strict=True):
        alone = generate(
            pipe,
            request.prompt,
            negative_prompt=request.negative_prompt,
            seed=result.seed,
            num_images=request.num_images,
            num_inference_steps=STEPS,
        )
        for batched, single in zip(result.images, alone.images, strict=True):
            assert np.abs(pixels(batched) - pixels(single)).max() <= 2


def test_generate_batch_refuses_incompatible_requests(pipe):
    from ldm.pipeline import GenerationRequest, generate_batch

    with pytest.raises(ValueError, match="share"):
        generate_batch(
            pipe, [GenerationRequest(prompt="x", num_inference_steps=2), GenerationRequest(prompt="x")]
        )
    with pytest.raises(ValueError, match="empty"):
        generate_batch(pipe, [])
    with pytest.raises(ValueError, match="seed"):
        GenerationRequest(prompt="x", seed=-1)


def test_img2img_is_seeded_and_strength_moves_away_from_the_init_image(pipe):
    from PIL import Image

    from ldm.pipeline import generate_img2img

    init = Image.new("RGB", (50, 40), (200, 30, 30))
    weak = generate_img2img(pipe, init, "a blue square", strength=0.25, seed=1, num_inference_steps=8)
    again = generate_img2img(pipe, init, "a blue square", strength=0.25, seed=1, num_inference_steps=8)
    strong = generate_img2img(pipe, init, "a blue square", strength=1.0, seed=1, num_inference_steps=8)
    assert weak.images[0].size == (32, 32)
    assert np.array_equal(pixels(weak.images[0]), pixels(again.images[0]))
    red = np.array([200, 30, 30])
    assert np.abs(pixels(weak.images[0]) - red).mean() < np.abs(pixels(strong.images[0]) - red).mean()
    for strength in (0, 1.5, True):
        with pytest.raises(ValueError, match="strength"):
            generate_img2img(pipe, init, "x", strength=strength, num_inference_steps=8)
    with pytest.raises(ValueError, match="denoising step"):
        generate_img2img(pipe, init, "x", strength=0.1, num_inference_steps=5)


def test_check_pipeline_passes_a_good_model_and_fails_a_nan_one():
    from ldm.pipeline import check_pipeline

    good = tiny_pipeline(seed=4)
    check_pipeline(good)
    with torch.no_grad():
        next(iter(good.unet.parameters())).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite"):
        check_pipeline(good)


def test_guidance_scale_and_negative_prompt_change_the_image(pipe):
    # Issue 13: the two conditioning controls must reach the U-Net, not be silently dropped.
    def image(**options) -> np.ndarray:
        return pixels(generate(pipe, "a red circle", seed=2, num_inference_steps=STEPS, **options).images[0])

    base = image(guidance_scale=4.0)
    assert np.abs(base - image(guidance_scale=12.0)).mean() > 2
    assert np.abs(base - image(guidance_scale=4.0, negative_prompt="a blue square")).mean() > 2
    # guidance 1 disables classifier-free guidance: the negative prompt then has nothing to act on
    plain = image(guidance_scale=1.0)
    assert np.array_equal(plain, image(guidance_scale=1.0, negative_prompt="a blue square"))


def test_one_request_type_for_every_entry_point(pipe):
    from ldm.pipeline import GenerationRequest, ImageToImageRequest, generate_img2img

    request = GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=STEPS, width=40, height=32)
    by_request = generate(pipe, request)
    by_options = generate(pipe, "a red circle", seed=3, num_inference_steps=STEPS, width=40, height=32)
    assert by_request.images[0].size == (40, 32)
    assert np.array_equal(pixels(by_request.images[0]), pixels(by_options.images[0]))
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        generate(pipe, request.model_copy(update={"width": 36}))
    with pytest.raises(ValueError, match="not both"):
        generate(pipe, request, seed=1)
    with pytest.raises(ValueError, match="extra"):
        GenerationRequest(prompt="x", steps=3)
    from PIL import Image

    init = Image.new("RGB", (20, 20), "red")
    edit = ImageToImageRequest(prompt="x", strength=0.5, num_inference_steps=4, seed=1, width=48, height=32)
    assert generate_img2img(pipe, init, edit).images[0].size == (48, 32)


def test_half_precision_is_refused_on_the_cpu(tmp_path):
    from ldm.pipeline import check_device_dtype

    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        check_device_dtype("cpu", "float16")
    with pytest.raises(ValueError, match="dtype"):
        check_device_dtype("cpu", "float8")  # type: ignore[arg-type]
    check_device_dtype("cpu", "bfloat16")


def test_bfloat16_loads_and_generates_on_the_cpu(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "bf16")
    loaded = load_pipeline(str(folder), dtype="bfloat16")
    assert loaded.pipe.unet.dtype == torch.bfloat16
    image = generate(loaded.pipe, "a red circle", seed=0, num_inference_steps=1).images[0]
    assert image.size == (32, 32)
    assert loaded.pipe.unet.dtype == torch.bfloat16  # from_pipe did not upcast the shared modules


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_generation_on_cuda_matches_float32(pipe, tmp_path):
    folder = save_pipeline(pipe, tmp_path / "fp16")
    half = load_pipeline(str(folder), device="cuda", dtype="float16")
    full = load_pipeline(str(folder), device="cuda", dtype="float32")
    assert half.pipe.unet.dtype == torch.float16
    a = generate(half.pipe, "a red circle", seed=1, num_inference_steps=STEPS).images[0]
    b = generate(full.pipe, "a red circle", seed=1, num_inference_steps=STEPS).images[0]
    assert half.pipe.unet.dtype == torch.float16
    assert np.isfinite(pixels(a)).all() and np.abs(pixels(a) - pixels(b)).mean() < 3
