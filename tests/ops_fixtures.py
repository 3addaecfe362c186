"""Helpers shared by the operations tests (submit, retrain, notebooks): tiny job configs and shards.

Not a test module (no ``test_`` prefix). The first-stage models come from `ingest_fixtures`; the job
configs here are the smallest that still run every stage for real (a few rows, a few steps).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ldm.config.eval import EvalConfig
from ldm.config.ingest import FilterConfig, IngestConfig, StageResources
from ldm.config.synth import BadRowRates, SynthConfig
from ldm.config.train import TrainConfig
from ldm.unet import UNetConfig

TINY_UNET = UNetConfig(
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def tiny_ingest(workdir: str | Path, **update) -> IngestConfig:
    """Ingest with small model stages; the random CLIP keeps every pair (threshold -1)."""
    return IngestConfig(
        workdir=str(workdir),
        allow_hosts=["127.0.0.1"],
        filters=FilterConfig(clip_threshold=-1.0),
        encode=StageResources(batch_size=16, num_cpus=0.25),
        torch_threads=1,
    ).model_copy(update=update)


def tiny_train(workdir: str | Path, **update) -> TrainConfig:
    """Three optimizer steps of a tiny U-Net on one Ray Train worker."""
    return TrainConfig(
        workdir=str(workdir),
        unet=TINY_UNET,
        batch_size=4,
        num_workers=1,
        cpus_per_worker=0.25,
        max_steps=3,
        max_minutes=None,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=3,
        sample_every=3,
        sample_prompts=["a red circle", "a blue square"],
        sample_steps=2,
    ).model_copy(update=update)


def tiny_eval(workdir: str | Path, **update) -> EvalConfig:
    """Six held-out prompts (one per category), two sampling steps."""
    return EvalConfig(workdir=str(workdir), num_prompts=6, num_inference_steps=2, batch_size=6).model_copy(
        update=update
    )


def render_shard(folder: Path, seed: int, num_pairs: int = 10, dead_url: float = 0.1) -> Path:
    """Render a synthetic source into ``folder`` (only dead URLs as faults); returns its www/ folder."""
    from ldm.synth.source import render_source

    rates = BadRowRates(**dict.fromkeys(BadRowRates.model_fields, 0.0)).model_copy(
        update={"dead_url": dead_url}
    )
    render_source(SynthConfig(num_pairs=num_pairs, seed=seed, bad_rows=rates), folder)
    return folder / "www"


def land_shard(pairs: Path, source: Path, name: str) -> Path:
    """A new shard arrives under the source prefix."""
    source.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(pairs, source / name))
