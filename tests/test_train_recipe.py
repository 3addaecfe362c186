"""The pieces of the training recipe, each checked on its own without Ray: learning-rate schedule, EMA,
caption dropout, loss per timestep bucket, bf16 autocast, gradient checkpointing, fine-tuning weights."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.config.train import TrainConfig
from ldm.diffusion import (
    make_noise_scheduler,
    timestep_bucket_names,
    timestep_bucket_sums,
    training_loss_terms,
)
from ldm.errors import DataError
from ldm.unet import UNetConfig
from pipelines.train import (
    LatentsFacts,
    autocast,
    caption_dropout,
    ema_decay_at,
    learning_rate,
    load_init_unet,
    replica_fingerprint,
    update_ema,
)


def test_learning_rate_warms_up_linearly_then_follows_a_half_cosine_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [learning_rate(s, cfg) for s in range(4)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4])
    assert learning_rate(4, cfg) == pytest.approx(1e-3)  # start of the cosine
    # halfway through the decay: floor + (lr - floor) / 2
    assert learning_rate(9, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate(14, cfg) == pytest.approx(1e-4)
    assert learning_rate(100, cfg) == pytest.approx(1e-4)  # past max_steps (a resumed longer run)
    constant = cfg.model_copy(update={"lr_schedule": "constant"})
    assert learning_rate(13, constant) == pytest.approx(1e-3)


def test_ema_warms_up_and_updates_towards_the_weights():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999
    ema, model = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full_like(ema.weight, 0.75 * 1.0 + 0.25 * 3.0))
    assert torch.all(model.weight == 3.0)  # the trained weights are untouched


def test_caption_dropout_rate_and_fresh_draws_per_epoch():
    text = torch.ones(4000, 3, 2)
    empty = torch.zeros(3, 2)

    def dropped(seed: int) -> torch.Tensor:
        out = caption_dropout(text, empty, 0.1, torch.Generator().manual_seed(seed))
        return (out == 0).all(dim=(1, 2))  # rows replaced by the empty prompt

    epoch0, epoch0_again, epoch1 = dropped(0), dropped(0), dropped(1)
    assert 0.08 < epoch0.float().mean().item() < 0.12
    assert torch.equal(epoch0, epoch0_again)
    assert not torch.equal(epoch0, epoch1)
    kept = caption_dropout(text, empty, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept, text)


def test_loss_per_timestep_bucket_sums_and_counts():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    timesteps = torch.tensor([0, 249, 250, 999])
    sums, counts = timestep_bucket_sums(per_sample, timesteps, 4)
    assert sums.tolist() == [3.0, 3.0, 0.0, 4.0]
    assert counts.tolist() == [2.0, 1.0, 0.0, 1.0]
    assert timestep_bucket_names(4) == ["loss_t000-249", "loss_t250-499", "loss_t500-749", "loss_t750-999"]
    with pytest.raises(ValueError):
        timestep_bucket_sums(per_sample, timesteps, 0)


def _loss_and_grads(unet, checkpointing: bool, cfg: TrainConfig):
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.zero_grad()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    with autocast(cfg, torch.device("cpu")):
        terms = training_loss_terms(
            unet, latents, text, make_noise_scheduler(), generator=torch.Generator().manual_seed(2)
        )
    terms.loss.backward()
    return terms, unet.conv_out.weight.grad.clone()


def test_gradient_checkpointing_gives_the_same_gradients_and_bf16_autocast_stays_close():
    from ldm.testing import tiny_components

    fp32 = TrainConfig(mixed_precision="auto")  # auto on CPU: full precision
    plain, plain_grad = _loss_and_grads(tiny_components()["unet"].train(), False, fp32)
    checkpointed, checkpointed_grad = _loss_and_grads(tiny_components()["unet"].train(), True, fp32)
    assert checkpointed.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    torch.testing.assert_close(checkpointed_grad, plain_grad, rtol=1e-5, atol=1e-7)

    bf16, bf16_grad = _loss_and_grads(
        tiny_components()["unet"].train(), False, TrainConfig(mixed_precision="bf16")
    )
    assert bf16.per_sample.dtype == torch.float32  # the error itself is taken in float32
    assert bf16.loss.item() == pytest.approx(plain.loss.item(), rel=0.05)
    assert math.isfinite(bf16_grad.abs().sum().item()) and not torch.equal(bf16_grad, plain_grad)


def test_init_from_a_pipeline_folder_and_a_mismatched_architecture(tmp_path):
    from ldm.testing import tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "model", seed=3)
    matching = UNetConfig(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    facts = LatentsFacts(scaling_factor=1.0, latent_shape=(4, 8, 8), text_embedding_shape=(16, 32))
    weights = load_init_unet(str(folder), TrainConfig(unet=matching), facts)
    from ldm.testing import tiny_components

    reference = tiny_components(seed=3)["unet"]
    assert all(torch.equal(weights[name], value) for name, value in reference.state_dict().items())
    assert replica_fingerprint(reference) != replica_fingerprint(tiny_components(seed=4)["unet"])

    wider = matching.model_copy(update={"block_out_channels": (32, 32)})
    with pytest.raises(DataError, match="does not match"):
        load_init_unet(str(folder), TrainConfig(unet=wider), facts)
    with pytest.raises(FileNotFoundError):
        load_init_unet(str(tmp_path / "missing"), TrainConfig(unet=matching), facts)


def test_batch_must_split_over_workers_and_accumulation_steps():
    cfg = TrainConfig(batch_size=64, num_workers=2, grad_accum_steps=4)
    assert cfg.micro_batch_size == 8
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(batch_size=64, num_workers=2, grad_accum_steps=3)
