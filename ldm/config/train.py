"""Config of `ldm train`: the U-Net architecture, the objective, and how the Ray Train job runs.

The architecture (``unet``) is kept apart from the run keys: the former must match when weights are
loaded back, the latter may change between runs. The defaults are the CPU demo: two Ray Train workers
of half a CPU each (the rest of the machine stays free for Ray Data, docs/TRAPS.md), batch 64, and a time
budget that ends training cleanly whatever ``max_steps`` says. The recipe keys (EMA, schedule,
accumulation, precision) are the Stable Diffusion training recipe; docs/TRAINING.md explains each.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ldm.config.base import ConfigBase
from ldm.config.lora import LoraConfig
from ldm.diffusion import LossWeighting, PredictionType, TimestepSampling
from ldm.unet import UNetConfig

DEFAULT_SAMPLE_PROMPTS = (
    "a red circle",
    "a green square",
    "a blue triangle",
    "a small yellow star in the top left",
)


class CaptionRepeat(ConfigBase):
    """Rows whose caption matches ``pattern`` (``re.search``) appear ``repeats`` times per epoch.

    kohya's sd-scripts call it ``num_repeats`` (per image folder); here it is per caption pattern, so a
    rare kind of caption (the demo's "in the top left" rows, 8% of its data) can be a larger share of
    what the U-Net sees without rendering or downloading more. docs/TRAINING.md, turns 16 and 17.
    """

    pattern: str
    repeats: int = Field(ge=1)  # 1: once per epoch, as without the rule

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"caption_repeats pattern {pattern!r} is not a regular expression: {error}"
            ) from error
        return pattern


class TrainConfig(ConfigBase):
    workdir: str = "./ldm-demo"
    # Inputs. None means the work directory's default (ingest output, bootstrap models).
    data: str | None = None  # folder (or s3:// prefix) holding latents/ and manifest.json
    autoencoder: str | None = None  # spec for ldm.first_stage.load_autoencoder
    text_encoder: str | None = None  # spec for ldm.first_stage.load_text_encoder

    # Architecture: `unet` when training from scratch; with `init_from` the folder's own U-Net config is
    # the architecture (any diffusers UNet2DConditionModel: SD 1.x, SD 2.x) and `unet` is not used.
    unet: UNetConfig = UNetConfig()
    from_scratch: bool = False  # with init_from: keep its architecture, re-initialise the weights (seed)
    lora: LoraConfig = LoraConfig()  # lora.rank set: train only a LoRA adapter on init_from's U-Net
    # Train the text encoder together with the U-Net (diffusers' DreamBooth `--train_text_encoder`):
    # its layers, position embedding and final norm take the same AdamW steps, DDP all-reduce, EMA,
    # checkpoint and export as the U-Net; the token embedding table stays frozen (most of the
    # encoder's weights and all-reduce bytes, and a caption moves only its own words' rows). Reads
    # the data's token ids (`input_ids`); pipelines/train/joint.py says more.
    train_text_encoder: bool = False
    # Its peak learning rate (the same warm-up and decay as `lr`); None: `lr`. diffusers' DreamBooth
    # LoRA scripts offer the same `--text_encoder_lr`: a pretrained encoder often wants a smaller one.
    text_encoder_lr: float | None = Field(None, gt=0)

    # Objective (ldm/diffusion.py). prediction_type None: init_from's scheduler says (else epsilon);
    # init_from's beta schedule is used too (ldm/sd_format.py NoiseSchedule).
    prediction_type: PredictionType | None = None
    # True: a schedule whose last step is pure noise, sampled with "trailing" timesteps (Lin et al.
    # 2024; NoiseSchedule in ldm/sd_format.py says why); needs v_prediction. None: init_from's
    # scheduler says (else False).
    zero_terminal_snr: bool | None = None
    loss_weighting: LossWeighting = "min_snr"
    snr_gamma: float = Field(5.0, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    # Which t a batch trains on: "uniform", or "logit_normal" (SD3: t/T = sigmoid(N(mean, std)); a
    # positive mean puts more of each batch at high noise). ldm/diffusion.py says more.
    timestep_sampling: TimestepSampling = "uniform"
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = Field(1.0, gt=0)
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)  # p of training on the empty prompt (for CFG)

    # Optimisation: AdamW, linear warm-up then cosine decay to min_lr_ratio * lr at max_steps.
    batch_size: int = Field(64, ge=1)  # global per optimizer step: num_workers x grad_accum_steps x micro
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches summed before each optimizer step
    max_steps: int = Field(5000, ge=1)  # optimizer steps; also the cosine decay's horizon
    max_minutes: float | None = Field(8.0, gt=0)  # time budget; training stops cleanly when reached
    lr: float = Field(5e-4, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)  # the cosine ends at min_lr_ratio * lr
    # "steps": the cosine ends at max_steps. "steps_or_time": it ends at max_steps or at max_minutes,
    # whichever comes first (progress = max(step / max_steps, elapsed / max_minutes), the ranks'
    # mean clock), so a run that the time budget stops still ends on the decayed rate. A resumed
    # run counts its minutes from its own start. The demo uses it: its machine's speed is unknown.
    lr_horizon: Literal["steps", "steps_or_time"] = "steps"
    weight_decay: float = Field(1e-2, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    # EMA of the U-Net weights (samples and export use it); None disables. The decay warms up as
    # min(ema_decay, (1 + step) / (10 + step)) so that a short run is not dominated by its initial weights.
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # trade compute for activation memory (big U-Nets on GPU)
    init_from: str | None = None  # model URI (folder, models:/ldm@champion) whose U-Net starts training
    seed: int = 0

    # Data: each worker streams its shard of latents/ with a row-level shuffle buffer.
    shuffle_buffer: int = Field(1024, ge=0)  # rows per worker; 0 reads in file order
    # A dataset whose Parquet files total at most this many MB is read once into Ray's object store
    # (`Dataset.materialize`) instead of once per epoch: small fine-tuning sets and the demo then skip
    # a read and split at every epoch boundary (docs/TRAINING.md). 0: always stream.
    cache_max_mb: float = Field(1024.0, ge=0)
    # Oversampling by caption: each row is read as many times per epoch as the first rule whose pattern
    # its caption matches says (once when none does). The copies are shuffled into the block they come
    # from, so the shuffle buffer does not hand them out together (pipelines/train/data.py).
    caption_repeats: list[CaptionRepeat] = Field(default_factory=list)

    # Ray Train.
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    torch_threads: int = Field(1, ge=1)  # per worker
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    ray_address: str | None = None
    num_cpus: int | None = None  # for a local Ray started by this job
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint; -1: no limit
    checkpoints_to_keep: int = Field(2, ge=1)

    # Hooks: checkpoints, logging and sample grids (they watch the loop, never change it).
    checkpoint_every: int = Field(200, ge=1)
    log_every: int = Field(10, ge=1)
    timestep_buckets: int = Field(4, ge=1, le=20)  # loss logged per range of t, e.g. loss_t000-249
    system_metrics: bool = True  # CPU/GPU/memory/disk of rank 0's node, as system/* metrics
    system_metrics_interval: float = Field(10.0, gt=0)  # seconds
    sample_every: int = Field(200, ge=1)
    sample_prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_seed: int = 0
    sample_steps: int = Field(20, ge=1, le=200)
    sample_guidance: float = Field(4.0, ge=0.0, le=30.0)

    # Tracking and registry.
    experiment: str = "train"
    model_name: str = "ldm"
    run_name: str | None = None  # Ray Train run folder and MLflow run name; default train-<timestamp>
    # Where Ray Train keeps checkpoints (a folder or s3://bucket/prefix); None: <workdir>/runs.
    # Re-launching with the same storage_path and run_name resumes from the last checkpoint there.
    storage_path: str | None = None

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        parts = self.num_workers * self.grad_accum_steps
        if self.batch_size % parts:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by num_workers x grad_accum_steps = {parts}"
            )
        if (self.from_scratch or self.lora.enabled) and not self.init_from:
            raise ValueError(
                "from_scratch and lora need init_from (the pipeline folder whose U-Net they use)"
            )
        if self.train_text_encoder and self.lora.enabled:
            raise ValueError("train_text_encoder trains the whole encoder: it does not combine with lora")
        # With init_from and no prediction_type the folder's decides (checked in resolve_init).
        folder_decides = self.init_from and self.prediction_type is None
        if self.zero_terminal_snr and self.prediction_type != "v_prediction" and not folder_decides:
            raise ValueError(
                "zero_terminal_snr needs prediction_type v_prediction (ldm/sd_format.py NoiseSchedule)"
            )
        return self

    @property
    def micro_batch_size(self) -> int:
        """Rows per worker per forward/backward pass."""
        return self.batch_size // (self.num_workers * self.grad_accum_steps)
