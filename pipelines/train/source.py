"""Pretrained parts of a training run: the frozen first-stage models and the ``init_from`` U-Net.

Each is loaded in one function, so that another source format (a Stable Diffusion folder, a LoRA
base) replaces one function and nothing else.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from ldm import storage
from ldm.config.train import TrainConfig
from ldm.contract import WorkDir
from ldm.errors import DataError
from ldm.unet import build_unet
from pipelines.train.checkpoint import UNET_DIR
from pipelines.train.data import LatentsFacts


def load_first_stage(cfg: TrainConfig, scaling_factor: float) -> dict[str, Any]:
    """The frozen autoencoder, text encoder and tokenizer of this run (``vae``, ``text_encoder``,
    ``tokenizer``)."""
    from ldm.first_stage.autoencoder import load_autoencoder
    from ldm.first_stage.text_encoder import load_text_encoder

    work = WorkDir(cfg.workdir)
    # Any: diffusers builds `config` and `register_to_config` at run time, which the checker cannot see.
    vae: Any = load_autoencoder(cfg.autoencoder or str(work.autoencoder))
    # The pipeline decodes with latents / vae.config.scaling_factor: it must be the factor the U-Net
    # was trained with, i.e. the one the data was written with.
    if not math.isclose(vae.config.scaling_factor, scaling_factor, rel_tol=1e-4):
        warnings.warn(
            f"autoencoder scaling_factor {vae.config.scaling_factor} differs from the data's {scaling_factor}; "
            "using the data's",
            stacklevel=2,
        )
        vae.register_to_config(scaling_factor=scaling_factor)
    tokenizer, text_encoder = load_text_encoder(cfg.text_encoder or str(work.models))
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def load_init_unet(uri: str, cfg: TrainConfig, facts: LatentsFacts) -> dict[str, torch.Tensor]:
    """The U-Net weights of model ``uri`` (a pipeline folder, ``s3://`` or ``models:/``/``runs:/``), checked
    against this run's architecture and data shapes; fine-tuning starts from them."""
    from diffusers import UNet2DConditionModel

    with tempfile.TemporaryDirectory(prefix="ldm-init-") as tmp:
        if uri.startswith(("models:/", "runs:/")):
            from ldm.registry import resolve_model_uri

            folder, _, _ = resolve_model_uri(uri, dst_path=tmp)
        else:
            folder = storage.materialize(uri)
        if not (Path(folder) / UNET_DIR).is_dir():
            raise DataError(f"init_from {uri}: no {UNET_DIR}/ folder (expected a diffusers pipeline)")
        weights = UNet2DConditionModel.from_pretrained(
            Path(folder) / UNET_DIR, local_files_only=True, use_safetensors=True
        ).state_dict()
    unet = build_unet(cfg.unet, facts.latent_shape[1], facts.latent_shape[0], facts.text_width)
    try:
        unet.load_state_dict(weights)
    except RuntimeError as error:
        raise DataError(
            f"init_from {uri}: its U-Net does not match this run's `unet` config and data shapes: "
            f"{str(error).splitlines()[0]}"
        ) from error
    return {name: value.detach().clone() for name, value in unet.state_dict().items()}
