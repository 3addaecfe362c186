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
    LocalWorld,
    LoopInputs,
    NanGuard,
    absolute_paths,
    autocast,
    caption_dropout,
    ema_decay_at,
    learning_rate,
    replica_fingerprint,
    resolve_init,
    tensor_batches,
    train_loop,
    update_ema,
)
from pipelines.train.checkpoint import read_checkpoint_state
from pipelines.train.hooks import CheckpointReporter, progress_line
from pipelines.train.monitor import TrackingCalls


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
    # The time budget moves the cosine only when lr_horizon asks, and then as far as the further budget.
    assert learning_rate(4, cfg, time_used=0.5) == pytest.approx(1e-3)
    timed = cfg.model_copy(update={"lr_horizon": "steps_or_time"})
    assert learning_rate(4, timed, time_used=0.5) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert learning_rate(4, timed, time_used=2.0) == pytest.approx(1e-4)
    assert learning_rate(9, timed, time_used=0.1) == pytest.approx(1e-4 + 0.5 * 9e-4)  # steps further
    assert learning_rate(1, timed, time_used=0.9) == pytest.approx(4e-4)  # warm-up counts steps only


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


def test_init_from_a_pipeline_folder_takes_its_architecture_and_checks_the_data_shapes(tmp_path):
    from ldm.testing import tiny_components, tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "model", seed=3)
    facts = LatentsFacts(scaling_factor=1.0, latent_shape=(4, 8, 8), text_embedding_shape=(16, 32))
    # The folder's U-Net config is the architecture: a `unet` section that differs is not used.
    other = UNetConfig()  # the demo default: (64, 128, 128)
    init = resolve_init(TrainConfig(unet=other, init_from=str(folder)), facts, tmp_path / "dl")
    reference = tiny_components(seed=3)["unet"]
    assert init.unet_config is not None and init.weights is not None
    assert init.unet_config["block_out_channels"] == list(reference.config.block_out_channels)
    assert all(torch.equal(init.weights[name], value) for name, value in reference.state_dict().items())
    assert init.schedule.prediction_type == "epsilon"
    assert init.counts.trainable == init.counts.total == sum(p.numel() for p in reference.parameters())
    assert replica_fingerprint(reference) != replica_fingerprint(tiny_components(seed=4)["unet"])

    wider_text = LatentsFacts(scaling_factor=1.0, latent_shape=(4, 8, 8), text_embedding_shape=(16, 64))
    with pytest.raises(DataError, match="cross-attends to 32-wide"):
        resolve_init(TrainConfig(init_from=str(folder)), wider_text, tmp_path / "dl")
    with pytest.raises(DataError, match="no such model"):
        resolve_init(TrainConfig(init_from=str(tmp_path / "missing")), facts, tmp_path / "dl")

    # zero_terminal_snr on an epsilon folder is refused; with v_prediction stated it is the new schedule
    zero_snr = TrainConfig(init_from=str(folder), zero_terminal_snr=True)
    with pytest.raises(DataError, match="needs prediction_type v_prediction"):
        resolve_init(zero_snr, facts, tmp_path / "dl")
    stated = zero_snr.model_copy(update={"prediction_type": "v_prediction"})
    schedule = resolve_init(stated, facts, tmp_path / "dl").schedule
    assert schedule.zero_terminal_snr and schedule.prediction_type == "v_prediction"
    assert schedule.beta_end == init.schedule.beta_end  # the folder's betas, rescaled by the scheduler


def test_batch_must_split_over_workers_and_accumulation_steps():
    cfg = TrainConfig(batch_size=64, num_workers=2, grad_accum_steps=4)
    assert cfg.micro_batch_size == 8
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(batch_size=64, num_workers=2, grad_accum_steps=3)


def _tiny_loop_inputs(**update) -> tuple[LoopInputs, object]:
    cfg = TrainConfig(
        unet=UNetConfig(
            block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        ),
        **{
            "num_workers": 1,
            "batch_size": 4,
            "max_steps": 4,
            "max_minutes": None,
            "warmup_steps": 1,
            **update,
        },
    )
    facts = LatentsFacts(scaling_factor=1.0, latent_shape=(4, 8, 8), text_embedding_shape=(16, 32))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(12, 4, 8, 8, generator=generator)
    text = torch.randn(12, 16, 32, generator=generator)
    return LoopInputs(cfg, facts), tensor_batches(latents, text, cfg, torch.zeros(16, 32))


def test_the_loop_runs_in_one_process_checkpoints_and_resumes_where_it_stopped(tmp_path):
    inputs, batches = _tiny_loop_inputs(checkpoint_every=2, ema_decay=0.9)
    world = LocalWorld(checkpoint_dir=tmp_path / "ckpt")
    state = train_loop(inputs, batches, world, [NanGuard(), CheckpointReporter()])
    assert state.step == 4 and state.epoch == 1  # 12 rows, 4 a batch: 3 steps an epoch
    assert [report["step"] for report in world.reports] == [2, 4]
    assert all(math.isfinite(report["loss"]) for report in world.reports)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_000001", "checkpoint_000002"]
    assert state.window.steps == 4  # nothing reset it: no logging hook ran

    # A longer run in the same world resumes from step 4 on a fresh epoch, with the saved weights.
    longer = LoopInputs(inputs.cfg.model_copy(update={"max_steps": 6}), inputs.facts)
    resumed = train_loop(longer, batches, world, [NanGuard(), CheckpointReporter()])
    assert resumed.resumed_from == 4 and resumed.step == 6 and resumed.epoch == 2
    assert world.reports[-1]["step"] == 6


@pytest.mark.parametrize(("horizon", "final_lr"), [("steps", 1e-3), ("steps_or_time", 1e-4)])
def test_a_run_the_time_budget_stops_ends_on_the_decayed_rate_only_with_the_time_horizon(
    horizon, final_lr, tmp_path
):
    # A budget far below one step: the first step is the last. With lr_horizon "steps" it trained at
    # the top of the cosine (99 of 100 steps were left); with "steps_or_time" at the floor.
    inputs, batches = _tiny_loop_inputs(
        max_steps=100, max_minutes=1e-6, warmup_steps=0, lr=1e-3, min_lr_ratio=0.1, lr_horizon=horizon
    )
    world = LocalWorld(checkpoint_dir=tmp_path / "ckpt")
    state = train_loop(inputs, batches, world, [NanGuard(), CheckpointReporter()])
    assert state.step == 1
    assert state.lr == pytest.approx(final_lr)
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(final_lr)
    # The final checkpoint records the rate the step took, not one recomputed from the step alone.
    (folder,) = (tmp_path / "ckpt").iterdir()
    assert read_checkpoint_state(folder)["lr"] == pytest.approx(final_lr)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_the_loop_draws_its_timesteps_as_the_config_says(sampling, tmp_path):
    # Mean 4, std 0.5: every t above 750, so every sample lands in the last of the 4 loss buckets.
    inputs, batches = _tiny_loop_inputs(
        max_steps=6, timestep_sampling=sampling, timestep_logit_mean=4.0, timestep_logit_std=0.5
    )
    state = train_loop(inputs, batches, LocalWorld(checkpoint_dir=tmp_path / "ckpt"), [NanGuard()])
    samples = state.window.bucket_samples
    assert samples.sum().item() == 6 * 4
    if sampling == "logit_normal":
        assert samples.tolist() == [0, 0, 0, 24]
    else:
        assert samples[:3].sum().item() > 0


def test_the_nan_guard_names_the_step_before_the_weights_change():
    inputs, _ = _tiny_loop_inputs()
    bad = tensor_batches(
        torch.full((4, 4, 8, 8), math.nan), torch.zeros(4, 16, 32), inputs.cfg, torch.zeros(16, 32)
    )
    with pytest.raises(FloatingPointError, match="non-finite training at step 1"):
        train_loop(inputs, bad, LocalWorld(), [NanGuard()])


def test_progress_line_and_relative_paths_made_absolute(tmp_path, monkeypatch):
    line = progress_line(
        10, 20, {"loss": 0.12345, "samples_per_second": 12.34, "data_wait_fraction": 0.04}, 62.4
    )
    assert line == "train: step 10/20  loss 0.1235  12.3 samples/s  data wait 4%  ETA 0:01:02"
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig(workdir="./wd", data="d", init_from="models:/ldm@champion"))
    assert cfg.workdir == str(tmp_path / "wd") and cfg.data == str(tmp_path / "d")
    assert cfg.init_from == "models:/ldm@champion"
    assert absolute_paths(TrainConfig(data="s3://bucket/data")).data == "s3://bucket/data"


def test_tracking_calls_retry_count_and_show_failures(capsys):
    calls = TrackingCalls("test", tries=3, backoff_seconds=0.0)
    attempts = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("down")
        return "ok"

    assert calls.call("flaky", flaky) == "ok" and calls.failures == 0
    assert calls.call("broken", lambda: 1 / 0) is None
    assert calls.call("flaky again", flaky) == "ok"  # one failure never ends the record
    assert calls.failures == 1
    assert "MLflow broken failed after 3 tries (ZeroDivisionError" in capsys.readouterr().err


def test_a_positional_unet_trains_checkpoints_exports_and_loads_back_as_itself(tmp_path):
    from ldm.pipeline import generate, load_pipeline
    from ldm.positional_unet import PositionalUNet2DConditionModel, sincos_2d
    from ldm.testing import tiny_components
    from pipelines.train.checkpoint import exported_weights_dir
    from pipelines.train.export import export_checkpoint

    inputs, batches = _tiny_loop_inputs(checkpoint_every=2, ema_decay=0.9)
    unet_cfg = inputs.cfg.unet.model_copy(update={"position_embedding": True})
    inputs = LoopInputs(inputs.cfg.model_copy(update={"unet": unet_cfg}), inputs.facts)
    world = LocalWorld(checkpoint_dir=tmp_path / "ckpt")
    assert train_loop(inputs, batches, world, [NanGuard(), CheckpointReporter()]).step == 4

    folder = max((tmp_path / "ckpt").iterdir())
    first_stage = {k: v for k, v in tiny_components().items() if k != "unet"}
    init = resolve_init(inputs.cfg, inputs.facts, tmp_path / "download")
    assert init.counts.total > 0
    name, _ = export_checkpoint(folder, first_stage, inputs.cfg, tmp_path / "export", init)
    assert name == exported_weights_dir(folder).name == "ema_unet"
    index = (tmp_path / "export" / "model_index.json").read_text()
    assert '"ldm.positional_unet"' in index and '"PositionalUNet2DConditionModel"' in index

    pipe = load_pipeline(str(tmp_path / "export")).pipe
    assert type(pipe.unet) is PositionalUNet2DConditionModel
    # The embedding was trained (it left its sine-cosine start) and the exported one is the EMA's.
    position = pipe.unet.conv_in.position.detach()
    assert not torch.allclose(position, sincos_2d(16, 8))
    image = generate(pipe, "a red circle", num_inference_steps=2, seed=0).images[0]
    assert image.size == (32, 32)


def test_a_zero_terminal_snr_run_exports_a_pipeline_whose_samplers_start_from_pure_noise(tmp_path):
    from ldm.pipeline import load_pipeline, make_scheduler
    from ldm.testing import tiny_components
    from pipelines.train.export import export_checkpoint

    inputs, batches = _tiny_loop_inputs(
        checkpoint_every=2, prediction_type="v_prediction", zero_terminal_snr=True
    )
    world = LocalWorld(checkpoint_dir=tmp_path / "ckpt")
    state = train_loop(inputs, batches, world, [NanGuard(), CheckpointReporter()])
    assert state.schedule.zero_terminal_snr and math.isfinite(state.loss)

    init = resolve_init(inputs.cfg, inputs.facts, tmp_path / "download")
    assert init.schedule == inputs.noise_schedule
    first_stage = {k: v for k, v in tiny_components().items() if k != "unet"}
    export_checkpoint(max((tmp_path / "ckpt").iterdir()), first_stage, inputs.cfg, tmp_path / "export", init)
    pipe = load_pipeline(str(tmp_path / "export")).pipe
    assert (
        pipe.scheduler.config.rescale_betas_zero_snr
        and pipe.scheduler.config.prediction_type == "v_prediction"
    )
    for name in ("ddim", "dpmpp", "euler"):
        sampler = make_scheduler(pipe, name)
        sampler.set_timesteps(4)
        assert int(sampler.timesteps[0]) == 999, name  # "trailing": the first step is the pure-noise one
        pipe.scheduler = sampler
        generator = torch.Generator().manual_seed(0)
        latents = pipe(
            "a red circle", num_inference_steps=4, output_type="latent", generator=generator
        ).images
        assert torch.isfinite(latents).all() and latents.abs().max() < 1e3, name


class _ImageRecorder:
    """Stands in for rank 0's MLflow run (``WorkerTracking``): keeps the images the hook logs."""

    def __init__(self):
        self.calls = TrackingCalls("test")
        self.images: list[tuple[int, str]] = []

    def log_image(self, step: int, image, key: str) -> None:
        self.images.append((step, key))


def test_the_sample_grid_samples_with_the_runs_zero_terminal_snr_schedule(tmp_path):
    """The grid's sampler is built from the run's schedule (``LoopState.schedule``), not SD's default
    betas: for a zero-SNR v-prediction run it starts at t = 999 on rescaled betas."""
    from ldm.testing import tiny_components
    from pipelines.train.hooks import SampleGrids

    inputs, batches = _tiny_loop_inputs(
        prediction_type="v_prediction",
        zero_terminal_snr=True,
        sample_prompts=["a red circle"],
        sample_steps=3,
    )
    state = train_loop(inputs, batches, LocalWorld(checkpoint_dir=tmp_path / "ckpt"), [NanGuard()])
    assert state.stop  # the last step draws a grid whatever sample_every says

    used = []

    class Grids(SampleGrids):
        def grid(self, cfg, unet, scheduler, device):
            image = super().grid(cfg, unet, scheduler, device)
            used.append(scheduler)
            return image

    recorder = _ImageRecorder()
    hook = Grids(recorder, scaling_factor=1.0)  # type: ignore[arg-type]
    hook.parts = {k: v for k, v in tiny_components().items() if k != "unet"}  # instead of the run's files
    hook.on_step_end(state)
    assert recorder.calls.failures == 0 and recorder.images == [(state.step, "samples")]
    (scheduler,) = used
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "v_prediction"
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6  # pure noise at the last training step
    assert int(scheduler.timesteps[0]) == 999  # the pipeline set "trailing" timesteps on it
