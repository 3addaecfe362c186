"""Config of `ldm eval`: which model, which held-out prompts, how to sample, the promotion gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ldm.config.base import ConfigBase


class EvalConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    model: str = "models:/ldm@candidate"
    # Held-out prompts (never emitted by the synthetic source), balanced over the six categories.
    num_prompts: int = Field(48, ge=6)
    images_per_prompt: int = Field(1, ge=1, le=8)
    prompt_seed: int = 1234
    seed: int = 0
    num_inference_steps: int = Field(20, ge=1, le=200)
    guidance_scale: float = Field(4.0, ge=0.0, le=30.0)
    scheduler: Literal["ddim", "dpmpp", "euler"] = "dpmpp"
    batch_size: int = Field(16, ge=1)
    experiment: str = "eval"
    # Promotion gate: move `champion` to the evaluated version only when its overall score is at least
    # the current champion's and at least `floor`.
    promote: bool = False
    floor: float = Field(0.0, ge=0.0, le=1.0)
    model_name: str = "ldm"
