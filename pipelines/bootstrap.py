"""`ldm bootstrap`: train the first-stage models of the offline default on the synthetic source.

The recipe: render training pairs -> train the CLIP scorer (gate: ROC AUC of matched vs mismatched
captions) -> copy its text tower into a CLIPTextModel (check: hidden states agree) -> train the
autoencoder (gate: PSNR) and set its latent scaling factor. Each model goes to its `WorkDir` folder
with a ``metrics.json`` that records the quality figure and a digest of the config that made it; a
later run with the same config reuses the model (the demo re-runs fast, a crash resumes), and a run
whose figure misses its gate raises `BootstrapGateError`.

The whole bootstrap is one MLflow run (experiment ``bootstrap``): its config, each model's gate
figure beside its gate, whether the model was trained or reused, and a grid of held-out renders over
their autoencoder reconstructions. Progress goes to stderr (`ldm.progress`): a bar on a terminal,
plain lines in a log.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.config.base import dump_config
from ldm.config.bootstrap import BootstrapConfig
from ldm.contract import WorkDir
from ldm.errors import GateError, LdmError
from ldm.first_stage import autoencoder as ae
from ldm.first_stage import clip
from ldm.first_stage import text_encoder as te
from ldm.progress import Progress
from ldm.synth.negatives import hard_negatives
from ldm.synth.render import render_batch
from ldm.synth.source import HELDOUT_SEED_OFFSET, mismatched_captions

METRICS_FILE = "metrics.json"
EXPERIMENT = "bootstrap"
GRID_IMAGES = 8  # held-out renders in the reconstruction grid
TEXT_ENCODER_TOLERANCE = 1e-4  # the conversion is exact; anything above this is a mapping bug


class BootstrapGateError(GateError):
    """A first-stage model ended below its quality gate."""


def bootstrap_device(cfg: BootstrapConfig) -> torch.device:
    """The device ``cfg.device`` names ("auto": CUDA when torch sees it); raises when CUDA is named and absent."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LdmError(
            "bootstrap.device is 'cuda' but torch sees no CUDA device (torch.cuda.is_available() is False); "
            "use 'auto' or 'cpu'"
        )
    return torch.device(cfg.device)


def _digest(cfg: BootstrapConfig, section: str) -> str:
    """What a saved model depends on: the data (seed, size) and its own section (not the gates)."""
    config = getattr(cfg, section).to_dict()
    if section == "clip" and not config["hard_negatives"]:
        # keys added after the first release: off, they leave the digest of an earlier CLIP unchanged
        del config["hard_negatives"], config["hard_negative_kinds"]
    if section == "autoencoder" and not config["edge_loss_weight"]:
        del config["edge_loss_weight"]
    keys = {"seed": cfg.seed, "num_train_images": cfg.num_train_images, section: config}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _text_encoder_digest(cfg: BootstrapConfig) -> str:
    """The text encoder is the CLIP's text tower, so it is redone whenever the CLIP is; and whenever
    the layers it keeps change (None, all of them, leaves an earlier digest unchanged)."""
    clip_digest = _digest(cfg, "clip")
    if cfg.text_encoder_layers is None:
        return clip_digest
    keys: dict[str, Any] = {"clip": clip_digest, "text_encoder_layers": cfg.text_encoder_layers}
    if cfg.parse_encoder.layers:  # off, it leaves the digest of an earlier encoder unchanged
        keys |= {"seed": cfg.seed, "parse_encoder": cfg.parse_encoder.to_dict()}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _read_metrics(folder: Path) -> dict[str, Any] | None:
    path = folder / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _reusable(cfg: BootstrapConfig, folder: Path, digest: str) -> dict[str, Any] | None:
    metrics = _read_metrics(folder)
    if cfg.force or metrics is None or metrics.get("digest") != digest:
        return None
    return metrics


def _publish(staging: Path, targets: dict[str, Path]) -> None:
    """Move finished folders from ``staging`` into place, so a crash never leaves a half-written model."""
    for name, target in targets.items():
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / name).rename(target)
    shutil.rmtree(staging, ignore_errors=True)


def _check_gate(model: str, figure: str, value: float, threshold: float, folder: Path, hint: str) -> None:
    if not value >= threshold:  # also catches NaN
        raise BootstrapGateError(
            f"{model}: {figure} = {value:.4f} is below the gate {threshold} (model kept in {folder} with its "
            f"{METRICS_FILE}). {hint}"
        )


def _loss_summary(losses: list[float]) -> dict[str, float]:
    window = max(1, min(10, len(losses) // 4))
    return {"loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:]))}


def _train_clip(cfg: BootstrapConfig, images: np.ndarray, captions: list[str], log) -> tuple[Any, dict]:
    torch.manual_seed(cfg.seed)
    device = bootstrap_device(cfg)
    bundle = clip.bundle_for(clip.build_clip(cfg.clip).to(device), name="bootstrap")
    started = time.perf_counter()
    losses = clip.train_clip(bundle, images, captions, cfg.clip, seed=cfg.seed, log=log)
    seconds = time.perf_counter() - started
    held_images, held_captions, held_scenes = render_batch(
        cfg.clip.eval_pairs, cfg.seed + HELDOUT_SEED_OFFSET
    )
    mismatched = mismatched_captions(held_scenes, cfg.seed)
    auc = clip.matched_vs_mismatched_auc(bundle, held_images, held_captions, mismatched)
    # Not a gate: how well it tells a caption from one a single attribute away (shape, count, position).
    rng = np.random.default_rng(cfg.seed)
    hard = [str(rng.choice(hard_negatives(c))) for c in held_captions]
    hard_auc = clip.matched_vs_mismatched_auc(bundle, held_images, held_captions, hard)
    log(
        f"[clip] held-out ROC AUC {auc:.4f} (gate {cfg.min_clip_auc}), against one-attribute "
        f"negatives {hard_auc:.4f}, trained in {seconds:.0f}s on {device.type}"
    )
    bundle.model.cpu()  # the text-tower conversion and everything after it run on the CPU
    return bundle, {
        "roc_auc": auc,
        "hard_negative_auc": hard_auc,
        "eval_pairs": cfg.clip.eval_pairs,
        "train_seconds": seconds,
        "device": device.type,
        **_loss_summary(losses),
    }


def _train_autoencoder(cfg: BootstrapConfig, images: np.ndarray, log) -> tuple[Any, dict]:
    torch.manual_seed(cfg.seed)
    device = bootstrap_device(cfg)
    vae = ae.build_autoencoder(cfg.autoencoder).to(device)
    started = time.perf_counter()
    losses = ae.train_autoencoder(vae, images, cfg.autoencoder, seed=cfg.seed, log=log)
    seconds = time.perf_counter() - started
    scaling_factor = ae.latent_scaling_factor(vae, images[: cfg.autoencoder.scaling_images])
    vae.register_to_config(scaling_factor=scaling_factor)
    held_images, _, _ = render_batch(cfg.autoencoder.eval_images, cfg.seed + HELDOUT_SEED_OFFSET + 1)
    psnr = ae.reconstruction_psnr(vae, held_images)
    log(
        f"[autoencoder] held-out PSNR {psnr:.2f} dB (gate {cfg.min_psnr_db}), scaling factor "
        f"{scaling_factor:.3f}, trained in {seconds:.0f}s on {device.type}"
    )
    vae.cpu()
    metrics = {
        "psnr_db": psnr,
        "scaling_factor": scaling_factor,
        "eval_images": cfg.autoencoder.eval_images,
        "train_seconds": seconds,
        "device": device.type,
        **_loss_summary(losses),
    }
    return vae, metrics


def _text_encoder(cfg: BootstrapConfig, clip_model: Any) -> tuple[Any, dict]:
    """The CLIP text tower as a transformers CLIPTextModel, checked against open_clip's hidden states."""
    text_model = te.clip_text_tower_to_transformers(clip_model, cfg.text_encoder_layers)
    captions = render_batch(64, cfg.seed + HELDOUT_SEED_OFFSET)[1]
    difference = te.max_hidden_state_difference(clip_model, text_model, captions)
    if difference > TEXT_ENCODER_TOLERANCE:
        raise BootstrapGateError(
            f"text encoder: hidden states differ from open_clip's by {difference:.2e} "
            f"(tolerance {TEXT_ENCODER_TOLERANCE}): the weight mapping is wrong"
        )
    return (te.build_text_tokenizer(clip_model), text_model), {"max_abs_difference": difference}


@dataclass(frozen=True)
class _Stage:
    """One first-stage model: where it lives, what it depends on, how to train and save it."""

    name: str
    targets: dict[str, Path]  # staged subfolder -> final folder; the first one holds metrics.json
    digest: str
    train: Callable[[], tuple[Any, dict[str, Any]]]  # -> (model, metrics)
    save: Callable[[Any, Path], object]  # (model, staging folder)
    retrain: bool = False  # train even when a matching model is on disk


def _reuse_or_train(cfg: BootstrapConfig, stage: _Stage, staging: Path) -> tuple[Any, dict[str, Any]]:
    """(model or None when reused, metrics with ``trained``): the one reuse-or-train step of every model."""
    folder = next(iter(stage.targets.values()))
    metrics = None if stage.retrain else _reusable(cfg, folder, stage.digest)
    if metrics is not None and all(target.is_dir() for target in stage.targets.values()):
        return None, {**metrics, "trained": False}
    model, metrics = stage.train()
    metrics |= {"digest": stage.digest}
    stage_dir = staging / stage.name
    stage.save(model, stage_dir)
    (stage_dir / next(iter(stage.targets)) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    _publish(stage_dir, stage.targets)
    return model, {**metrics, "trained": True}


def _stages(cfg: BootstrapConfig, workdir: WorkDir, training_set, log) -> list[_Stage]:
    clip_digest = _digest(cfg, "clip")
    trained: dict[str, Any] = {}

    def train_clip() -> tuple[Any, dict]:
        images, captions = training_set()
        bundle, metrics = _train_clip(cfg, images, captions, log)
        trained["clip"] = bundle
        return bundle, metrics | {"config": cfg.clip.to_dict()}

    def convert_text_tower() -> tuple[Any, dict]:
        clip_model = (trained.get("clip") or clip.load_clip(str(workdir.clip))).model
        converted = _text_encoder(cfg, clip_model)
        layers = converted[0][1].config.num_hidden_layers
        log(
            f"[text encoder] converted the CLIP text tower, {layers} transformer layers "
            f"(max |difference| {converted[1]['max_abs_difference']:.1e})"
        )
        return _train_parse_layers(cfg, converted, log) if cfg.parse_encoder.layers else converted

    def train_autoencoder() -> tuple[Any, dict]:
        vae, metrics = _train_autoencoder(cfg, training_set()[0], log)
        return vae, metrics | {"config": cfg.autoencoder.to_dict()}

    return [
        _Stage(
            "clip",
            {"clip": workdir.clip},
            clip_digest,
            train_clip,
            lambda bundle, out: clip.save_clip(bundle, out / "clip"),
        ),  # fmt: skip
        _Stage(
            "text_encoder",
            {te.TEXT_ENCODER_DIR: workdir.text_encoder, te.TOKENIZER_DIR: workdir.tokenizer},
            _text_encoder_digest(cfg),
            convert_text_tower,
            lambda pair, out: _save_text_encoder(pair[0], pair[1], out),
        ),
        _Stage(
            "autoencoder",
            {"autoencoder": workdir.autoencoder},
            _digest(cfg, "autoencoder"),
            train_autoencoder,
            lambda vae, out: ae.save_autoencoder(vae, out / "autoencoder"),
        ),  # fmt: skip
    ]


def _train_parse_layers(cfg: BootstrapConfig, converted: tuple[Any, dict], log) -> tuple[Any, dict]:
    """The converted embeddings with ``cfg.parse_encoder`` layers trained on the grammar's parse."""
    from ldm.first_stage import parse_encoder as pe

    (tokenizer, embeddings), metrics = converted
    device = bootstrap_device(cfg)
    model, accuracy = pe.train_parse_encoder(
        embeddings.to(device), tokenizer, cfg.parse_encoder, seed=cfg.seed, log=log
    )
    log(
        f"[parse encoder] {cfg.parse_encoder.layers} layers, held-out captions parsed exactly "
        f"{accuracy['exact']:.3f} (shape {accuracy['shape']:.3f}, colour {accuracy['color']:.3f}, "
        f"position {accuracy['position']:.3f}, relation {accuracy['relation']:.3f}), "
        f"trained in {accuracy['train_seconds']:.0f}s on {device.type}"
    )
    return (tokenizer, model.cpu()), {**metrics, **{f"parse_{k}": v for k, v in accuracy.items()}}


def _save_text_encoder(tokenizer: Any, text_model: Any, out: Path) -> None:
    te.save_text_encoder(tokenizer, text_model, out)


_GATES: dict[str, tuple[str, str, str, str]] = {
    # model -> (figure key, figure name, config gate field, hint)
    "clip": ("roc_auc", "held-out ROC AUC", "min_clip_auc", "Train longer (clip.steps) or lower min_clip_auc."),
    "autoencoder": (
        "psnr_db", "held-out PSNR (dB)", "min_psnr_db", "Train longer (autoencoder.steps) or lower min_psnr_db.",
    ),
}  # fmt: skip


def _reconstruction_grid(cfg: BootstrapConfig, folder: Path) -> Any:
    """Held-out renders (top row) over their autoencoder reconstructions (bottom row), as a PIL image."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    vae = ae.load_autoencoder(str(folder))
    images = render_batch(GRID_IMAGES, cfg.seed + HELDOUT_SEED_OFFSET + 1)[0]
    restored = ae.decode_latents(vae, ae.encode_images(vae, images))
    tiles = [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in [*images, *restored]]
    return make_image_grid(tiles, rows=2, cols=len(images))


def _log_model(name: str, metrics: dict[str, Any], cfg: BootstrapConfig) -> None:
    import mlflow

    figures = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    mlflow.log_metrics({f"{name}.{key}": float(value) for key, value in figures.items()})
    mlflow.set_tag(f"{name}.trained", str(metrics["trained"]).lower())
    if name in _GATES:
        key, _, gate_field, _ = _GATES[name]
        passed = metrics[key] >= getattr(cfg, gate_field)
        mlflow.set_tag(f"{name}.gate", "passed" if passed else "failed")


def _gate(cfg: BootstrapConfig, stage: _Stage, metrics: dict[str, Any], log: Callable[[str], None]) -> None:
    if stage.name not in _GATES:
        return
    key, figure, gate_field, hint = _GATES[stage.name]
    folder = next(iter(stage.targets.values()))
    if not metrics["trained"]:
        log(f"[{stage.name}] reusing {folder} (same config), {figure} {metrics[key]:.4f}")
    _check_gate(stage.name, figure, metrics[key], getattr(cfg, gate_field), folder, hint)


def run_bootstrap(cfg: BootstrapConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or reuse) CLIP, text encoder and autoencoder under ``cfg.workdir``; returns their metrics.

    Raises `BootstrapGateError` when the CLIP AUC or the autoencoder PSNR is below its gate; the MLflow
    run then ends FAILED with the figure logged.
    """
    import mlflow

    from ldm import tracking

    log = log or (lambda message: print(message, flush=True))
    bootstrap_device(cfg)  # a missing GPU fails here, before anything is rendered
    workdir = WorkDir(cfg.workdir)
    workdir.models.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir.models / "bootstrap.yaml")
    staging = workdir.models / ".staging"
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()

    @cache
    def training_set() -> tuple[np.ndarray, list[str]]:
        images, captions, _ = render_batch(cfg.num_train_images, cfg.seed)
        log(f"[bootstrap] rendered {len(captions)} training pairs ({time.perf_counter() - started:.0f}s)")
        return images, captions

    results: dict[str, Any] = {}
    stages = _stages(cfg, workdir, training_set, log)
    experiment_id = tracking.experiment(EXPERIMENT, workdir.root)
    try:
        with (
            mlflow.start_run(experiment_id=experiment_id, run_name="bootstrap") as run,
            Progress(total=len(stages), label="bootstrap") as progress,
        ):
            mlflow.log_params(cfg.flat())
            for stage in stages:
                if stage.name == "text_encoder":  # a new CLIP means a new text tower
                    stage = replace(stage, retrain=results["clip"]["trained"])
                _, results[stage.name] = _reuse_or_train(cfg, stage, staging)
                _log_model(stage.name, results[stage.name], cfg)
                progress.advance(f"{stage.name} {'trained' if results[stage.name]['trained'] else 'reused'}")
                _gate(cfg, stage, results[stage.name], log)
            mlflow.log_image(_reconstruction_grid(cfg, workdir.autoencoder), "reconstructions.png")
            results["mlflow_run_id"] = run.info.run_id
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)

    results["seconds"] = time.perf_counter() - started
    results["workdir"] = str(workdir.root)
    log(f"[bootstrap] done in {results['seconds']:.0f}s: models in {workdir.models}")
    return results
