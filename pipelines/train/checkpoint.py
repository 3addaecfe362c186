"""Training checkpoints: safetensors + JSON, nothing pickled.

A checkpoint folder holds ``unet/`` and ``ema_unet/`` (``save_pretrained``), the optimizer state
(tensors in safetensors, param groups in JSON), ``state.json`` (step, epoch, lr and the metrics
reported with it) and ``config.yaml``. The learning-rate schedule is a pure function of (step,
config), so step + config restore it.

A LoRA run (``lora.rank`` set) keeps only what trains: ``lora/`` and ``ema_lora/`` hold the adapter's
tensors (``adapter.safetensors``, the U-Net's own parameter names); the frozen base comes from
``init_from`` again on resume and export.

With ``train_text_encoder`` the encoder that trains with the U-Net sits beside it: ``text_encoder/``
and ``ema_text_encoder/`` (``save_pretrained``; ``pipelines/train/joint.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldm.config.train import TrainConfig
from ldm.lora import has_lora
from pipelines.train.joint import split_pair
from pipelines.train.recipe import learning_rate

UNET_DIR = "unet"
EMA_UNET_DIR = "ema_unet"
LORA_DIR = "lora"
EMA_LORA_DIR = "ema_lora"
TEXT_ENCODER_DIR = "text_encoder"
EMA_TEXT_ENCODER_DIR = "ema_text_encoder"
TEXT_ENCODER_WEIGHTS = "model.safetensors"  # transformers' save_pretrained
ADAPTER_FILE = "adapter.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


def save_checkpoint(
    folder: Path,
    unet: Any,
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    metrics: dict[str, Any],
    *,
    ema_unet: Any = None,
    epoch: int = 0,
) -> None:
    """U-Net (and its EMA; and a trained text encoder) via ``save_pretrained``, optimizer state, step,
    epoch and config."""
    from safetensors.torch import save_file

    unet, text_encoder = split_pair(unet)
    ema_unet, ema_text_encoder = split_pair(ema_unet) if ema_unet is not None else (None, None)
    if text_encoder is not None:
        text_encoder.save_pretrained(folder / TEXT_ENCODER_DIR, safe_serialization=True)
        if ema_text_encoder is not None:
            ema_text_encoder.save_pretrained(folder / EMA_TEXT_ENCODER_DIR, safe_serialization=True)
    if has_lora(unet):
        _save_adapter(unet, folder / LORA_DIR)
        if ema_unet is not None:
            _save_adapter(ema_unet, folder / EMA_LORA_DIR)
    else:
        unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
        if ema_unet is not None:
            ema_unet.save_pretrained(folder / EMA_UNET_DIR, safe_serialization=True)
    state = optimizer.state_dict()
    tensors = {
        f"{param_id}.{name}": value.detach().cpu().contiguous()
        for param_id, param_state in state["state"].items()
        for name, value in param_state.items()
        if torch.is_tensor(value)
    }
    save_file(tensors, str(folder / OPTIMIZER_WEIGHTS))
    (folder / OPTIMIZER_META).write_text(json.dumps({"param_groups": state["param_groups"]}))
    # The rate the last step took, as the loop set it (with lr_horizon "steps_or_time" it depends on
    # the clock too, so it cannot be recomputed from the step alone).
    last_lr = state["param_groups"][0]["lr"] if step else learning_rate(0, cfg)
    (folder / STATE_FILE).write_text(json.dumps({"step": step, "epoch": epoch, "lr": last_lr, **metrics}))
    (folder / CONFIG_FILE).write_text(cfg.to_yaml())


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint: step, epoch, lr and the metrics reported with it."""
    state: dict[str, Any] = json.loads((Path(folder) / STATE_FILE).read_text())
    return state


def load_checkpoint(
    folder: Path, unet: torch.nn.Module, optimizer: torch.optim.Optimizer, *, ema_unet: Any = None
) -> int:
    """Load weights and optimizer state saved by ``save_checkpoint`` in place; returns the step."""
    from safetensors.torch import load_file

    # A checkpoint written without EMA (ema_decay was None) starts the EMA from the weights.
    unet, text_encoder = split_pair(unet)
    ema_unet, ema_text_encoder = split_pair(ema_unet) if ema_unet is not None else (None, None)
    if text_encoder is not None:
        _load_text_encoder(folder, text_encoder, ema_text_encoder)
    elif (folder / TEXT_ENCODER_DIR).is_dir():  # the U-Net learned to read that encoder, not this run's
        raise ValueError(
            f"{folder}: the checkpoint holds a text encoder trained with its U-Net and this run does not "
            "train one: resume with train_text_encoder: true, or use another run_name"
        )
    if (folder / LORA_DIR).is_dir():
        load_adapter(folder / LORA_DIR, unet)
        if ema_unet is not None:
            ema_folder = folder / EMA_LORA_DIR
            load_adapter(ema_folder if ema_folder.is_dir() else folder / LORA_DIR, ema_unet)
    else:
        unet.load_state_dict(load_file(str(folder / UNET_DIR / WEIGHTS_FILE)))
        if ema_unet is not None:
            ema_source = folder / EMA_UNET_DIR if (folder / EMA_UNET_DIR).is_dir() else folder / UNET_DIR
            ema_unet.load_state_dict(load_file(str(ema_source / WEIGHTS_FILE)))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / OPTIMIZER_WEIGHTS)).items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    param_groups = json.loads((folder / OPTIMIZER_META).read_text())["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    return int(read_checkpoint_state(folder)["step"])


def _load_text_encoder(folder: Path, text_encoder: Any, ema_text_encoder: Any) -> None:
    from safetensors.torch import load_file

    if not (folder / TEXT_ENCODER_DIR).is_dir():
        raise ValueError(
            f"{folder}: this run trains the text encoder (train_text_encoder) and the checkpoint has "
            f"no {TEXT_ENCODER_DIR}/: it was written by a run that did not; use another run_name"
        )
    text_encoder.load_state_dict(load_file(str(folder / TEXT_ENCODER_DIR / TEXT_ENCODER_WEIGHTS)))
    if ema_text_encoder is not None:
        ema_folder = folder / EMA_TEXT_ENCODER_DIR
        ema_folder = ema_folder if ema_folder.is_dir() else folder / TEXT_ENCODER_DIR
        ema_text_encoder.load_state_dict(load_file(str(ema_folder / TEXT_ENCODER_WEIGHTS)))


def trained_text_encoder_dir(folder: Path) -> Path | None:
    """The text encoder a checkpoint exports (its EMA when kept), or None when it did not train one."""
    for name in (EMA_TEXT_ENCODER_DIR, TEXT_ENCODER_DIR):
        if (folder / name).is_dir():
            return folder / name
    return None


def exported_weights_dir(folder: Path) -> Path:
    """The U-Net (or adapter) a checkpoint exports: its EMA when the run kept one, else the trained weights."""
    if (folder / LORA_DIR).is_dir():
        return folder / (EMA_LORA_DIR if (folder / EMA_LORA_DIR).is_dir() else LORA_DIR)
    return folder / (EMA_UNET_DIR if (folder / EMA_UNET_DIR).is_dir() else UNET_DIR)


def adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA adapter's tensors of ``module`` under their parameter names (peft's ``lora_A``/``lora_B``)."""
    return {
        name: value.detach().cpu().contiguous()
        for name, value in module.state_dict().items()
        if ".lora_" in name
    }


def _save_adapter(module: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(module), str(folder / ADAPTER_FILE))


def load_adapter(folder: Path, module: torch.nn.Module) -> None:
    """Load an adapter saved by ``save_checkpoint`` into ``module`` (which has the same adapter added)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / ADAPTER_FILE))
    expected = set(adapter_tensors(module))
    if set(tensors) != expected:
        raise ValueError(
            f"{folder}: the checkpoint's adapter does not match this run's lora config "
            f"({len(tensors)} tensors saved, {len(expected)} expected)"
        )
    module.load_state_dict(tensors, strict=False)
