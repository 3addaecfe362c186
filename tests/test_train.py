"""`ldm train` end to end at tiny size: real Ray Train (2 workers, DDP over gloo), real Ray Data, real
MLflow on SQLite, real diffusers models; then the exported folder is loaded back as a pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ldm.config.train import TrainConfig
from ldm.contract import (
    COL_CAPTION,
    COL_KEY,
    COL_LATENT,
    COL_TEXT_EMBEDDING,
    LATENTS_DIR,
    MANIFEST_FILE,
    META_LATENT_SHAPE,
    META_SCALING_FACTOR,
    META_TEXT_EMBEDDING_SHAPE,
    WorkDir,
)
from ldm.errors import DataError
from ldm.unet import UNetConfig
from pipelines.train import read_latents_facts, run_train

SCALING_FACTOR = 1.26
CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a large yellow star"]


def tiny_unet_config() -> UNetConfig:
    return UNetConfig(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def tensor_column(array: np.ndarray) -> pa.Array:
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def write_tiny_workdir(root: Path, rows: int = 32, scaling_factor: float | None = SCALING_FACTOR) -> WorkDir:
    """Tiny first-stage models where bootstrap puts them, and a latents dataset as ingest writes it."""
    from ldm.first_stage.autoencoder import save_autoencoder
    from ldm.first_stage.text_encoder import save_text_encoder
    from ldm.testing import manifest_json, tiny_components
    from ldm.text import encode_captions

    work = WorkDir(root)
    parts = tiny_components(seed=0, latent_size=8, text_len=16)
    parts["vae"].register_to_config(scaling_factor=SCALING_FACTOR)
    save_autoencoder(parts["vae"], work.autoencoder)
    save_text_encoder(parts["tokenizer"], parts["text_encoder"], work.models)

    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
    embeddings = (
        encode_captions(parts["tokenizer"], parts["text_encoder"], captions).numpy().astype(np.float16)
    )
    latents = np.random.default_rng(0).normal(0, 0.8, size=(rows, 4, 8, 8)).astype(np.float16)
    table = pa.table(
        {
            COL_KEY: [f"{i:04d}" for i in range(rows)],
            COL_CAPTION: captions,
            COL_LATENT: tensor_column(latents),
            COL_TEXT_EMBEDDING: tensor_column(embeddings),
        }
    )
    metadata = {
        META_LATENT_SHAPE: json.dumps([4, 8, 8]).encode(),
        META_TEXT_EMBEDDING_SHAPE: json.dumps(list(embeddings.shape[1:])).encode(),
    }
    if scaling_factor is not None:
        metadata[META_SCALING_FACTOR] = json.dumps(scaling_factor).encode()
    latents_dir = work.data / LATENTS_DIR
    latents_dir.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(metadata), latents_dir / "part-00000.parquet")
    (work.data / MANIFEST_FILE).write_text(
        manifest_json(rows, "abc123", list(latents.shape[1:]), float(scaling_factor or 1.0))
    )
    return work


def test_latents_facts_come_from_the_schema_and_a_missing_scaling_factor_raises(tmp_path):
    work = write_tiny_workdir(tmp_path / "ok", rows=4)
    facts = read_latents_facts(str(work.data / LATENTS_DIR))
    assert facts.scaling_factor == pytest.approx(SCALING_FACTOR)
    assert facts.latent_shape == (4, 8, 8)
    assert facts.text_embedding_shape == (16, 32)

    bad = write_tiny_workdir(tmp_path / "bad", rows=4, scaling_factor=None)
    with pytest.raises(DataError, match="scaling"):
        read_latents_facts(str(bad.data / LATENTS_DIR))
    with pytest.raises(DataError, match="no Parquet files"):
        read_latents_facts(str(tmp_path / "nothing"))


def test_parquet_bytes_sums_the_parquet_files_and_nothing_else(tmp_path):
    from pipelines.train.data import parquet_bytes

    work = write_tiny_workdir(tmp_path / "ok", rows=16)
    latents = work.data / LATENTS_DIR
    (latents / "nested").mkdir()
    pq.write_table(pa.table({"x": list(range(1000))}), latents / "nested" / "more.parquet")
    (latents / "notes.txt").write_text("not data" * 1000)
    expected = sum(p.stat().st_size for p in latents.rglob("*.parquet"))
    assert expected > 0
    assert parquet_bytes(str(latents)) == expected
    assert parquet_bytes(str(tmp_path / "nothing")) == 0


def test_train_two_workers_tracks_checkpoints_exports_and_registers(tmp_path, ray_local, monkeypatch):
    """From a RELATIVE work directory (Ray Train gives workers another working directory), with
    system metrics sampled every 0.5 s while sample grids, checkpoints and metrics fall on the same
    steps: every grid and the whole loss history reach MLflow, and no tracking call failed."""
    import mlflow
    from diffusers import StableDiffusionPipeline

    from ldm.pipeline import generate
    from ldm.tracking import configure

    work = write_tiny_workdir(tmp_path / "wd", rows=32)
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(
        workdir="./wd",
        unet=tiny_unet_config(),
        batch_size=8,  # 4 per worker: 16 rows per shard -> 4 steps per epoch, so 6 steps cross an epoch
        max_steps=6,
        max_minutes=None,
        warmup_steps=2,
        log_every=2,
        checkpoint_every=2,
        sample_every=2,
        sample_prompts=["a red circle", "a blue square"],
        sample_steps=2,
        system_metrics_interval=0.5,
        run_name="tiny",
    )
    summary = run_train(cfg)

    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
    assert summary["steps"] == 6
    assert summary["dataset_cached"] is True  # 32 rows: read once, the 6 steps cross an epoch on it
    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6
    assert checkpoint.is_relative_to(work.runs / "tiny")

    configure(work.root)
    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "8"
    assert run.data.params["data_rows_per_epoch"] == "32"
    assert run.data.params["unet.block_out_channels"] == "[16, 32]"
    assert float(run.data.params["data.scaling_factor"]) == pytest.approx(SCALING_FACTOR)
    assert run.data.params["dataset_cached"] == "True"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [2, 4, 6]
    assert all(math.isfinite(m.value) for m in losses)
    assert client.get_metric_history(run.info.run_id, "samples_per_second")[0].value > 0
    assert 0 <= client.get_metric_history(run.info.run_id, "data_wait_fraction")[0].value < 1
    assert client.get_metric_history(run.info.run_id, "grad_norm")[0].value > 0
    # Cosine decay: the learning rate after warm-up falls towards min_lr_ratio * lr.
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs[1] > lrs[2] >= cfg.lr * cfg.min_lr_ratio
    metric_names = set(run.data.metrics)
    assert {"loss_t000-249", "loss_t250-499", "loss_t500-749", "loss_t750-999"} <= metric_names
    assert any(name.startswith("system/cpu_utilization") for name in metric_names)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    sample_steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png"))
    assert sample_steps == [2, 4, 6]
    assert run.data.tags["ldm.tracking_failures"] == "0"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/train.yaml"]
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == "abc123"

    version = client.get_model_version_by_alias("ldm", "candidate")
    assert str(version.version) == summary["model_version"]
    assert version.run_id == summary["run_id"]

    pipe = StableDiffusionPipeline.from_pretrained(
        summary["export"], local_files_only=True, use_safetensors=True
    )
    assert pipe.vae.config.scaling_factor == pytest.approx(SCALING_FACTOR)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    from safetensors.torch import load_file

    # The export is the EMA of the weights, not the last weights.
    assert summary["exported_weights"] == "ema_unet"
    ema = load_file(str(checkpoint / "ema_unet" / "diffusion_pytorch_model.safetensors"))
    last = load_file(str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[name], value) for name, value in ema.items())
    assert any(not torch.equal(ema[name], value) for name, value in last.items())
    # Both DDP replicas ended with the same weights.
    assert len(summary["replicas"]) == 2
    assert summary["replicas"][0]["sha256"] == summary["replicas"][1]["sha256"]
    result = generate(pipe, "a red circle", num_inference_steps=2, seed=1)
    assert result.images[0].size == (32, 32)
    assert np.asarray(result.images[0]).std() > 0


@pytest.mark.slow
def test_time_budget_stops_cleanly_and_a_rerun_resumes_from_the_checkpoint(tmp_path, ray_local):
    work = write_tiny_workdir(tmp_path / "work", rows=32)
    base = TrainConfig(
        workdir=str(work.root),
        unet=tiny_unet_config(),
        batch_size=8,
        checkpoint_every=100,
        sample_every=100,
        sample_prompts=[],
        run_name="budget",
    )
    # A budget far below one step: both workers must agree to stop after the first step.
    # cache_max_mb=0: this test streams the data every epoch; the two-worker test reads it once.
    first = run_train(base.model_copy(update={"max_steps": 100, "max_minutes": 1e-6, "cache_max_mb": 0}))
    assert first["steps"] == 1
    assert first["dataset_cached"] is False
    # Same run name: Ray Train restores the last checkpoint (unet + optimizer + step) and goes on.
    second = run_train(base.model_copy(update={"max_steps": 3, "max_minutes": None}))
    assert second["steps"] == 3
    assert math.isfinite(second["final_loss"])
    assert second["model_version"] != first["model_version"]
