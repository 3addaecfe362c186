"""From the last checkpoint to a registered model: a diffusers pipeline folder with the EMA U-Net
(when the run kept one) and the run's first-stage models, registered with alias ``candidate``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ldm.config.train import TrainConfig
from ldm.diffusion import make_noise_scheduler
from pipelines.train.checkpoint import exported_weights_dir, read_checkpoint_state
from pipelines.train.tracking import DriverTracking


def export_checkpoint(
    folder: Path, first_stage: dict[str, Any], cfg: TrainConfig, export_dir: Path
) -> tuple[str, dict[str, Any]]:
    """Save the checkpoint in ``folder`` as a pipeline in ``export_dir``; returns the exported weights'
    folder name (``ema_unet`` or ``unet``) and the checkpoint's state."""
    from diffusers import UNet2DConditionModel

    from ldm.pipeline import assemble_pipeline, save_pipeline

    weights = exported_weights_dir(folder)
    unet = UNet2DConditionModel.from_pretrained(weights, local_files_only=True, use_safetensors=True)
    pipe = assemble_pipeline(
        unet.eval(),
        first_stage["vae"],
        first_stage["text_encoder"],
        first_stage["tokenizer"],
        make_noise_scheduler(cfg.prediction_type),
    )
    save_pipeline(pipe, export_dir)
    return weights.name, read_checkpoint_state(folder)


def register(export_dir: Path, cfg: TrainConfig, tracking: DriverTracking) -> str | None:
    """Register the exported folder as a new version of ``cfg.model_name`` with alias ``candidate``,
    linked to this run. A registry that is down only warns: the export folder is still there."""
    if tracking.run_id is None:
        warnings.warn("no MLflow run: the model is exported but not registered", stacklevel=2)
        return None
    from ldm.registry import register_pipeline
    from ldm.tracking import ALIAS_CANDIDATE

    try:
        return register_pipeline(
            export_dir, name=cfg.model_name, run_id=tracking.run_id, aliases=(ALIAS_CANDIDATE,)
        )
    except Exception as error:  # noqa: BLE001 - tracking must never lose a finished training run
        warnings.warn(f"registering {export_dir} failed, the export is kept: {error}", stacklevel=2)
        return None
