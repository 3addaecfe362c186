"""Config of `ldm eval`: which model, which prompts, how to sample, the promotion gate.

Two kinds of evaluation (``metrics``):

- ``geneval``, the synthetic domain: held-out compositions of the synthetic grammar (never emitted by
  the source) scored by code per category, beside the same score on compositions the source did emit
  (``seen.*``) and the autoencoder's ceiling;
- ``clip``, any data: images generated for the hold-out captions of the training data (rows whose
  ``split`` is ``holdout``) or for a prompt file, scored by ``clip_score`` and ``cmmd``, each beside its
  value for the hold-out images themselves (``reference.*``).

``auto`` picks ``clip`` when a prompt file is given or the hold-out captions fall outside the synthetic
grammar, else ``geneval``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ldm.config.base import ConfigBase
from ldm.contract import WorkDir

# Reported keys whose direction is known; a gate on any other key must say `higher_is_better`.
HIGHER_IS_BETTER: dict[str, bool] = {"overall": True, "clip_score": True, "cmmd": False}


class GateConfig(ConfigBase):
    """The promotion rule: ``champion`` moves to the evaluated version when its ``metric`` is at least as
    good as the champion's and at least as good as ``floor`` (None: no floor)."""

    # Any key of the final JSON line ("overall", "colors", "seen.overall", "clip_score", "cmmd", ...);
    # None: "overall" for the synthetic domain, "clip_score" for any data.
    metric: str | None = None
    # None: known for overall, categories, clip_score (higher) and cmmd (lower); required otherwise.
    higher_is_better: bool | None = None
    floor: float | None = None  # the worst value to promote: a minimum, or a maximum when lower is better


class EvalConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    model: str = "models:/ldm@candidate"
    metrics: Literal["auto", "geneval", "clip"] = "auto"
    # Held-out prompts: synthetic ones are balanced over the six categories; for any data, the first
    # `num_prompts` hold-out captions (by key) or prompt-file lines.
    num_prompts: int = Field(48, ge=2)
    # Seen compositions scored beside the held-out ones (synthetic domain); None: num_prompts; 0: none.
    num_seen_prompts: int | None = Field(None, ge=0)
    images_per_prompt: int = Field(1, ge=1, le=8)
    prompt_seed: int = 1234
    seed: int = 0
    num_inference_steps: int = Field(20, ge=1, le=200)
    guidance_scale: float = Field(4.0, ge=0.0, le=30.0)
    scheduler: Literal["ddim", "dpmpp", "euler"] = "dpmpp"
    batch_size: int = Field(16, ge=1)
    # Training data (a folder with latents/, local or s3://, or Parquet of latents rows). Its
    # split == "holdout" rows are the any-data evaluation set, the other rows' captions the seen set.
    # None: the `data.uri` that the model version's training run logged, when there is one.
    data: str | None = None
    prompts: str | None = None  # a prompt file, one prompt a line (any-data evaluation)
    num_reference: int = Field(256, ge=4)  # hold-out images that CMMD compares against (at most)
    clip: str | None = None  # CLIP scorer: folder or open_clip:ARCH@WEIGHTS; default <workdir>/models/clip
    progress_every: int = Field(8, ge=1)  # a progress line per this many prompts
    experiment: str = "eval"
    promote: bool = False
    gate: GateConfig = GateConfig()
    model_name: str = "ldm"

    @property
    def clip_spec(self) -> str:
        return self.clip or str(WorkDir(self.workdir).clip)

    @property
    def seen_count(self) -> int:
        return self.num_prompts if self.num_seen_prompts is None else self.num_seen_prompts
