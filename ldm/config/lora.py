"""The ``lora`` section of a training config: LoRA on the U-Net's attention projections (off by default).

With ``rank`` set, training freezes the U-Net and trains a low-rank adapter on the ``target_modules``
(``ldm/lora.py``), as diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` does. The
defaults are that script's: the four attention projections, ``lora_alpha`` = rank (scale 1), no dropout.
"""

from __future__ import annotations

from pydantic import Field

from ldm.config.base import ConfigBase

LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


class LoraConfig(ConfigBase):
    rank: int | None = Field(None, ge=1)  # None: no adapter, the whole U-Net trains
    alpha: int | None = Field(None, ge=1)  # the adapter's output is scaled by alpha / rank; None: = rank
    target_modules: tuple[str, ...] = Field(LORA_TARGET_MODULES, min_length=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @property
    def enabled(self) -> bool:
        return self.rank is not None

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else (self.rank or 1)
