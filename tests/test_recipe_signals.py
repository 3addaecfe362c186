"""Recipe options that must change what training does, each checked by a signal that a broken option
would not give: equal gradients alone cannot tell gradient checkpointing from no checkpointing, and a
config key that is never read trains exactly as before.

- noise offset: the per-channel spatial mean of the noise that reaches the U-Net spreads out;
- gradient checkpointing: the U-Net's blocks run twice per step and save fewer activations;
- gradient clipping: inside `ldm train`, the optimizer sees the clipped gradient;
- v-prediction: `ldm train` learns the v target, exports a pipeline whose samplers say
  `v_prediction`, and sampling that pipeline lands on the data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ldm.config.train import TrainConfig
from ldm.contract import (
    COL_CAPTION,
    COL_KEY,
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    WorkDir,
)
from ldm.diffusion import make_noise_scheduler, training_loss_terms
from ldm.unet import UNetConfig, build_unet
from pipelines.train import run_train

SCALING_FACTOR = 1.25
CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a large yellow star"]


def _tiny_unet_config() -> UNetConfig:
    return UNetConfig(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


# --- noise offset ---------------------------------------------------------------------------------


def _noise_reaching_the_unet(noise_offset: float, batch: int = 256) -> torch.Tensor:
    """The noise inside x_t as the U-Net receives it, recovered from x_t of all-zero latents."""
    torch.manual_seed(0)
    unet = build_unet(_tiny_unet_config(), sample_size=8, in_channels=4, cross_attention_dim=32).eval()
    seen: dict[str, torch.Tensor] = {}

    def record(_module, args, kwargs):
        seen["x_t"], seen["t"] = args[0].detach(), args[1].detach()

    unet.register_forward_pre_hook(record, with_kwargs=True)
    scheduler = make_noise_scheduler()
    latents = torch.zeros(batch, 4, 8, 8)  # x_t = sqrt(1 - alpha_bar_t) * noise
    with torch.no_grad():
        training_loss_terms(
            unet,
            latents,
            torch.zeros(batch, 16, 32),
            scheduler,
            noise_offset=noise_offset,
            generator=torch.Generator().manual_seed(0),
        )
    sigma = (1.0 - scheduler.alphas_cumprod[seen["t"]]).sqrt().view(-1, 1, 1, 1)
    return seen["x_t"] / sigma


def test_noise_offset_spreads_the_per_channel_mean_of_the_noised_latents():
    # Per (sample, channel) the spatial mean of i.i.d. N(0, 1) noise over 8 x 8 has std 1/8; the offset
    # adds offset * N(0, 1) per (sample, channel): std sqrt(1/64 + offset^2).
    plain = _noise_reaching_the_unet(0.0).mean(dim=(2, 3))
    noise = _noise_reaching_the_unet(0.5)
    offset = noise.mean(dim=(2, 3))
    assert plain.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert offset.std().item() == pytest.approx((1 / 64 + 0.25) ** 0.5, rel=0.1)
    # the offset is constant over the image: the spread around each channel's mean is unchanged
    residual = noise - offset[:, :, None, None]
    assert residual.std().item() == pytest.approx(1.0, rel=0.05)


# --- gradient checkpointing -----------------------------------------------------------------------


def _block_calls_and_saved_bytes(checkpointing: bool) -> tuple[dict[str, int], int, torch.Tensor]:
    """Calls of the first resnet and transformer block of each U-Net stage during one training step
    (forward and backward), the bytes autograd kept for the backward pass, and one gradient; at the
    demo's architecture and latent size."""
    torch.manual_seed(0)
    unet = build_unet(UNetConfig(), sample_size=16, in_channels=4, cross_attention_dim=32).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    calls: dict[str, int] = {}
    for name, module in unet.named_modules():
        if name.endswith(("resnets.0", "transformer_blocks.0")):
            # A pre-hook: torch stops a recomputation early, once the saved tensors are back, so a
            # forward (post) hook would not see it.
            module.register_forward_pre_hook(
                lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)
            )
    saved = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(2))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        terms = training_loss_terms(
            unet, latents, text, make_noise_scheduler(), generator=torch.Generator().manual_seed(3)
        )
    terms.loss.backward()
    assert unet.conv_in.weight.grad is not None
    return calls, saved[0], unet.conv_in.weight.grad.clone()


def test_gradient_checkpointing_recomputes_blocks_and_keeps_fewer_activations():
    plain_calls, plain_saved, plain_grad = _block_calls_and_saved_bytes(False)
    ckpt_calls, ckpt_saved, ckpt_grad = _block_calls_and_saved_bytes(True)
    staged = [name for name in plain_calls if name.startswith(("down_blocks", "up_blocks"))]
    assert len(staged) >= 8 and set(plain_calls.values()) == {1}  # no recomputation without it
    # with it, every down/up stage runs its blocks again in the backward pass (diffusers leaves the
    # mid block's first resnet outside the checkpoint)
    assert all(ckpt_calls[name] == 2 for name in staged), ckpt_calls
    assert ckpt_saved < 0.5 * plain_saved  # the point of it: activations are not kept (measured ~0.2)
    torch.testing.assert_close(ckpt_grad, plain_grad, rtol=1e-5, atol=1e-7)


# --- through `ldm train` --------------------------------------------------------------------------


def _write_workdir(root: Path, latents: np.ndarray) -> WorkDir:
    """Tiny first-stage models where bootstrap puts them and ``latents`` as ingest writes them."""
    from ldm.first_stage.autoencoder import save_autoencoder
    from ldm.first_stage.text_encoder import save_text_encoder
    from ldm.testing import manifest_json, tiny_components
    from ldm.text import encode_captions

    work = WorkDir(root)
    parts = tiny_components(seed=0, latent_size=8, text_len=16)
    parts["vae"].register_to_config(scaling_factor=SCALING_FACTOR)
    save_autoencoder(parts["vae"], work.autoencoder)
    save_text_encoder(parts["tokenizer"], parts["text_encoder"], work.models)
    rows = len(latents)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
    embeddings = encode_captions(parts["tokenizer"], parts["text_encoder"], captions).numpy()
    table = pa.table(
        {
            COL_KEY: [f"{i:04d}" for i in range(rows)],
            COL_CAPTION: captions,
            COL_LATENT: pa.FixedShapeTensorArray.from_numpy_ndarray(latents.astype(np.float16)),
            COL_TEXT_EMBEDDING: pa.FixedShapeTensorArray.from_numpy_ndarray(embeddings.astype(np.float16)),
        }
    )
    metadata = {
        META_LATENT_SHAPE: json.dumps(list(latents.shape[1:])).encode(),
        META_TEXT_EMBEDDING_SHAPE: json.dumps(list(embeddings.shape[1:])).encode(),
        META_SCALING_FACTOR: json.dumps(SCALING_FACTOR).encode(),
    }
    (work.data / LATENTS_DIR).mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(metadata), work.data / LATENTS_DIR / "part-00000.parquet")
    (work.data / MANIFEST_FILE).write_text(
        manifest_json(rows, "x", list(latents.shape[1:]), float(SCALING_FACTOR))
    )
    return work


def _tiny_cfg(work: WorkDir, **update) -> TrainConfig:
    base = {
        "workdir": str(work.root),
        "unet": _tiny_unet_config(),
        "num_workers": 1,
        "batch_size": 8,
        "max_minutes": None,
        "warmup_steps": 0,
        "lr_schedule": "constant",
        "log_every": 10,
        "checkpoint_every": 1000,
        "sample_every": 1000,
        "sample_prompts": ["a red circle"],
        "sample_steps": 2,
        "system_metrics": False,
    }
    return TrainConfig(**{**base, **update})


def _checkpoint_unet(summary: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(summary["checkpoint"]) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_gradient_clipping_reaches_the_optimizer_inside_ldm_train(tmp_path, ray_local):
    """AdamW's step is ~lr per weight whatever the gradient's scale, until the gradient falls below its
    eps (1e-8): clipped to norm 1e-12 the weights barely move, unclipped they move by ~lr."""
    from ldm.testing import tiny_pipeline_folder

    initial_folder = tiny_pipeline_folder(tmp_path / "init", seed=3)
    from ldm.testing import tiny_components

    initial = tiny_components(seed=3)["unet"].state_dict()
    latents = np.random.default_rng(0).normal(0, 0.8, size=(32, 4, 8, 8))
    lr = 1e-2

    def largest_move(grad_clip: float | None, name: str) -> float:
        work = _write_workdir(tmp_path / name, latents)
        cfg = _tiny_cfg(
            work,
            init_from=str(initial_folder),
            lr=lr,
            weight_decay=0.0,
            ema_decay=None,
            grad_clip=grad_clip,
            max_steps=2,
            run_name=name,
        )
        trained = _checkpoint_unet(run_train(cfg))
        return max((trained[key] - value).abs().max().item() for key, value in initial.items())

    assert largest_move(None, "unclipped") > 0.5 * lr
    assert largest_move(1e-12, "clipped") < 1e-3 * lr


@pytest.mark.slow
def test_v_prediction_trains_exports_and_samples_end_to_end(tmp_path, ray_local):
    """Constant latents C: the v target at t is sqrt(a_t) eps - sqrt(1 - a_t) C, whose mean over the
    image is -sqrt(1 - a_t) C (an epsilon model's would be 0); and sampling the exported pipeline with
    any of its samplers must land on C, which it does only if the samplers read the output as v."""
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import SCHEDULERS, generate, load_pipeline, make_scheduler

    level = 1.2  # the stored (unscaled) latent value; training sees level * SCALING_FACTOR
    # 512 rows: the 60 steps stay inside one epoch (each new epoch re-reads the data, seconds each)
    work = _write_workdir(tmp_path / "work", np.full((512, 4, 8, 8), level))
    cfg = _tiny_cfg(
        work,
        prediction_type="v_prediction",
        loss_weighting="none",
        caption_dropout=0.0,
        lr=3e-3,
        ema_decay=None,
        max_steps=60,
        run_name="vpred",
    )
    summary = run_train(cfg)
    export = Path(summary["export"])
    saved = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"

    pipe = load_pipeline(str(export)).pipe
    assert isinstance(pipe, StableDiffusionPipeline)
    target = level * SCALING_FACTOR
    scheduler = make_noise_scheduler("v_prediction")
    t = torch.full((8,), 500)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x_t = scheduler.add_noise(torch.full_like(noise, target), noise, t)
    text = pipe.encode_prompt(["a red circle"] * 8, "cpu", 1, False)[0]
    with torch.no_grad():
        predicted = pipe.unet(x_t, t, encoder_hidden_states=text).sample
    sigma = (1 - scheduler.alphas_cumprod[500]).sqrt().item()
    assert predicted.mean().item() == pytest.approx(-sigma * target, abs=0.35 * sigma * target)

    for name in SCHEDULERS:
        sampler = make_scheduler(pipe, name)
        assert sampler.config.prediction_type == "v_prediction"
        pipe.scheduler = sampler
        out = pipe(
            "a red circle",
            num_inference_steps=20,
            guidance_scale=1.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        assert out.images.mean().item() == pytest.approx(target, abs=0.25 * target), name
    images = generate(pipe, "a red circle", num_inference_steps=4, seed=0).images
    assert np.asarray(images[0]).std() > 0
