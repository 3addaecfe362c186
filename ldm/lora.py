"""LoRA fine-tuning of the U-Net with ``peft``, in the format diffusers' pipelines load.

Follows diffusers' ``examples/text_to_image/train_text_to_image_lora.py``:

1. ``add_lora``: freeze the U-Net, inject a peft ``LoraConfig`` adapter into its attention projections
   (``unet.add_adapter``); only the adapter's ``lora_A``/``lora_B`` matrices train. Gaussian init:
   ``lora_B`` starts at zero, so the adapted U-Net starts as the pretrained one (Hu et al. 2021,
   "LoRA: Low-Rank Adaptation of Large Language Models", sec. 4.1).
2. ``lora_state_dict`` / ``save_lora``: the adapter in diffusers' key format
   (``get_peft_model_state_dict`` + ``convert_state_dict_to_diffusers``), written by
   ``StableDiffusionPipeline.save_lora_weights`` as ``pytorch_lora_weights.safetensors`` with the
   adapter's config as metadata (so ``lora_alpha`` survives), loadable with ``pipe.load_lora_weights``.
3. ``fused_unet``: a plain ``UNet2DConditionModel`` with the adapter merged into the base weights
   (``fuse_lora`` + ``unload_lora``), so evaluation, the registry and serving load an ordinary pipeline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ldm import storage
from ldm.config.lora import LoraConfig

if TYPE_CHECKING:
    from ldm.sd_format import NoiseSchedule, SDFolder

# diffusers' UNet2DConditionModel: mypy does not see the torch.nn.Module and PeftAdapterMixin methods
# through diffusers' untyped bases, so the adapter functions take it as Any.
UNet2DConditionModel = Any

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
LORA_DIR = "lora"  # where an export keeps the adapter, beside the fused pipeline's components
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class ParameterCounts:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def parameter_counts(model: torch.nn.Module) -> ParameterCounts:
    """Parameters that train (``requires_grad``) and all parameters (adapter included when present)."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return ParameterCounts(trainable=trainable, total=total)


def add_lora(unet: UNet2DConditionModel, cfg: LoraConfig, seed: int = 0) -> UNet2DConditionModel:
    """Freeze ``unet`` and add a trainable LoRA adapter (in place; returns ``unet``)."""
    from peft import LoraConfig as PeftLoraConfig

    if cfg.rank is None:
        raise ValueError("lora.rank is not set: there is no adapter to add")
    unet.requires_grad_(False)
    peft_config = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",
    )
    # the gaussian init of lora_A draws from the global generator: seed it without disturbing the caller's
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(peft_config, adapter_name=ADAPTER_NAME)
    if not any(parameter.requires_grad for parameter in unet.parameters()):
        raise ValueError(f"lora.target_modules {list(cfg.target_modules)} match no module of the U-Net")
    return unet


def has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (what ``load_lora_weights`` reads), on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def adapter_metadata(unet: UNet2DConditionModel) -> dict[str, Any]:
    """The adapter's peft config as a dict: stored in the safetensors header so that alpha survives."""
    return unet.peft_config[ADAPTER_NAME].to_dict()


def save_lora(unet: UNet2DConditionModel, folder: str | Path) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)`` loads it)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder),
        unet_lora_layers=lora_state_dict(unet),
        safe_serialization=True,
        unet_lora_adapter_metadata=adapter_metadata(unet),
    )
    return folder / LORA_WEIGHTS_FILE


def fused_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A copy of ``unet`` with its adapter merged into the base weights and the LoRA layers removed."""
    fused = copy.deepcopy(unet)
    fused.fuse_lora(lora_scale=1.0)
    fused.unload_lora()
    fused.requires_grad_(True)
    return fused


def export_lora_pipeline(
    source: SDFolder,
    unet: UNet2DConditionModel,
    output: str | Path,
    *,
    schedule: NoiseSchedule | None = None,
    **components: Any,
) -> str:
    """The export of a LoRA run: a complete pipeline folder at ``output`` with the adapter fused into the
    U-Net, and the adapter itself in ``output/lora/pytorch_lora_weights.safetensors`` (for
    ``load_lora_weights`` on the base model ``source``). Local or ``s3://``; returns ``output``."""
    import tempfile

    from ldm.sd_format import export_sd_pipeline

    with tempfile.TemporaryDirectory(prefix="ldm-lora-") as tmp:
        local = Path(tmp) / "export" if storage.is_remote(output) else Path(output)
        export_sd_pipeline(source, fused_unet(unet), local, schedule=schedule, **components)
        save_lora(unet, local / LORA_DIR)
        if storage.is_remote(output):
            storage.upload_folder(local, output)
    return str(output)
