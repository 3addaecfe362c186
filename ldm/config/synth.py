"""Config of `ldm synth`: the synthetic caption-image source and the faults it plants.

``bad_rows`` are exact fractions of ``num_pairs`` (rounded to whole rows), so a test or a demo knows
how many rows of each fault ingest must reject, and for which reason (``truth.parquet``).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ldm.config.base import ConfigBase


class BadRowRates(ConfigBase):
    """Fraction of rows of each web-crawl fault."""

    dead_url: float = Field(0.015, ge=0, le=1)  # 404
    not_image: float = Field(0.015, ge=0, le=1)  # an HTML page under an image-looking URL
    truncated: float = Field(0.015, ge=0, le=1)  # a PNG cut short
    tiny: float = Field(0.015, ge=0, le=1)  # 8x8
    extreme_aspect: float = Field(0.015, ge=0, le=1)  # 256x16
    caption_mismatch: float = Field(0.015, ge=0, le=1)  # a good image with another scene's caption
    duplicate: float = Field(0.015, ge=0, le=1)  # the same bytes as another row, under another URL

    @model_validator(mode="after")
    def _leave_good_rows(self) -> BadRowRates:
        total = sum(self.model_dump().values())
        if total > 0.5:
            raise ValueError(f"bad-row rates sum to {total:.3f}; keep them at most 0.5")
        return self


class SynthConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    num_pairs: int = Field(3000, ge=1)
    seed: int = 0
    image_size: int = Field(64, ge=16)
    # URL prefix written into pairs.parquet; `ldm synth --serve` listens on its host and port.
    base_url: str = "http://127.0.0.1:8765"
    bad_rows: BadRowRates = BadRowRates()
