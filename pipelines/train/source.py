"""Pretrained parts of a training run: the frozen first-stage models and the ``init_from`` U-Net.

Each is loaded in one function. ``init_from`` is any diffusers Stable Diffusion pipeline folder (the
project's own exports are ones too): ``ldm/sd_format.py`` reads it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ldm.config.train import TrainConfig
from ldm.contract import WorkDir
from ldm.errors import DataError
from ldm.lora import ParameterCounts, add_lora, parameter_counts
from ldm.sd_format import NoiseSchedule, SDFolder, check_data_shapes, load_unet, read_sd_folder
from ldm.unet import build_unet
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


@dataclass(frozen=True)
class InitSource:
    """What ``init_from`` decides for a run: the folder (for the export), the U-Net's architecture and
    starting weights, and the noise schedule of the objective."""

    folder: SDFolder | None  # None: no init_from, the U-Net is built from `cfg.unet`
    schedule: NoiseSchedule
    unet_config: dict[str, Any] | None  # the diffusers config (architecture) the workers build
    weights: dict[str, torch.Tensor] | None  # the base weights (seeded ones when from_scratch)
    counts: ParameterCounts


def resolve_init(cfg: TrainConfig, facts: LatentsFacts, download_dir: Path) -> InitSource:
    """Read ``cfg.init_from`` (pipeline folder, ``s3://``, ``models:/``/``runs:/``, downloaded into
    ``download_dir``): its U-Net config is the architecture, its scheduler the objective's default;
    checked against the data's shapes. Without ``init_from``: ``cfg.unet`` and the SD schedule."""
    # Any: mypy does not see torch.nn.Module through diffusers' untyped bases (as in ldm/lora.py)
    unet: Any
    if not cfg.init_from:
        unet = build_unet(cfg.unet, facts.latent_shape[1], facts.latent_shape[0], facts.text_width)
        schedule = NoiseSchedule(
            cfg.prediction_type or "epsilon", zero_terminal_snr=bool(cfg.zero_terminal_snr)
        )
        return InitSource(None, schedule, None, None, parameter_counts(unet))
    folder = init_folder(cfg.init_from, download_dir)
    try:
        check_data_shapes(folder.unet_config, facts.latent_shape, facts.text_width)
    except ValueError as error:
        raise DataError(f"init_from {cfg.init_from}: {error}") from error
    schedule = folder.schedule
    # An explicit prediction_type or zero_terminal_snr overrides the folder's.
    prediction_type = cfg.prediction_type or schedule.prediction_type
    zero_terminal_snr = schedule.zero_terminal_snr if cfg.zero_terminal_snr is None else cfg.zero_terminal_snr
    try:
        schedule = replace(schedule, prediction_type=prediction_type, zero_terminal_snr=zero_terminal_snr)
    except ValueError as error:  # zero terminal SNR with an epsilon prediction
        raise DataError(f"init_from {cfg.init_from}: {error}") from error
    unet = load_unet(folder, from_scratch=cfg.from_scratch, seed=cfg.seed)
    weights = {name: value.detach().clone() for name, value in unet.state_dict().items()}
    if cfg.lora.enabled:
        add_lora(unet, cfg.lora, seed=cfg.seed)
    return InitSource(folder, schedule, dict(folder.unet_config), weights, parameter_counts(unet))


def init_folder(uri: str, download_dir: Path) -> SDFolder:
    """The pipeline folder behind ``uri``, local (registry models are downloaded to ``download_dir``,
    which must outlive the run: the export takes the VAE, text encoder and scheduler from it)."""
    if uri.startswith(("models:/", "runs:/")):
        from ldm.registry import resolve_model_uri

        uri = str(resolve_model_uri(uri, dst_path=download_dir)[0])
    try:
        return read_sd_folder(uri)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"init_from: {error}") from error
