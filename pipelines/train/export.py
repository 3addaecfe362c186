"""From the last checkpoint to a registered model: a diffusers pipeline folder with the EMA U-Net
(when the run kept one) and the run's first-stage models (its text encoder as trained, with
``train_text_encoder``), registered with alias ``candidate``.

With ``init_from`` the folder is ``ldm/sd_format.py``'s ``export_sd_pipeline`` (the source's scheduler
class, with the schedule training used); a LoRA run exports ``export_lora_pipeline``: the adapter fused
into the U-Net, and ``lora/pytorch_lora_weights.safetensors`` for ``load_lora_weights``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ldm.config.train import TrainConfig
from ldm.lora import add_lora, export_lora_pipeline
from ldm.sd_format import export_sd_pipeline
from pipelines.train.checkpoint import (
    EMA_LORA_DIR,
    LORA_DIR,
    exported_weights_dir,
    load_adapter,
    read_checkpoint_state,
    trained_text_encoder_dir,
)
from pipelines.train.source import InitSource
from pipelines.train.tracking import DriverTracking


def export_checkpoint(
    folder: Path, first_stage: dict[str, Any], cfg: TrainConfig, export_dir: Path, init: InitSource
) -> tuple[str, dict[str, Any]]:
    """Save the checkpoint in ``folder`` as a pipeline in ``export_dir``; returns the exported weights'
    folder name (``ema_unet``, ``unet``, ``ema_lora`` or ``lora``) and the checkpoint's state."""
    from ldm.pipeline import assemble_pipeline, save_pipeline
    from ldm.positional_unet import unet_class, unet_class_for

    # unet_class: the U-Net may be diffusers' own or ours with a position embedding (ldm/positional_unet.py)
    weights = exported_weights_dir(folder)
    first_stage = {**first_stage, "text_encoder": exported_text_encoder(folder, first_stage["text_encoder"])}
    if init.folder is None:
        unet = unet_class(weights).from_pretrained(weights, local_files_only=True, use_safetensors=True)
        scheduler = init.schedule.make_scheduler()
        parts = (first_stage["vae"], first_stage["text_encoder"], first_stage["tokenizer"])
        save_pipeline(assemble_pipeline(unet.eval(), *parts, scheduler), export_dir)
        return weights.name, read_checkpoint_state(folder)
    # The run's first-stage models replace the folder's: the VAE carries the data's scaling factor.
    components = {name: first_stage[name] for name in ("vae", "text_encoder", "tokenizer")}
    if weights.name in (LORA_DIR, EMA_LORA_DIR):
        base: Any = unet_class_for(init.folder.unet_config).from_config(init.unet_config)
        base.load_state_dict(init.weights)
        add_lora(base, cfg.lora, seed=cfg.seed)
        load_adapter(weights, base)
        export_lora_pipeline(init.folder, base.eval(), export_dir, schedule=init.schedule, **components)
    else:
        unet = unet_class(weights).from_pretrained(weights, local_files_only=True, use_safetensors=True)
        export_sd_pipeline(init.folder, unet.eval(), export_dir, schedule=init.schedule, **components)
    return weights.name, read_checkpoint_state(folder)


def exported_text_encoder(folder: Path, run_text_encoder: Any) -> Any:
    """The text encoder the pipeline carries: the one trained with the U-Net (``train_text_encoder``,
    its EMA when kept), loaded as the run's encoder class; else the run's own, unchanged."""
    trained = trained_text_encoder_dir(folder)
    if trained is None:
        return run_text_encoder
    return type(run_text_encoder).from_pretrained(trained, local_files_only=True, use_safetensors=True).eval()


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
