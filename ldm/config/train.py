"""Config of `ldm train`: the U-Net architecture, the objective, and how the Ray Train job runs.

The architecture (``unet``) is kept apart from the run keys: the former must match when weights are
loaded back, the latter may change between runs. The defaults are the CPU demo: two Ray Train workers
of half a CPU each (the rest of the machine stays free for Ray Data, TRAPS.md), batch 64, and a time
budget that ends training cleanly whatever ``max_steps`` says.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ldm.config.base import ConfigBase
from ldm.diffusion import LossWeighting, PredictionType
from ldm.unet import UNetConfig

DEFAULT_SAMPLE_PROMPTS = (
    "a red circle",
    "a green square",
    "a blue triangle",
    "a small yellow star in the top left",
)


class TrainConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    # Inputs. None means the work directory's default (ingest output, bootstrap models).
    data: str | None = None  # folder (or s3:// prefix) holding latents/ and manifest.json
    autoencoder: str | None = None  # spec for ldm.first_stage.load_autoencoder
    text_encoder: str | None = None  # spec for ldm.first_stage.load_text_encoder

    # Architecture.
    unet: UNetConfig = UNetConfig()

    # Objective (ldm/diffusion.py).
    prediction_type: PredictionType = "epsilon"
    loss_weighting: LossWeighting = "min_snr"
    snr_gamma: float = Field(5.0, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)  # p of training on the empty prompt (for CFG)

    # Optimisation.
    batch_size: int = Field(64, ge=1)  # global: split evenly over the workers
    max_steps: int = Field(5000, ge=1)
    max_minutes: float | None = Field(8.0, gt=0)  # time budget; training stops cleanly when reached
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0

    # Ray Train.
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    torch_threads: int = Field(1, ge=1)  # per worker
    ray_address: str | None = None
    num_cpus: int | None = None  # for a local Ray started by this job

    # Hooks: checkpoints, logging and sample grids (they watch the loop, never change it).
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(200, ge=1)
    sample_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seed: int = 0
    sample_steps: int = Field(20, ge=1, le=200)
    sample_guidance: float = Field(4.0, ge=0.0, le=30.0)

    # Tracking and registry.
    experiment: str = "train"
    model_name: str = "ldm"
    run_name: str | None = None  # Ray Train run folder and MLflow run name; default train-<timestamp>

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by num_workers {self.num_workers}"
            )
        return self
