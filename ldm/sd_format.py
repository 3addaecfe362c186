"""Stable Diffusion pipeline folders (diffusers layout, local or ``s3://``) as the start of a training run.

A folder such as ``runwayml/stable-diffusion-v1-5`` or ``stabilityai/stable-diffusion-2-1`` (copied to
disk or a bucket: ``model_index.json``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``unet/``,
``scheduler/``) carries everything a fine-tuning run must keep:

- the U-Net's own diffusers config IS the architecture: any ``UNet2DConditionModel`` config (SD 1.x,
  SD 2.x with linear projections and per-block head counts) is taken as it is, never re-described by
  the project's ``UNetConfig``; ``from_scratch`` keeps it and re-initialises the weights;
- the scheduler's ``prediction_type`` and beta schedule are the objective's defaults
  (``NoiseSchedule``), checked against what ``ldm/diffusion.py`` supports: unknown values raise;
- the export is again a complete pipeline folder with the source's VAE, text encoder, tokenizer and
  scheduler class, and the trained U-Net (``export_sd_pipeline``).

Remote folders are copied once into the local model cache (``ldm.storage.materialize``).
"""

from __future__ import annotations

import inspect
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from ldm import storage
from ldm.diffusion import PredictionType, check_prediction_type

if TYPE_CHECKING:  # diffusers is imported lazily: configs import this module's types cheaply
    from diffusers import DDPMScheduler, UNet2DConditionModel

MODEL_INDEX = "model_index.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"

# The beta schedules of diffusers' DDPMScheduler that SD checkpoints use (SD 1.x/2.x: scaled_linear).
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


def check_beta_schedule(value: str) -> BetaSchedule:
    if value not in get_args(BetaSchedule):
        raise ValueError(f"unknown beta_schedule {value!r}; expected one of {get_args(BetaSchedule)}")
    return value  # type: ignore[return-value]


# What a scheduler config says for NoiseSchedule.zero_terminal_snr; every diffusers sampler that
# ldm/pipeline.py offers (DDIM, DPM-Solver++, Euler) reads both keys.
ZERO_TERMINAL_SNR_KEYS: dict[str, Any] = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@dataclass(frozen=True)
class NoiseSchedule:
    """The training objective's schedule and target, as a pipeline folder's scheduler states them."""

    prediction_type: PredictionType = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    # Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": the betas are
    # rescaled so that the last step is pure noise (diffusers' rescale_betas_zero_snr) and samplers
    # start there (timestep_spacing "trailing"). With SD's schedule the last step keeps
    # sqrt(alpha_bar) = 0.069 of the image, enough for the model to read the layout from the noise
    # and to take it from the random noise at sampling time instead of from the prompt.
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)
        check_beta_schedule(self.beta_schedule)
        if self.num_train_timesteps < 1 or not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"invalid noise schedule {self}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "zero_terminal_snr needs prediction_type v_prediction: at the last step the input is pure "
                "noise, so an epsilon prediction is the input itself and says nothing of the image"
            )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Read any diffusers scheduler config (DDPM, DDIM, PNDM, Euler, ...); unsupported keys raise."""
        if config.get("trained_betas") is not None:
            raise ValueError("schedulers with explicit trained_betas are not supported")
        return cls(
            prediction_type=check_prediction_type(config.get("prediction_type", "epsilon")),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=check_beta_schedule(config.get("beta_schedule", "linear")),
            zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )

    def scheduler_config(self) -> dict[str, Any]:
        # steps_offset/clip_sample/set_alpha_to_one: what the diffusers SD pipelines expect (see
        # ldm/diffusion.py), or StableDiffusionPipeline rewrites the config with a warning.
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "prediction_type": self.prediction_type,
            "steps_offset": 1,
            "clip_sample": False,
            "set_alpha_to_one": False,
        } | (ZERO_TERMINAL_SNR_KEYS if self.zero_terminal_snr else {})

    def make_scheduler(self) -> DDPMScheduler:
        """The training scheduler (``add_noise``/``get_velocity`` of ``ldm/diffusion.py``) for this schedule."""
        from diffusers import DDPMScheduler

        # from_config, as ldm.diffusion.make_noise_scheduler does: set_alpha_to_one must stay in the config
        return DDPMScheduler.from_config(self.scheduler_config())


@dataclass(frozen=True)
class SDFolder:
    """What a pipeline folder says about the U-Net and the objective (read once, then passed around)."""

    uri: str  # as given (local path or s3://)
    local: Path  # the folder on this machine (the cache copy for s3://)
    unet_config: dict[str, Any]  # unet/config.json, verbatim
    scheduler_class: str  # e.g. PNDMScheduler (SD 1.5), DDIMScheduler (SD 2.1)
    scheduler_config: dict[str, Any]
    schedule: NoiseSchedule

    @property
    def architecture(self) -> dict[str, Any]:
        """The U-Net config without diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``)."""
        return {key: value for key, value in self.unet_config.items() if not key.startswith("_")}


def is_sd_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / MODEL_INDEX).is_file() and (folder / UNET_DIR / "config.json").is_file()


def read_sd_folder(uri: str | Path) -> SDFolder:
    """Read a diffusers SD pipeline folder (local or ``s3://``); raises a one-line error when it is not one."""
    uri = str(uri)
    local = storage.materialize(uri)
    if not is_sd_folder(local):
        raise FileNotFoundError(
            f"{uri} is not a Stable Diffusion pipeline folder (needs {MODEL_INDEX} and {UNET_DIR}/config.json)"
        )
    unet_config = json.loads((local / UNET_DIR / "config.json").read_text())
    from ldm.positional_unet import unet_class_for

    try:
        unet_class_for(unet_config)  # diffusers' U-Net or ours with a position embedding, nothing else
    except ValueError as error:
        raise ValueError(f"{uri}: {error}") from error
    scheduler_file = local / SCHEDULER_DIR / SCHEDULER_CONFIG
    if not scheduler_file.is_file():
        raise FileNotFoundError(f"{uri} has no {SCHEDULER_DIR}/{SCHEDULER_CONFIG}")
    scheduler_config = json.loads(scheduler_file.read_text())
    try:
        schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
    except ValueError as error:
        raise ValueError(f"{uri}: {error}") from error
    return SDFolder(
        uri=uri,
        local=local,
        unet_config=unet_config,
        scheduler_class=str(scheduler_config.get("_class_name", "DDPMScheduler")),
        scheduler_config=scheduler_config,
        schedule=schedule,
    )


def load_unet(source: SDFolder, *, from_scratch: bool = False, seed: int = 0) -> UNet2DConditionModel:
    """The folder's U-Net: its weights, or (``from_scratch``) the same architecture freshly initialised."""
    from ldm.positional_unet import unet_class_for

    cls = unet_class_for(source.unet_config)  # diffusers' own, or ours with a position embedding
    if from_scratch:
        # fork_rng: seeding the initialisation must not reseed the caller's global generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls.from_config(source.unet_config)
    # use_safetensors: a folder holding only pickled weights fails instead of being unpickled
    return cls.from_pretrained(source.local, subfolder=UNET_DIR, local_files_only=True, use_safetensors=True)


def check_data_shapes(unet_config: Mapping[str, Any], latent_shape: tuple[int, ...], text_width: int) -> None:
    """Raise a one-line error when latents [C, H, W] or text embeddings of ``text_width`` do not fit the U-Net."""
    channels, height, width = latent_shape
    if unet_config["in_channels"] != channels:
        raise ValueError(
            f"the U-Net takes {unet_config['in_channels']}-channel latents, the data has {channels}"
        )
    if unet_config["cross_attention_dim"] != text_width:
        raise ValueError(
            f"the U-Net cross-attends to {unet_config['cross_attention_dim']}-wide text embeddings, the data "
            f"has {text_width}: ingest with the text encoder of the same pipeline folder"
        )
    factor = 2 ** (len(unet_config["block_out_channels"]) - 1)
    if height % factor or width % factor:
        raise ValueError(f"latents {height}x{width} are not divisible by the U-Net's downsampling {factor}")


def export_sd_pipeline(
    source: SDFolder,
    unet: torch.nn.Module,
    output: str | Path,
    *,
    schedule: NoiseSchedule | None = None,
    **components: Any,
) -> str:
    """Write a complete pipeline folder at ``output`` (local or ``s3://``): the source's VAE, text encoder,
    tokenizer and scheduler class with ``unet`` (and any ``components`` given instead of the source's).

    The scheduler keeps the source's class and config; ``schedule`` (the one training used) overrides
    its prediction type and betas when given. Weights are safetensors. Returns ``output``.
    """
    from diffusers import StableDiffusionPipeline

    scheduler_cls = _scheduler_class(source.scheduler_class)
    config = {key: value for key, value in source.scheduler_config.items() if not key.startswith("_")}
    if schedule is not None:
        config |= {key: schedule.scheduler_config()[key] for key in _SCHEDULE_KEYS}
        if schedule.zero_terminal_snr:
            config |= ZERO_TERMINAL_SNR_KEYS
            if "rescale_betas_zero_snr" not in inspect.signature(scheduler_cls.__init__).parameters:
                # SD 1.5's PNDMScheduler would drop the key, and every sampler built from its config
                # with it: DDIM is the sampler Lin et al. use with a zero terminal SNR. Our schedule's
                # keys (clip_sample False above all: DDIM's default clips latents to [-1, 1]) go too.
                scheduler_cls = _scheduler_class("DDIMScheduler")
                config |= schedule.scheduler_config()
    pipe = StableDiffusionPipeline.from_pretrained(
        source.local,
        unet=unet,
        scheduler=scheduler_cls.from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
        use_safetensors=True,
        **components,
    )
    if storage.is_remote(output):
        with tempfile.TemporaryDirectory(prefix="ldm-export-") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            return storage.upload_folder(tmp, output)
    Path(output).mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output, safe_serialization=True)
    return str(output)


_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def _scheduler_class(name: str) -> Any:
    import diffusers

    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None or not issubclass(scheduler_cls, diffusers.SchedulerMixin):
        raise ValueError(f"unknown scheduler class {name!r} in the pipeline folder")
    return scheduler_cls
