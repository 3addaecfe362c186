"""Fault tolerance and failure modes of `ldm train`, with real Ray Train workers and real MLflow.

- A training worker process dies (SIGKILL, as a lost node would cause) mid-run: Ray Train restarts
  the worker group, the run resumes from its last checkpoint and ends at the configured step count.
- The tracking server is down for the whole run: training still finishes; MLflow only warns.
- Non-finite data: the NaN guard stops the run with an error naming the step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_train import tiny_unet_config, write_tiny_workdir

from ldm.config.train import TrainConfig
from ldm.contract import COL_LATENT, LATENTS_DIR
from pipelines.train import FAULT_ENV, run_train


@pytest.mark.slow  # ~75 s: two worker-group starts
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_last_checkpoint(
    tmp_path, ray_local, monkeypatch
):
    import mlflow

    from ldm.tracking import configure

    work = write_tiny_workdir(tmp_path / "work", rows=32)
    cfg = TrainConfig(
        workdir=str(work.root),
        unet=tiny_unet_config(),
        batch_size=8,
        grad_accum_steps=2,  # 2 micro-batches of 2 per worker: DDP's no_sync path runs too
        max_steps=8,
        max_minutes=None,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
        sample_every=100,
        sample_prompts=[],
        system_metrics=False,
        max_failures=1,
        run_name="killed",
    )
    # Rank 1 SIGKILLs itself after step 5 of the first attempt. Ray Train's result queue holds one
    # report, so by then the checkpoint of step 2 (at least) has reached the controller.
    monkeypatch.setenv(FAULT_ENV, "1:5")
    summary = run_train(cfg)

    assert summary["steps"] == 8
    assert math.isfinite(summary["final_loss"])
    assert json.loads((Path(summary["checkpoint"]) / "state.json").read_text())["step"] == 8
    configure(work.root)
    client = mlflow.MlflowClient()
    resumed = client.get_metric_history(summary["run_id"], "resumed_from_step")
    assert [m.value for m in resumed] in ([2.0], [4.0])
    # The steps after the resume point were logged twice (before the kill and after the restart).
    logged_steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert logged_steps.count(int(resumed[0].value) + 1) == 2
    assert max(logged_steps) == 8
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    assert len({r["sha256"] for r in summary["replicas"]}) == 1


def test_training_finishes_when_the_tracking_server_is_down_and_fine_tunes_from_a_folder(
    tmp_path, ray_local, monkeypatch
):
    from conftest import free_port

    from ldm.testing import tiny_pipeline_folder

    work = write_tiny_workdir(tmp_path / "work", rows=16)
    init = tiny_pipeline_folder(tmp_path / "init", seed=5)
    # Nothing listens on this port; no retries and a short timeout so the outage is found at once.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrainConfig(
        workdir=str(work.root),
        unet=tiny_unet_config(),
        num_workers=1,
        batch_size=4,
        max_steps=2,
        max_minutes=None,
        lr=1e-9,  # fine-tuning at a negligible rate: the result must still be the initial model
        warmup_steps=0,
        init_from=str(init),
        mixed_precision="bf16",  # the autocast path of the loop, on CPU
        gradient_checkpointing=True,
        checkpoint_every=100,
        sample_every=1,
        sample_steps=1,
        run_name="offline",
    )
    with pytest.warns(UserWarning, match="MLflow|not registered"):
        summary = run_train(cfg)

    assert summary["steps"] == 2 and summary["run_id"] is None and summary["model_version"] is None
    from safetensors.torch import load_file

    from ldm.testing import tiny_components

    trained = load_file(str(Path(summary["checkpoint"]) / "unet" / "diffusion_pytorch_model.safetensors"))
    initial = tiny_components(seed=5)["unet"].state_dict()
    assert max((trained[name] - value).abs().max().item() for name, value in initial.items()) < 1e-5
    assert (Path(summary["export"]) / "model_index.json").is_file()


@pytest.mark.slow
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_non_finite_data_stops_training_with_an_error_naming_the_step(tmp_path, ray_local):
    work = write_tiny_workdir(tmp_path / "work", rows=8)
    shard = next((work.data / LATENTS_DIR).glob("*.parquet"))
    table = pq.read_table(shard)
    latents = table.column(COL_LATENT).combine_chunks().to_numpy_ndarray().copy()
    latents[:] = np.nan
    import pyarrow as pa

    column = pa.FixedShapeTensorArray.from_numpy_ndarray(latents)
    table = table.set_column(table.schema.get_field_index(COL_LATENT), COL_LATENT, column)
    pq.write_table(table.replace_schema_metadata(pq.read_schema(shard).metadata), shard)

    cfg = TrainConfig(
        workdir=str(work.root),
        unet=tiny_unet_config(),
        num_workers=1,
        batch_size=4,
        max_steps=3,
        max_minutes=None,
        sample_prompts=[],
        system_metrics=False,
        max_failures=0,
        run_name="nan",
    )
    with pytest.raises(Exception, match=r"non-finite training at step 1"):
        run_train(cfg)
    assert torch.isnan(torch.from_numpy(latents)).all()
