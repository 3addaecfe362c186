"""SD pipeline folders (SD 1.x and SD 2.x structure) in and out: architecture, schedule, export."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import s3_fixtures
import torch
from sd_fixtures import SD1_SCHEDULER, SD2_SCHEDULER, sd_folder_for_session

from ldm import storage
from ldm.diffusion import SCHEDULE_SD_SCALED_LINEAR, training_target
from ldm.sd_format import (
    NoiseSchedule,
    check_data_shapes,
    export_sd_pipeline,
    load_unet,
    read_sd_folder,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPECTED_PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction"}
EXPECTED_SCHEDULER = {"sd1": "PNDMScheduler", "sd2": "DDIMScheduler"}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd_folder(request, tmp_path_factory):
    return request.param, sd_folder_for_session(tmp_path_factory, request.param)


def test_fixture_loads_with_diffusers(sd_folder):
    from diffusers import StableDiffusionPipeline

    kind, folder = sd_folder
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == EXPECTED_SCHEDULER[kind]
    assert pipe.scheduler.config.prediction_type == EXPECTED_PREDICTION[kind]
    assert pipe.unet.config.use_linear_projection is (kind == "sd2")
    assert pipe.unet.config.attention_head_dim == (4 if kind == "sd1" else [2, 4])
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_read_folder_gives_architecture_and_schedule(sd_folder):
    kind, folder = sd_folder
    source = read_sd_folder(folder)
    on_disk = json.loads((folder / "unet" / "config.json").read_text())
    assert source.unet_config == on_disk
    assert source.scheduler_class == EXPECTED_SCHEDULER[kind]
    assert source.schedule.prediction_type == EXPECTED_PREDICTION[kind]
    assert (source.schedule.beta_start, source.schedule.beta_end) == (0.00085, 0.012)
    assert source.schedule.beta_schedule == "scaled_linear"


def test_load_unet_preserves_architecture_key_for_key(sd_folder):
    _, folder = sd_folder
    source = read_sd_folder(folder)
    unet = load_unet(source)
    for key, value in source.architecture.items():
        loaded = unet.config[key]
        assert (list(loaded) if isinstance(loaded, tuple) else loaded) == (
            list(value) if isinstance(value, tuple) else value
        ), key


def test_from_scratch_keeps_config_and_reinitialises(sd_folder):
    _, folder = sd_folder
    source = read_sd_folder(folder)
    pretrained = load_unet(source).state_dict()
    scratch = load_unet(source, from_scratch=True, seed=1)
    again = load_unet(source, from_scratch=True, seed=1)
    public = lambda unet: {k: v for k, v in unet.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(scratch) == public(load_unet(source))
    assert scratch.state_dict().keys() == pretrained.keys()
    weight = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert not torch.equal(scratch.state_dict()[weight], pretrained[weight])
    assert torch.equal(scratch.state_dict()[weight], again.state_dict()[weight])  # seeded


def test_schedule_builds_the_training_scheduler(sd_folder):
    from diffusers import DDPMScheduler

    kind, folder = sd_folder
    schedule = read_sd_folder(folder).schedule
    scheduler = schedule.make_scheduler()
    reference = DDPMScheduler.from_config(SD1_SCHEDULER if kind == "sd1" else SD2_SCHEDULER)
    assert torch.equal(scheduler.betas, reference.betas)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    target = training_target(scheduler, latents, noise, timesteps, schedule.prediction_type)
    assert torch.equal(target, noise) is (kind == "sd1")  # v-prediction's target is not the noise


def test_default_schedule_is_the_house_schedule():
    config = NoiseSchedule().scheduler_config()
    assert {key: config[key] for key in SCHEDULE_SD_SCALED_LINEAR} == SCHEDULE_SD_SCALED_LINEAR


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prediction_type": "sample"}, "unknown prediction_type"),
        ({"beta_schedule": "sigmoid"}, "unknown beta_schedule"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "zero_terminal_snr needs prediction_type v_prediction"),
    ],
)
def test_unsupported_schedules_raise(change, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_scheduler_config({**SD1_SCHEDULER, **change})


def test_check_data_shapes(sd_folder):
    _, folder = sd_folder
    config = read_sd_folder(folder).unet_config
    check_data_shapes(config, (4, 8, 8), 32)
    with pytest.raises(ValueError, match="4-channel latents"):
        check_data_shapes(config, (8, 8, 8), 32)
    with pytest.raises(ValueError, match="32-wide text embeddings"):
        check_data_shapes(config, (4, 8, 8), 64)
    with pytest.raises(ValueError, match="not divisible"):
        check_data_shapes(config, (4, 9, 8), 32)


def test_not_a_pipeline_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Stable Diffusion pipeline folder"):
        read_sd_folder(tmp_path)


def test_a_pipeline_with_our_positional_unet_is_a_folder_to_fine_tune_from(tmp_path):
    """A model this project trained with ``unet.position_embedding`` (the champion that scheduled
    retraining starts from) reads and loads as itself; a U-Net of another class is refused."""
    from ldm.pipeline import assemble_pipeline, save_pipeline
    from ldm.positional_unet import PositionalUNet2DConditionModel
    from ldm.testing import tiny_components
    from ldm.unet import UNetConfig, build_unet

    parts = tiny_components()
    cfg = UNetConfig(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        position_embedding=True,
    )
    parts["unet"] = build_unet(cfg, sample_size=8, in_channels=4, cross_attention_dim=32)
    folder = save_pipeline(assemble_pipeline(**parts), tmp_path / "champion")
    source = read_sd_folder(folder)
    assert source.unet_config["_class_name"] == "PositionalUNet2DConditionModel"
    loaded = load_unet(source)
    assert type(loaded) is PositionalUNet2DConditionModel
    assert torch.equal(loaded.conv_in.position, parts["unet"].conv_in.position)
    assert type(load_unet(source, from_scratch=True)) is PositionalUNet2DConditionModel

    config = folder / "unet" / "config.json"
    config.write_text(config.read_text().replace("PositionalUNet2DConditionModel", "UNet3DConditionModel"))
    with pytest.raises(ValueError, match="UNet3DConditionModel"):
        read_sd_folder(folder)


def test_export_keeps_scheduler_and_carries_the_trained_unet(sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    kind, folder = sd_folder
    source = read_sd_folder(folder)
    unet = load_unet(source)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.01)  # "trained"
    out = export_sd_pipeline(source, unet, tmp_path / "export")
    assert not list((tmp_path / "export").rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == EXPECTED_SCHEDULER[kind]
    assert pipe.scheduler.config.prediction_type == EXPECTED_PREDICTION[kind]
    trained = unet.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in pipe.unet.state_dict().items())
    source_vae = json.loads((folder / "vae" / "config.json").read_text())
    assert pipe.vae.config.scaling_factor == source_vae["scaling_factor"]
    images = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_export_with_another_prediction_type(sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    kind, folder = sd_folder
    source = read_sd_folder(folder)
    schedule = NoiseSchedule(prediction_type="epsilon" if kind == "sd2" else "v_prediction")
    out = export_sd_pipeline(source, load_unet(source), tmp_path / "export", schedule=schedule)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == EXPECTED_SCHEDULER[kind]
    assert pipe.scheduler.config.prediction_type == schedule.prediction_type


def test_a_zero_terminal_snr_schedule_ends_in_pure_noise_and_survives_the_export(sd_folder, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from ldm.diffusion import signal_to_noise_ratio

    last = torch.tensor([999])
    sd_snr = signal_to_noise_ratio(NoiseSchedule().make_scheduler(), last).item()
    assert 4e-3 < sd_snr < 6e-3  # SD's schedule leaves sqrt(alpha_bar) ~ 0.069 of the image at t = T
    schedule = NoiseSchedule(prediction_type="v_prediction", zero_terminal_snr=True)
    scheduler = schedule.make_scheduler()
    assert isinstance(scheduler, DDPMScheduler) and scheduler.alphas_cumprod[-1] == 0
    assert signal_to_noise_ratio(scheduler, last).item() == 0
    assert NoiseSchedule.from_scheduler_config(schedule.scheduler_config()) == schedule
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        NoiseSchedule(zero_terminal_snr=True)

    # SD 1.x's PNDMScheduler cannot rescale its betas: the export switches to DDIM rather than drop it.
    kind, folder = sd_folder
    source = read_sd_folder(folder)
    out = export_sd_pipeline(source, load_unet(source), tmp_path / "export", schedule=schedule)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.rescale_betas_zero_snr is True
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.clip_sample is False  # DDIM's default would clip latents to [-1, 1]
    assert read_sd_folder(out).schedule == schedule


def test_unet_config_can_state_an_sd2_architecture():
    from ldm.unet import UNetConfig, build_unet

    cfg = UNetConfig(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    )
    unet = build_unet(cfg, sample_size=8, in_channels=4, cross_attention_dim=32)
    assert list(unet.config.attention_head_dim) == [2, 4] and unet.config.use_linear_projection
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    with pytest.raises(ValueError, match="attention_head_dim has 3 entries for 2 blocks"):
        UNetConfig(**{**cfg.model_dump(), "attention_head_dim": (2, 4, 4)})


# --- s3:// folders (the moto server of tests/s3_fixtures.py) ------------------------------------------
s3_endpoint = s3_fixtures.s3_endpoint


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    import boto3

    s3_fixtures.use_s3(monkeypatch, s3_endpoint, tmp_path / "cache")
    name = f"sd-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_s3_folder_in_and_out(sd_folder, bucket, tmp_path):
    from ldm.pipeline import generate, load_pipeline

    kind, folder = sd_folder
    uri = storage.upload_folder(folder, f"s3://{bucket}/models/{kind}")
    source = read_sd_folder(uri)
    assert source.local != folder and source.local.is_relative_to(tmp_path / "cache")
    assert source.schedule.prediction_type == EXPECTED_PREDICTION[kind]
    assert source.architecture == read_sd_folder(folder).architecture
    assert read_sd_folder(uri).local == source.local  # unchanged objects: the cached copy

    out = export_sd_pipeline(source, load_unet(source), f"s3://{bucket}/exports/{kind}")
    loaded = load_pipeline(out)
    assert type(loaded.pipe.scheduler).__name__ == EXPECTED_SCHEDULER[kind]
    assert loaded.name == kind
    assert generate(loaded.pipe, "a red circle", num_inference_steps=2, seed=0).images[0].size == (32, 32)


def test_materialize_refetches_a_rewritten_folder(bucket, tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text('{"version": 1}')
    uri = storage.upload_folder(tmp_path / "v1", f"s3://{bucket}/model")
    first = storage.materialize(uri)
    assert json.loads((first / "config.json").read_text()) == {"version": 1}
    assert storage.materialize(uri) == first

    (tmp_path / "v1" / "config.json").write_text('{"version": 2}')  # re-exported under the same prefix
    storage.upload_folder(tmp_path / "v1", uri)
    second = storage.materialize(uri)
    assert second != first and json.loads((second / "config.json").read_text()) == {"version": 2}

    single = storage.materialize(f"{uri}/config.json")  # one object: a folder holding that file
    assert json.loads((single / "config.json").read_text()) == {"version": 2}
    with pytest.raises(FileNotFoundError, match="nothing at"):
        storage.materialize(f"s3://{bucket}/no/such/model")


# --- the shipped SD 1.5 configs ----------------------------------------------------------------------
def _sd_config_classes() -> dict[str, type]:
    from ldm.config.eval import EvalConfig
    from ldm.config.ingest import IngestConfig
    from ldm.config.retrain import RetrainConfig
    from ldm.config.serve import ServeConfig
    from ldm.config.train import TrainConfig

    return {
        "ingest": IngestConfig,
        "train-full": TrainConfig,
        "train-lora": TrainConfig,
        "eval": EvalConfig,
        "serve": ServeConfig,
        "retrain": RetrainConfig,
    }


@pytest.mark.parametrize("job", list(_sd_config_classes()))
def test_sd15_configs_validate(job):
    import yaml

    path = CONFIGS / f"sd15-{job}.yaml"
    tree = yaml.safe_load(path.read_text())
    cfg = _sd_config_classes()[job].model_validate(tree)
    assert cfg.workdir == "./ldm-sd15"
    sd_folder_uri = "s3://ldm-data/models/stable-diffusion-v1-5"
    if job == "ingest":
        assert cfg.autoencoder == cfg.text_encoder == sd_folder_uri and cfg.image_size == 512
    if job.startswith("train"):
        assert cfg.init_from == cfg.autoencoder == cfg.text_encoder == sd_folder_uri
        assert cfg.lora.enabled is (job == "train-lora") and cfg.storage_path == "s3://ldm-data/runs"
    if job == "retrain":
        assert cfg.train.lora.enabled and cfg.train.storage_path == "s3://ldm-data/runs"
        assert cfg.ingest.autoencoder == cfg.train.init_from == sd_folder_uri


def test_sd15_lora_config_turns_lora_on():
    import yaml

    from ldm.config.lora import LoraConfig

    tree = yaml.safe_load((CONFIGS / "sd15-train-lora.yaml").read_text())
    assert LoraConfig.model_validate(tree["lora"]).enabled
    assert "lora" not in yaml.safe_load((CONFIGS / "sd15-train-full.yaml").read_text())


# Settings that make a config the SD 1.5 path (leaf names of the YAML tree): the Kubernetes job configs
# must state them as configs/sd15-*.yaml do (their paths, sizes and resources are the cluster's own).
SD_PATH_KEYS = {"autoencoder", "text_encoder", "init_from", "image_size", "clip", "metrics", "storage_path",
                "prediction_type", "rank", "alpha", "metric"}  # fmt: skip
K8S_SD15 = {"ingest": "ingest", "train": "train-full", "eval": "eval", "retrain": "retrain"}


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("job", list(K8S_SD15))
def test_k8s_job_configs_point_at_the_sd15_path(job):
    import yaml

    k8s = _leaves(yaml.safe_load((CONFIGS.parent / "infra" / "k8s" / "configs" / f"{job}.yaml").read_text()))
    shipped = _leaves(yaml.safe_load((CONFIGS / f"sd15-{K8S_SD15[job]}.yaml").read_text()))
    checked = [key for key in shipped if key.rsplit(".", 1)[-1] in SD_PATH_KEYS]
    assert checked
    for key in checked:
        assert k8s.get(key) == shipped[key], (job, key)
