"""Tiny real components for tests: real diffusers/transformers models, a few thousand parameters each.

Every test that needs a pipeline (generation, registry, Serve, CLI, evaluation) builds it here, so
the tests run the same code as production at a size that takes milliseconds on a CPU. Weights come
from ``torch.manual_seed(seed)``: the same seed gives the same models, hence the same images.
Nothing is downloaded: the tokenizer is built from open_clip's shipped BPE vocabulary.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ldm.first_stage.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

TINY_TEXT_DIM = 32


@functools.lru_cache(maxsize=4)
def _tokenizer(text_len: int):
    # Building the 49408-token BPE tokenizer takes seconds; it holds no weights, so tests share one.
    return build_clip_tokenizer(text_len)


def tiny_components(seed: int = 0, latent_size: int = 8, text_len: int = 16) -> dict:
    """``unet``, ``vae``, ``text_encoder``, ``tokenizer`` for a pipeline making (4 x latent_size)-px images.

    The autoencoder has 3 blocks (2 down-samplings, scale factor 4), so 8x8x4 latents decode to 32 px.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=latent_size * 4,
        scaling_factor=1.0,
    )
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=text_len,
            hidden_act="gelu",
            bos_token_id=CLIP_VOCAB_SIZE - 2,
            eos_token_id=CLIP_VOCAB_SIZE - 1,
            pad_token_id=CLIP_VOCAB_SIZE - 1,
        )
    )
    for model in (vae, unet, text_encoder):
        model.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": _tokenizer(text_len)}


def tiny_pipeline(seed: int = 0, latent_size: int = 8, text_len: int = 16):
    """An assembled `StableDiffusionPipeline` of tiny components with the default training scheduler."""
    from ldm.pipeline import assemble_pipeline

    return assemble_pipeline(**tiny_components(seed=seed, latent_size=latent_size, text_len=text_len))


def tiny_pipeline_folder(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny pipeline as a diffusers folder at ``path``; returns the folder."""
    from ldm.pipeline import save_pipeline

    return save_pipeline(tiny_pipeline(seed=seed), path)


def manifest_json(rows: int, digest: str, latent_shape: list[int], scaling_factor: float) -> str:
    """A valid ``manifest.json`` for latents a test wrote by hand (not through ``ldm ingest``)."""
    from ldm.contract import Counts, Manifest, ModelIdentity, Models

    identity = ModelIdentity(spec="written-by-a-test", sha256="0" * 64)
    return Manifest(
        counts=Counts(input=rows, accepted=rows),
        dataset_digest=digest,
        models=Models(autoencoder=identity, text_encoder=identity),
        scaling_factor=scaling_factor,
        latent_shape=latent_shape,
    ).to_json()
