"""The demo end to end at reduced size, through the real console script in a fresh process.

Same code path as `make demo` (synth -> bootstrap -> ingest over HTTP -> train on 2 Ray workers ->
MLflow + registry -> eval -> Ray Serve -> image grid), with every stage shrunk so it runs in a few
minutes. Quality gates are off here (tiny models cannot pass them); `make demo` keeps them on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

SMALL = {
    "images_per_prompt": 2,
    "prompts": ["a red circle", "a blue square"],
    "synth": {"num_pairs": 160},
    "bootstrap": {
        "num_train_images": 512,
        "min_clip_auc": 0.0,
        "min_psnr_db": 0.0,
        "clip": {"steps": 10, "batch_size": 32, "eval_pairs": 64},
        "autoencoder": {"steps": 10, "batch_size": 8, "eval_images": 16, "scaling_images": 32},
    },
    "ingest": {"filters": {"clip_threshold": -1.0}},
    "train": {"max_steps": 6, "batch_size": 16, "checkpoint_every": 3, "sample_every": 3, "sample_steps": 2},
    "eval": {"num_prompts": 6, "num_seen_prompts": 6, "num_inference_steps": 2},
}


def test_training_gets_what_the_budget_leaves():
    from ldm.config.demo import DemoConfig
    from pipelines.demo import fit_training_to_budget

    cfg = DemoConfig(budget_minutes=19.0, after_train_minutes=2.0, min_train_minutes=1.0)
    train = cfg.train.model_copy(update={"max_minutes": 12.0})
    assert fit_training_to_budget(train, cfg, elapsed_s=8 * 60).max_minutes == 9.0  # a fast machine
    assert fit_training_to_budget(train, cfg, elapsed_s=12.5 * 60).max_minutes == 4.5  # a slow one
    assert fit_training_to_budget(train, cfg, elapsed_s=30 * 60).max_minutes == 1.0  # over budget: the floor
    assert fit_training_to_budget(train, cfg, elapsed_s=60).max_minutes == 12.0  # never above the cap
    unbudgeted = cfg.model_copy(update={"budget_minutes": None})
    assert fit_training_to_budget(train, unbudgeted, elapsed_s=30 * 60) is train


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path):
    config = tmp_path / "demo-small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    workdir = tmp_path / "work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "ldm.cli", "demo", "--config", str(config), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ldm demo: summary" in proc.stdout

    summary = json.loads((workdir / "outputs" / "demo_summary.json").read_text())
    # Every input row is accounted for: accepted + rejected == input.
    latents = pq.read_table(workdir / "data" / "latents")
    rejects = pq.read_table(workdir / "data" / "rejects")
    pairs = pq.read_table(workdir / "synth" / "pairs.parquet")
    assert latents.num_rows + rejects.num_rows == pairs.num_rows == 160
    assert latents.num_rows > 0
    keys = latents.column("key").to_pylist() + rejects.column("key").to_pylist()
    assert len(set(keys)) == len(keys)
    # The synthetic faults were rejected for their reasons.
    reasons = set(rejects.column("reason").to_pylist())
    assert {"download_failed", "too_small", "extreme_aspect", "duplicate"} <= reasons

    # Trained, registered as a version with both aliases, and served through HTTP.
    version = str(summary["train"]["model_version"])
    assert summary["serve"]["healthz"]["model"]["version"] == version
    from mlflow import MlflowClient

    # The registry URI too: an earlier test in the same process may have set a global registry URI.
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert str(client.get_model_version_by_alias("ldm", "champion").version) == version
    assert str(client.get_model_version_by_alias("ldm", "candidate").version) == version
    assert set(summary["eval"]["scores"]) >= {"overall"}
    from ldm.config.demo import DemoConfig

    assert (
        DemoConfig().min_train_minutes <= summary["train_max_minutes"] <= DemoConfig().train.max_minutes
    )  # the budget's cut, or the cap
    assert 0.0 <= summary["eval"]["ceiling"]["overall"] <= 1.0

    from PIL import Image

    grid = Image.open(Path(summary["serve"]["grid"]))
    assert grid.width > 2 * 64 and grid.height >= 2 * 64
