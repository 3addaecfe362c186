"""Typed configs: defaults in code, a YAML file on top, then command-line overrides (one config per job).

Every job (synth, bootstrap, ingest, train, eval, serve, retrain, demo) has one frozen pydantic
model. `load_config` builds it from the three layers; `dump_config` writes it back as YAML for the
run's log, MLflow and checkpoints. Unknown keys raise: a typo in a YAML file is an error, not a
silently ignored setting. No import paths in YAML.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict

C = TypeVar("C", bound="ConfigBase")


class ConfigBase(BaseModel):
    """Base of every config: frozen, no unknown keys, JSON/YAML round-trippable."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> scalar values, the shape MLflow params want."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, list) else value

        walk("", self.to_dict())
        return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=VALUE`` -> ("a.b", parsed VALUE); the value is read as YAML (so 3, 0.5, true, [1,2] work)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw != "" else ""


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> C:
    """Defaults of ``cls`` <- YAML file at ``path`` <- ``overrides`` (dotted keys) <- ``sets`` ("k=v").

    ``overrides`` whose value is None are skipped, so CLI flags left unset do not clobber the file.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must hold a mapping, got {type(loaded).__name__}")
        tree = loaded
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    for item in sets or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return cls.model_validate(_onto_section_defaults(cls, tree))


def _onto_section_defaults(cls: type[ConfigBase], tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with each nested section merged onto the values its field's default sets.

    A job config may give a section a default of its own: `DemoConfig.train` is a small U-Net at lr
    2e-3, not `TrainConfig()`. Pydantic builds a section that the tree mentions from the section's
    *class* defaults, so without this merge ``--set train.max_steps=3000`` (or a YAML file with a
    partial ``train:``) would silently drop every value the job's default sets and train the default
    U-Net. Only the values the default instance sets explicitly are merged (``exclude_unset``); keys
    in ``tree`` win, and sections nested deeper get the same treatment.
    """
    merged = dict(tree)
    for name, field in cls.model_fields.items():
        given = tree.get(name)
        section = field.annotation
        if not isinstance(given, dict) or not (isinstance(section, type) and issubclass(section, ConfigBase)):
            continue
        default = field.get_default(call_default_factory=True)
        base = default.model_dump(mode="json", exclude_unset=True) if isinstance(default, section) else {}
        merged[name] = _deep_merge(base, _onto_section_defaults(section, given))
    return merged


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        out[key] = _deep_merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return out


def dump_config(config: ConfigBase, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_yaml())
    return path
