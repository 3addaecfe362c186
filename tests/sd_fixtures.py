"""Tiny, randomly initialised Stable Diffusion pipeline folders, built offline, for the SD-format tests.

Two structures, the two that real checkpoints come in:

- ``"sd1"``: SD 1.x (runwayml/stable-diffusion-v1-5 layout): epsilon prediction, ``PNDMScheduler``,
  one ``attention_head_dim`` for every block, convolutional projections in the transformer blocks,
  a QuickGELU CLIP text encoder.
- ``"sd2"``: SD 2.x (stabilityai/stable-diffusion-2-1 layout): v-prediction, ``DDIMScheduler``,
  ``use_linear_projection=True``, a per-block ``attention_head_dim`` list, ``upcast_attention``,
  a GELU text encoder.

Both are small enough for 2 CPU cores to train a few steps in seconds: 32 px images, a VAE with
downsampling factor 4 (8 x 8 x 4 latents), a U-Net with blocks (32, 64) and one layer per block, a
2-layer text encoder of width 32. The tokenizer is the project's offline CLIPTokenizer
(``ldm/first_stage/tokenizer.py``): the real SD tokenizers use the same BPE vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

SDKind = Literal["sd1", "sd2"]
IMAGE_SIZE = 32
LATENT_SIZE = 8  # 32 px through a VAE with three blocks (two halvings)
TEXT_WIDTH = 32
SCALING_FACTOR = 0.18215  # SD's VAE scaling factor (both 1.x and 2.x)

# The scheduler configs SD ships (model folder's scheduler/scheduler_config.json), minus versions.
_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
SD1_SCHEDULER = {
    **_SCHEDULE,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SD2_SCHEDULER = {
    **_SCHEDULE,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def tiny_unet(kind: SDKind):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=TEXT_WIDTH,
    )
    if kind == "sd1":
        return UNet2DConditionModel(**common, attention_head_dim=4)
    # SD 2.x: per-block head counts (diffusers calls them attention_head_dim), linear projections
    return UNet2DConditionModel(
        **common, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=SCALING_FACTOR,
    )


def tiny_text_encoder(kind: SDKind):
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.first_stage.tokenizer import CLIP_VOCAB_SIZE

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def build_sd_pipeline(kind: SDKind, seed: int = 0):
    """A randomly initialised ``StableDiffusionPipeline`` of the given structure (not saved)."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    from ldm.first_stage.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    scheduler = (
        PNDMScheduler.from_config(SD1_SCHEDULER)
        if kind == "sd1"
        else DDIMScheduler.from_config(SD2_SCHEDULER)
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae().eval(),
        text_encoder=tiny_text_encoder(kind),
        tokenizer=build_clip_tokenizer(77),
        unet=tiny_unet(kind).eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_sd_folder(folder: str | Path, kind: SDKind, seed: int = 0) -> Path:
    """Save a tiny SD pipeline of structure ``kind`` as a diffusers folder (safetensors); returns it."""
    folder = Path(folder)
    build_sd_pipeline(kind, seed).save_pretrained(folder, safe_serialization=True)
    return folder


def sd_folder_for_session(tmp_path_factory, kind: SDKind) -> Path:
    """The session's read-only SD folder of structure ``kind``, built on first use (tests must not edit it)."""
    folder = tmp_path_factory.getbasetemp() / f"sd-fixture-{kind}"
    if not (folder / "model_index.json").is_file():
        write_sd_folder(folder, kind)
    return folder
