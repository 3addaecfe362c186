"""Training from Stable Diffusion pipeline folders (tests/sd_fixtures.py): the folder's architecture and
schedule, LoRA (only the adapter trains, checkpoints and resume, export loadable by diffusers).

The whole chain through the CLI (Ray Train, checkpoints on S3 and a resume that continues the step
count, LoRA under DDP) is tests/test_sd_chain.py."""

from __future__ import annotations

import json

import pytest
import torch
from sd_fixtures import LATENT_SIZE, SCALING_FACTOR, sd_folder_for_session

from ldm.config.lora import LoraConfig
from ldm.config.train import TrainConfig
from pipelines.train import LatentsFacts, LocalWorld, LoopInputs, NanGuard, resolve_init, train_loop
from pipelines.train.checkpoint import LORA_DIR, UNET_DIR
from pipelines.train.data import tensor_batches
from pipelines.train.export import export_checkpoint
from pipelines.train.hooks import CheckpointReporter
from pipelines.train.source import load_first_stage


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
