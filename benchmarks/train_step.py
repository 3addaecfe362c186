"""Step time of `ldm train` (the default demo U-Net) on random latents of the demo's shapes.

Builds a throwaway work directory (random-weight autoencoder and text encoder of the bootstrap's
shapes, random 4x16x16 latents with [32, 128] text embeddings), runs the real training job for a few
dozen steps and prints seconds per step from the run's MLflow metrics (the first window, which holds
start-up, is left out). Usage:

    .venv/bin/python benchmarks/train_step.py --steps 60 --batch-size 64 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_workdir(root: Path, rows: int, text_len: int, text_dim: int) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.config.bootstrap import AutoencoderConfig
    from ldm.contract import (
        COL_CAPTION,
        COL_KEY,
        COL_LATENT,
        COL_TEXT_EMBEDDING,
        LATENTS_DIR,
        MANIFEST_FILE,
        META_SCALING_FACTOR,
        WorkDir,
    )
    from ldm.first_stage.autoencoder import build_autoencoder, save_autoencoder
    from ldm.first_stage.text_encoder import save_text_encoder
    from ldm.first_stage.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer

    work = WorkDir(root)
    # The bootstrap's autoencoder shape (random weights), with the demo's measured scaling factor.
    vae = build_autoencoder(AutoencoderConfig())
    vae.register_to_config(scaling_factor=1.26)
    save_autoencoder(vae, work.autoencoder)
    text_config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=text_dim,
        intermediate_size=4 * text_dim,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=text_len,
        hidden_act="gelu",
        eos_token_id=CLIP_VOCAB_SIZE - 1,
    )
    save_text_encoder(build_clip_tokenizer(text_len), CLIPTextModel(text_config), work.models)

    rng = np.random.default_rng(0)
    latents = rng.normal(0, 0.8, (rows, 4, 16, 16)).astype(np.float16)
    text = rng.normal(0, 1, (rows, text_len, text_dim)).astype(np.float16)
    table = pa.table(
        {
            COL_KEY: [str(i) for i in range(rows)],
            COL_CAPTION: ["a red circle"] * rows,
            COL_LATENT: pa.FixedShapeTensorArray.from_numpy_ndarray(latents),
            COL_TEXT_EMBEDDING: pa.FixedShapeTensorArray.from_numpy_ndarray(text),
        }
    ).replace_schema_metadata({META_SCALING_FACTOR: b"1.26"})
    (work.data / LATENTS_DIR).mkdir(parents=True)
    pq.write_table(table, work.data / LATENTS_DIR / "part-00000.parquet")
    (work.data / MANIFEST_FILE).write_text(json.dumps({"counts": {"accepted": rows}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()

    import mlflow

    from ldm.config.train import TrainConfig
    from ldm.tracking import configure
    from pipelines.train import run_train

    with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
        make_workdir(Path(tmp), args.rows, text_len=32, text_dim=128)
        cfg = TrainConfig(
            workdir=tmp,
            batch_size=args.batch_size,
            num_workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            torch_threads=args.torch_threads,
            max_steps=args.steps,
            max_minutes=None,
            log_every=10,
            sample_every=10 * args.steps,
            checkpoint_every=10 * args.steps,
            num_cpus=2,
        )
        summary = run_train(cfg)
        configure(tmp)
        history = mlflow.MlflowClient().get_metric_history(summary["run_id"], "seconds_per_step")
        windows = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
        median = statistics.median(windows)
        print(
            json.dumps(
                {
                    "batch_size": args.batch_size,
                    "workers": args.workers,
                    "seconds_per_step_windows": [round(w, 3) for w in windows],
                    "median_seconds_per_step": round(median, 3),
                    "steps_per_second": round(1 / median, 3),
                    "final_loss": summary["final_loss"],
                }
            )
        )


if __name__ == "__main__":
    main()
