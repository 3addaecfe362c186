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
