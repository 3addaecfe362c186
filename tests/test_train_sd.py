"""Training from Stable Diffusion pipeline folders (tests/sd_fixtures.py): the folder's architecture and
schedule, LoRA (only the adapter trains, checkpoints and resume, export loadable by diffusers), and
Ray Train checkpoints on S3 (moto) with a resume that continues the step count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from s3_fixtures import s3_endpoint, use_s3  # noqa: F401 - s3_endpoint is a fixture
from sd_fixtures import LATENT_SIZE, SCALING_FACTOR, sd_folder_for_session
from test_train import tensor_column

from ldm.config.lora import LoraConfig
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
from ldm.testing import manifest_json
from pipelines.train import LatentsFacts, LocalWorld, LoopInputs, NanGuard, resolve_init, train_loop
from pipelines.train.checkpoint import LORA_DIR, UNET_DIR
from pipelines.train.data import tensor_batches
from pipelines.train.export import export_checkpoint
from pipelines.train.hooks import CheckpointReporter
from pipelines.train.source import load_first_stage

CAPTIONS = ["a red circle", "a blue square", "a small green triangle", "a large yellow star"]


def write_sd_data(root: Path, folder: Path, rows: int = 16) -> WorkDir:
    """A latents dataset as `ldm ingest` writes it with ``folder``'s text encoder (random latents)."""
    from ldm.first_stage.text_encoder import load_text_encoder
    from ldm.text import encode_captions

    work = WorkDir(root)
    tokenizer, text_encoder = load_text_encoder(str(folder))
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
    embeddings = encode_captions(tokenizer, text_encoder, captions).numpy().astype(np.float16)
    shape = (4, LATENT_SIZE, LATENT_SIZE)
    latents = np.random.default_rng(0).normal(0, 0.8, size=(rows, *shape)).astype(np.float16)
    table = pa.table(
        {
            COL_KEY: [f"{i:04d}" for i in range(rows)],
            COL_CAPTION: captions,
            COL_LATENT: tensor_column(latents),
            COL_TEXT_EMBEDDING: tensor_column(embeddings),
        }
    )
    metadata = {
        META_LATENT_SHAPE: json.dumps(list(shape)).encode(),
        META_TEXT_EMBEDDING_SHAPE: json.dumps(list(embeddings.shape[1:])).encode(),
        META_SCALING_FACTOR: json.dumps(SCALING_FACTOR).encode(),
    }
    (work.data / LATENTS_DIR).mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata(metadata), work.data / LATENTS_DIR / "part-00000.parquet")
    (work.data / MANIFEST_FILE).write_text(
        manifest_json(rows, "sd", list(latents.shape[1:]), float(SCALING_FACTOR))
    )
    return work


def _base_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a U-Net with or without a peft adapter, under the plain U-Net's names."""
    return {
        name.replace(".base_layer", ""): value
        for name, value in unet.state_dict().items()
        if ".lora_" not in name
    }


def test_sd2_folder_sets_architecture_and_v_prediction_and_from_scratch_reinitialises(tmp_path_factory):
    folder = sd_folder_for_session(tmp_path_factory, "sd2")
    facts = LatentsFacts(SCALING_FACTOR, (4, LATENT_SIZE, LATENT_SIZE), (77, 32))
    download = tmp_path_factory.mktemp("dl")
    init = resolve_init(TrainConfig(init_from=str(folder)), facts, download)
    saved = json.loads((folder / "unet" / "config.json").read_text())
    assert init.unet_config == saved  # SD 2.x: linear projection, per-block heads, as the folder says
    assert init.schedule.prediction_type == "v_prediction"
    overridden = resolve_init(TrainConfig(init_from=str(folder), prediction_type="epsilon"), facts, download)
    assert overridden.schedule.prediction_type == "epsilon"
    assert init.weights is not None
    scratch = resolve_init(TrainConfig(init_from=str(folder), from_scratch=True, seed=1), facts, download)
    assert scratch.weights is not None and scratch.weights.keys() == init.weights.keys()
    assert not torch.equal(scratch.weights["conv_in.weight"], init.weights["conv_in.weight"])
    with pytest.raises(ValueError, match="need init_from"):
        TrainConfig(lora=LoraConfig(rank=4))


def test_lora_trains_only_the_adapter_checkpoints_resumes_and_exports(tmp_path, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder = sd_folder_for_session(tmp_path_factory, "sd1")
    cfg = TrainConfig(
        init_from=str(folder),
        autoencoder=str(folder),
        text_encoder=str(folder),
        lora=LoraConfig(rank=4, alpha=8),
        num_workers=1,
        batch_size=4,
        max_steps=2,
        max_minutes=None,
        warmup_steps=0,
        lr=1e-2,
        checkpoint_every=2,
        ema_decay=0.9,
    )
    facts = LatentsFacts(SCALING_FACTOR, (4, LATENT_SIZE, LATENT_SIZE), (77, 32))
    init = resolve_init(cfg, facts, tmp_path / "dl")
    assert init.weights is not None
    assert 0 < init.counts.trainable < init.counts.total / 10
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(8, 4, LATENT_SIZE, LATENT_SIZE, generator=generator), torch.randn(8, 77, 32)
    batches = tensor_batches(latents, text, cfg, torch.zeros(77, 32))
    inputs = LoopInputs(cfg, facts, init.weights, init.unet_config, init.schedule)
    world = LocalWorld(checkpoint_dir=tmp_path / "ckpt")
    state = train_loop(inputs, batches, world, [NanGuard(), CheckpointReporter()])

    trainable = {name for name, p in state.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    base = _base_state(state.unet)
    assert base.keys() == init.weights.keys()
    assert all(torch.equal(base[name], value) for name, value in init.weights.items())  # byte-identical
    lora_b = {n: p for n, p in state.unet.named_parameters() if "lora_B" in n}
    assert any(p.abs().sum() > 0 for p in lora_b.values())  # lora_B starts at 0: the adapter moved
    assert state.ema_unet is not None
    ema = dict(state.ema_unet.named_parameters())
    assert all(torch.equal(ema[n], p) for n, p in state.unet.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(ema[n], lora_b[n]) for n in lora_b)  # the EMA follows the adapter

    checkpoint = sorted((tmp_path / "ckpt").iterdir())[-1]
    assert (checkpoint / LORA_DIR).is_dir() and not (checkpoint / UNET_DIR).exists()
    longer = LoopInputs(
        cfg.model_copy(update={"max_steps": 3}), facts, init.weights, init.unet_config, init.schedule
    )
    resumed = train_loop(longer, batches, world, [NanGuard(), CheckpointReporter()])
    assert resumed.resumed_from == 2 and resumed.step == 3

    export = tmp_path / "export"
    first_stage = load_first_stage(cfg, SCALING_FACTOR)
    exported, _ = export_checkpoint(sorted((tmp_path / "ckpt").iterdir())[-1], first_stage, cfg, export, init)
    assert exported == "ema_lora"
    fused = StableDiffusionPipeline.from_pretrained(export, local_files_only=True)
    assert type(fused.scheduler).__name__ == "PNDMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.load_lora_weights(export / "lora")
    sample = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    with torch.no_grad():
        t, cond = torch.tensor([500]), torch.randn(1, 77, 32, generator=generator)
        torch.testing.assert_close(
            pipe.unet(sample, t, cond).sample, fused.unet(sample, t, cond).sample, rtol=1e-4, atol=1e-5
        )


@pytest.mark.slow
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_full_fine_tune_with_checkpoints_on_s3_resumes_the_step_count(
    tmp_path,
    tmp_path_factory,
    ray_local,
    monkeypatch,
    s3_endpoint,  # noqa: F811
):
    import boto3
    import mlflow
    from diffusers import StableDiffusionPipeline

    from ldm.tracking import configure
    from pipelines.train import run_train

    use_s3(monkeypatch, s3_endpoint, tmp_path / "cache")
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="ckpts")
    folder = sd_folder_for_session(tmp_path_factory, "sd1")
    work = write_sd_data(tmp_path / "work", folder)
    cfg = TrainConfig(
        workdir=str(work.root),
        init_from=str(folder),
        autoencoder=str(folder),
        text_encoder=str(folder),
        storage_path="s3://ckpts/runs",
        run_name="sd1-s3",
        batch_size=4,
        max_steps=2,
        max_minutes=None,
        warmup_steps=0,
        lr=1e-3,
        checkpoint_every=2,
        sample_every=100,
        sample_prompts=[],
        system_metrics=False,
    )
    first = run_train(cfg)
    assert first["steps"] == 2 and first["checkpoint"].startswith("ckpts/runs/sd1-s3")
    pipe = StableDiffusionPipeline.from_pretrained(first["export"], local_files_only=True)
    source = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    reference = source.unet.state_dict()
    trained = pipe.unet.state_dict()
    assert trained.keys() == reference.keys()
    assert all(trained[k].shape == reference[k].shape for k in reference)
    assert any(not torch.equal(trained[k], reference[k]) for k in reference)  # weights moved

    second = run_train(cfg.model_copy(update={"max_steps": 4}))
    assert second["steps"] == 4
    configure(work.root)
    client = mlflow.MlflowClient()
    assert [m.value for m in client.get_metric_history(second["run_id"], "resumed_from_step")] == [2.0]
    params = client.get_run(first["run_id"]).data.params
    assert params["trainable_params"] == params["total_params"] != "0"
    assert params["prediction_type"] == "epsilon"
    assert math.isfinite(second["final_loss"])

    # LoRA under DDP (2 workers): only the adapter's gradients sync, and the replicas end equal.
    lora = run_train(cfg.model_copy(update={"run_name": "sd1-lora", "lora": LoraConfig(rank=4)}))
    assert lora["exported_weights"] == "ema_lora"
    assert len(lora["replicas"]) == 2
    assert lora["replicas"][0]["sha256"] == lora["replicas"][1]["sha256"]
    assert (Path(lora["export"]) / "lora" / "pytorch_lora_weights.safetensors").is_file()
    lora_params = client.get_run(lora["run_id"]).data.params
    assert 0 < int(lora_params["trainable_params"]) < int(lora_params["total_params"])
