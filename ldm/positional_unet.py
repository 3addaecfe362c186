"""A ``UNet2DConditionModel`` that knows where each latent pixel is: a learned absolute position embedding
is added to the features right after ``conv_in``, as ViT and DiT add theirs to the patch tokens.

Why it is written here: convolutions are translation-equivariant and diffusers' ``Transformer2DModel``
adds no position to its tokens, so in a stock U-Net a cross-attention query can only tell "top left"
from "bottom right" through the zero padding at the borders. On the demo's domain that U-Net drew the
object of "a red circle in the top left" in the wrong cell in 13-15 of 24 prompts whatever the text
encoder (docs/TRAINING.md, turn 13). diffusers has no config key for this, so the model is a subclass:
its config is the parent's unchanged, ``save_pretrained`` records ``["ldm.positional_unet",
"PositionalUNet2DConditionModel"]`` in ``model_index.json``, and diffusers loads it back once this module
is imported (``ldm.pipeline`` does). The embedding starts as a 2-D sine-cosine table (MAE's), so the
position is there from the first step, and is then trained with the rest.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

# diffusers finds how to load a component of a custom module by looking its base classes up by name
# in that module (pipeline_loading_utils.get_class_obj_and_candidates): ModelMixin must be here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401


def sincos_2d(channels: int, size: int) -> torch.Tensor:
    """[1, channels, size, size]: half the channels encode the row, half the column, each as sines and
    cosines of geometrically spaced frequencies (the MAE / "Attention is all you need" table)."""
    if channels % 4:
        raise ValueError(f"a 2-D sine-cosine embedding needs channels divisible by 4, got {channels}")
    quarter = channels // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    angles = torch.arange(size, dtype=torch.float64)[:, None] * frequencies[None, :]  # [size, quarter]
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [size, channels / 2]
    rows = axis[:, None, :].expand(size, size, channels // 2)
    cols = axis[None, :, :].expand(size, size, channels // 2)
    return torch.cat([rows, cols], dim=2).permute(2, 0, 1)[None].float().contiguous()


class PositionedConv(torch.nn.Module):
    """``conv`` followed by adding a learned [1, C, H, W] position embedding (resized when the latent
    is not the training size, as ViT does for other image sizes)."""

    def __init__(self, conv: torch.nn.Conv2d, size: int) -> None:
        super().__init__()
        self.conv = conv
        self.position = torch.nn.Parameter(sincos_2d(conv.out_channels, size))

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        features = self.conv(sample)
        position: torch.Tensor = self.position
        if position.shape[-2:] != features.shape[-2:]:
            position = torch.nn.functional.interpolate(
                position, size=features.shape[-2:], mode="bicubic", align_corners=False
            )
        return features + position.to(features.dtype)


class PositionalUNet2DConditionModel(UNet2DConditionModel):
    """diffusers' U-Net with ``conv_in`` replaced by a ``PositionedConv`` (module docstring).

    ``__init__`` takes exactly the parent's arguments; ``functools.wraps`` keeps the parent's signature
    visible, which is what diffusers' ``from_config`` reads to pick the config keys it passes on."""

    @functools.wraps(UNet2DConditionModel.__init__)  # type: ignore[misc]  # mypy: "decorated constructor"
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = self.config.sample_size
        if not isinstance(size, int):
            raise ValueError(f"a position embedding needs a square sample_size, got {size!r}")
        conv: Any = self.conv_in  # type: ignore[has-type]  # diffusers leaves it untyped
        self.conv_in = PositionedConv(conv, size)


def unet_class_for(config: Mapping[str, Any]) -> type[UNet2DConditionModel]:
    """The class a U-Net config (``config.json``, ``_class_name``) was written by: this module's subclass
    or diffusers' own (the default when the key is missing); anything else raises ValueError."""
    name = config.get("_class_name", UNet2DConditionModel.__name__)
    classes = {cls.__name__: cls for cls in (UNet2DConditionModel, PositionalUNet2DConditionModel)}
    if name not in classes:
        raise ValueError(f"the U-Net is a {name}, not one of {sorted(classes)}")
    return classes[name]


def unet_class(folder: str | Path) -> type[UNet2DConditionModel]:
    """``unet_class_for`` of the U-Net saved in ``folder``."""
    try:
        return unet_class_for(json.loads((Path(folder) / "config.json").read_text()))
    except ValueError as error:
        raise ValueError(f"{folder}: {error}") from error
