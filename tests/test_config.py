"""Every job config round-trips through YAML, rejects unknown keys, and takes CLI-style overrides."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ldm.config.base import ConfigBase, dump_config, load_config, parse_override

CONFIG_CLASSES = [
    ("ldm.config.synth", "SynthConfig"),
    ("ldm.config.bootstrap", "BootstrapConfig"),
    ("ldm.config.ingest", "IngestConfig"),
    ("ldm.config.train", "TrainConfig"),
    ("ldm.config.eval", "EvalConfig"),
    ("ldm.config.serve", "ServeConfig"),
    ("ldm.config.demo", "DemoConfig"),
]


def _cls(module: str, name: str) -> type[ConfigBase]:
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("module", "name"), CONFIG_CLASSES)
def test_round_trip_through_yaml(tmp_path, module, name):
    cls = _cls(module, name)
    default = cls()
    path = dump_config(default, tmp_path / "c.yaml")
    loaded = load_config(cls, path)
    assert loaded == default
    assert yaml.safe_load(path.read_text())["workdir"] == "./ldm-demo"


@pytest.mark.parametrize(("module", "name"), CONFIG_CLASSES)
def test_unknown_key_is_an_error(tmp_path, module, name):
    cls = _cls(module, name)
    path = tmp_path / "c.yaml"
    path.write_text("workdir: x\nno_such_setting: 1\n")
    with pytest.raises(ValidationError, match="no_such_setting"):
        load_config(cls, path)


def test_layers_apply_in_order(tmp_path):
    from ldm.config.eval import EvalConfig

    path = tmp_path / "eval.yaml"
    path.write_text("num_prompts: 12\nseed: 3\n")
    cfg = load_config(EvalConfig, path, overrides={"seed": 5, "model": None}, sets=["guidance_scale=2.5"])
    assert (cfg.num_prompts, cfg.seed, cfg.guidance_scale) == (12, 5, 2.5)
    assert cfg.model == EvalConfig().model  # a None override (flag not given) keeps the lower layer


def test_nested_override_and_frozen():
    from ldm.config.demo import DemoConfig

    cfg = load_config(DemoConfig, sets=["eval.num_prompts=6", "workdir=/tmp/elsewhere"])
    assert cfg.eval.num_prompts == 6
    moved = cfg.with_workdir()
    assert {moved.synth.workdir, moved.train.workdir, moved.serve.workdir} == {"/tmp/elsewhere"}
    with pytest.raises(ValidationError):
        cfg.seed = 1  # type: ignore[misc]


def test_a_partial_section_keeps_the_jobs_own_section_defaults(tmp_path):
    """`DemoConfig.train` is not `TrainConfig()`: setting one key of it must keep the rest of the demo's."""
    from ldm.config.demo import DemoConfig
    from ldm.config.train import TrainConfig

    demo = DemoConfig()
    assert demo.train.unet != TrainConfig().unet and demo.train.lr != TrainConfig().lr  # the premise
    path = tmp_path / "demo.yaml"
    path.write_text("train:\n  max_minutes: 7.5\neval:\n  guidance_scale: 7\n")
    sets = ["train.max_steps=1234", "train.unet.layers_per_block=2", "serve.max_replicas=3"]
    cfg = load_config(DemoConfig, path, sets=sets)
    assert (cfg.train.max_steps, cfg.train.max_minutes, cfg.eval.guidance_scale) == (1234, 7.5, 7)
    assert cfg.train.unet.layers_per_block == 2
    assert cfg.train.unet.block_out_channels == demo.train.unet.block_out_channels  # a deeper section too
    assert cfg.train == demo.train.model_copy(
        update={"max_steps": 1234, "max_minutes": 7.5, "unet": cfg.train.unet}
    )
    assert (cfg.eval.num_prompts, cfg.eval.num_seen_prompts) == (
        demo.eval.num_prompts,
        demo.eval.num_seen_prompts,
    )
    assert (cfg.serve.model, cfg.serve.port) == (demo.serve.model, demo.serve.port)


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("x=true") == ("x", True)
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("novalue")


def test_ingest_score_section_is_deprecated_and_ignored():
    from ldm.config.ingest import IngestConfig

    with pytest.warns(FutureWarning, match=r"`score:` is ignored .* `encode:`"):
        cfg = IngestConfig.model_validate({"score": {"batch_size": 512, "num_gpus": 0.25}})
    assert cfg.encode.batch_size == 64 and cfg.encode.num_gpus == 0.0  # encode: is untouched
    for name in ("production-ingest", "sd15-ingest"):  # shipped configs no longer carry it
        shipped = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
        assert "score" not in yaml.safe_load(shipped.read_text()), name


def test_quality_profile_loads_as_the_demo_with_its_own_budget():
    """configs/quality.yaml is `ldm demo --config`'s file: its partial sections merge onto the demo's."""
    from ldm.config.demo import DemoConfig
    from pipelines.demo import fit_training_to_budget

    cfg = load_config(DemoConfig, Path(__file__).resolve().parents[1] / "configs" / "quality.yaml")
    demo = DemoConfig()
    assert cfg.synth.num_pairs > demo.synth.num_pairs and cfg.bootstrap.clip.steps > demo.bootstrap.clip.steps
    # Keys the file does not name keep the demo's values (its CLIP's width, its eval sampler); the CLIP's
    # patches and context are the demo's, pinned in the file because the profile was measured with them
    # (turn 19), so that a change of the demo's defaults does not silently change the profile.
    assert cfg.bootstrap.clip.text_width == demo.bootstrap.clip.text_width
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "quality.yaml").read_text())
    assert (raw["bootstrap"]["clip"]["patch_size"], raw["bootstrap"]["clip"]["context_length"]) == (16, 16)
    assert (demo.bootstrap.clip.patch_size, demo.bootstrap.clip.context_length) == (16, 16)
    assert cfg.eval.guidance_scale == demo.eval.guidance_scale and cfg.eval.num_prompts >= 96
    assert cfg.train.unet == demo.train.unet and cfg.train.snr_gamma == 5.0
    # Both read the CLIP's embeddings only; the profile pins it in its file (turn 16 measured it so), so
    # a change of the demo's default does not silently change the profile.
    assert raw["bootstrap"]["text_encoder_layers"] == 0
    # Measured with the MSE-only autoencoder: the demo's edge term is pinned off until it is measured.
    assert (
        cfg.bootstrap.autoencoder.edge_loss_weight == 0.0
        and demo.bootstrap.autoencoder.edge_loss_weight == 1.0
    )
    assert cfg.bootstrap.text_encoder_layers == 0 and demo.bootstrap.text_encoder_layers == 0
    # The profile's CLIP trains its own 2,500 steps, not the demo's 800 (the section is merged).
    assert cfg.bootstrap.clip.steps == 2500 and demo.bootstrap.clip.steps == 800
    # Both oversample the absolute-position captions (the profile by the merge: it names no rule).
    assert (
        cfg.train.caption_repeats == demo.train.caption_repeats and demo.train.caption_repeats[0].repeats > 1
    )
    # After ~30 minutes of synth, bootstrap and ingest, the U-Net gets the rest of the 90-minute budget.
    train = fit_training_to_budget(cfg.train, cfg, elapsed_s=30 * 60)
    assert train.max_minutes == pytest.approx(cfg.budget_minutes - 30 - cfg.after_train_minutes)
    assert 30 + train.max_minutes + cfg.after_train_minutes <= 90
    # The budget decides, not the caps: they are above what it would leave the U-Net even if synth,
    # bootstrap and ingest took only 10 minutes (they took 11 in turn 19).
    assert cfg.train.max_minutes > cfg.budget_minutes - 10 - cfg.after_train_minutes
    assert cfg.train.max_steps > 5 * 60 * cfg.train.max_minutes  # ~5 steps/s on 2 cores (turn 19)
