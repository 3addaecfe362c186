"""`ldm bootstrap`: train the first-stage models of the offline default on the synthetic source.

The recipe: render training pairs -> train the CLIP scorer (gate: ROC AUC of matched vs mismatched
captions) -> copy its text tower into a CLIPTextModel (check: hidden states agree) -> train the
autoencoder (gate: PSNR) and set its latent scaling factor. Each model goes to its `WorkDir` folder
with a ``metrics.json`` that records the quality figure and a digest of the config that made it; a
later run with the same config reuses the model (the demo re-runs fast, a crash resumes), and a run
whose figure misses its gate raises `BootstrapGateError`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.config.base import dump_config
from ldm.config.bootstrap import BootstrapConfig
from ldm.contract import WorkDir
from ldm.first_stage import autoencoder as ae
from ldm.first_stage import clip
from ldm.first_stage import text_encoder as te
from ldm.synth.grammar import hard_negatives

METRICS_FILE = "metrics.json"
HELDOUT_SEED_OFFSET = 1_000_003  # held-out renders use another seed than the training set
TEXT_ENCODER_TOLERANCE = 1e-4  # the conversion is exact; anything above this is a mapping bug


class BootstrapGateError(RuntimeError):
    """A first-stage model ended below its quality gate."""


def _digest(cfg: BootstrapConfig, section: str) -> str:
    """What a saved model depends on: the data (seed, size) and its own section (not the gates)."""
    keys = {
        "seed": cfg.seed,
        "num_train_images": cfg.num_train_images,
        section: getattr(cfg, section).to_dict(),
    }
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


def _mismatched_captions(scenes: list, seed: int) -> list[str]:
    """For each scene, another scene's caption that it does NOT satisfy (by the evaluation's rules).

    A random other caption is often still true ("a circle and a square" for a red square beside a
    blue circle); counting those as negatives would cap the AUC below 1 for a perfect scorer.
    """
    from ldm.evaluation.geneval import check

    rng = np.random.default_rng(seed)
    mismatched = []
    for scene in scenes:
        while True:
            other = scenes[int(rng.integers(len(scenes)))]
            if not check(other.spec, scene.objects):
                mismatched.append(other.caption)
                break
    return mismatched


def _train_clip(cfg: BootstrapConfig, images: np.ndarray, captions: list[str], log) -> tuple[Any, dict]:
    from ldm.synth.render import render_batch

    torch.manual_seed(cfg.seed)
    bundle = clip.bundle_for(clip.build_clip(cfg.clip), name="bootstrap")
    started = time.perf_counter()
    losses = clip.train_clip(bundle, images, captions, cfg.clip, seed=cfg.seed, log=log)
    seconds = time.perf_counter() - started
    held_images, held_captions, held_scenes = render_batch(
        cfg.clip.eval_pairs, cfg.seed + HELDOUT_SEED_OFFSET
    )
    mismatched = _mismatched_captions(held_scenes, cfg.seed)
    auc = clip.matched_vs_mismatched_auc(bundle, held_images, held_captions, mismatched)
    # Not a gate: how well it tells a caption from one a single attribute away (shape, count, position).
    rng = np.random.default_rng(cfg.seed)
    hard = [str(rng.choice(hard_negatives(c))) for c in held_captions]
    hard_auc = clip.matched_vs_mismatched_auc(bundle, held_images, held_captions, hard)
    log(
        f"[clip] held-out ROC AUC {auc:.4f} (gate {cfg.min_clip_auc}), against one-attribute "
        f"negatives {hard_auc:.4f}, trained in {seconds:.0f}s"
    )
    return bundle, {
        "roc_auc": auc,
        "hard_negative_auc": hard_auc,
        "eval_pairs": cfg.clip.eval_pairs,
        "train_seconds": seconds,
        **_loss_summary(losses),
    }


def _train_autoencoder(cfg: BootstrapConfig, images: np.ndarray, log) -> tuple[Any, dict]:
    from ldm.synth.render import render_batch

    torch.manual_seed(cfg.seed)
    vae = ae.build_autoencoder(cfg.autoencoder)
    started = time.perf_counter()
    losses = ae.train_autoencoder(vae, images, cfg.autoencoder, seed=cfg.seed, log=log)
    seconds = time.perf_counter() - started
    scaling_factor = ae.latent_scaling_factor(vae, images[: cfg.autoencoder.scaling_images])
    vae.register_to_config(scaling_factor=scaling_factor)
    held_images, _, _ = render_batch(cfg.autoencoder.eval_images, cfg.seed + HELDOUT_SEED_OFFSET + 1)
    psnr = ae.reconstruction_psnr(vae, held_images)
    log(
        f"[autoencoder] held-out PSNR {psnr:.2f} dB (gate {cfg.min_psnr_db}), scaling factor "
        f"{scaling_factor:.3f}, trained in {seconds:.0f}s"
    )
    metrics = {
        "psnr_db": psnr,
        "scaling_factor": scaling_factor,
        "eval_images": cfg.autoencoder.eval_images,
        "train_seconds": seconds,
        **_loss_summary(losses),
    }
    return vae, metrics


def run_bootstrap(cfg: BootstrapConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or reuse) CLIP, text encoder and autoencoder under ``cfg.workdir``; returns their metrics.

    Raises `BootstrapGateError` when the CLIP AUC or the autoencoder PSNR is below its gate.
    """
    log = log or (lambda message: print(message, flush=True))
    workdir = WorkDir(cfg.workdir)
    workdir.models.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir.models / "bootstrap.yaml")
    staging = workdir.models / ".staging"
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()

    @cache
    def training_set() -> tuple[np.ndarray, list[str]]:
        from ldm.synth.render import render_batch

        images, captions, _ = render_batch(cfg.num_train_images, cfg.seed)
        log(f"[bootstrap] rendered {len(captions)} training pairs ({time.perf_counter() - started:.0f}s)")
        return images, captions

    results: dict[str, Any] = {}
    try:
        # 1. CLIP scorer
        clip_digest = _digest(cfg, "clip")
        metrics = _reusable(cfg, workdir.clip, clip_digest)
        clip_bundle = None
        if metrics is None:
            clip_bundle, metrics = _train_clip(cfg, *training_set(), log)
            metrics |= {"digest": clip_digest, "config": cfg.clip.to_dict()}
            clip.save_clip(clip_bundle, staging / "clip")
            (staging / "clip" / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            _publish(staging, {"clip": workdir.clip})
        else:
            log(f"[clip] reusing {workdir.clip} (same config), ROC AUC {metrics['roc_auc']:.4f}")
        results["clip"] = {**metrics, "trained": clip_bundle is not None}
        _check_gate(
            "CLIP scorer",
            "held-out ROC AUC",
            metrics["roc_auc"],
            cfg.min_clip_auc,
            workdir.clip,
            "Train longer (clip.steps) or lower min_clip_auc.",
        )

        # 2. text encoder: the CLIP text tower as a transformers CLIPTextModel (redone whenever CLIP is)
        metrics = _reusable(cfg, workdir.text_encoder, clip_digest)
        if metrics is None or clip_bundle is not None or not workdir.tokenizer.is_dir():
            clip_model = (clip_bundle or clip.load_clip(str(workdir.clip))).model
            text_model = te.clip_text_tower_to_transformers(clip_model)
            difference = te.max_hidden_state_difference(clip_model, text_model, _held_out_captions(cfg))
            if difference > TEXT_ENCODER_TOLERANCE:
                raise BootstrapGateError(
                    f"text encoder: hidden states differ from open_clip's by {difference:.2e} "
                    f"(tolerance {TEXT_ENCODER_TOLERANCE}): the weight mapping is wrong"
                )
            metrics = {"max_abs_difference": difference, "digest": clip_digest}
            te.save_text_encoder(te.build_text_tokenizer(clip_model), text_model, staging / "models")
            (staging / "models" / te.TEXT_ENCODER_DIR / METRICS_FILE).write_text(
                json.dumps(metrics, indent=2)
            )
            _publish(
                staging / "models",
                {te.TEXT_ENCODER_DIR: workdir.text_encoder, te.TOKENIZER_DIR: workdir.tokenizer},
            )
            log(f"[text encoder] converted the CLIP text tower (max |difference| {difference:.1e})")
            results["text_encoder"] = {**metrics, "trained": True}
        else:
            results["text_encoder"] = {**metrics, "trained": False}

        # 3. autoencoder
        ae_digest = _digest(cfg, "autoencoder")
        metrics = _reusable(cfg, workdir.autoencoder, ae_digest)
        vae = None
        if metrics is None:
            vae, metrics = _train_autoencoder(cfg, training_set()[0], log)
            metrics |= {"digest": ae_digest, "config": cfg.autoencoder.to_dict()}
            ae.save_autoencoder(vae, staging / "autoencoder")
            (staging / "autoencoder" / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            _publish(staging, {"autoencoder": workdir.autoencoder})
        else:
            log(
                f"[autoencoder] reusing {workdir.autoencoder} (same config), PSNR {metrics['psnr_db']:.2f} dB"
            )
        results["autoencoder"] = {**metrics, "trained": vae is not None}
        _check_gate(
            "autoencoder",
            "held-out PSNR (dB)",
            metrics["psnr_db"],
            cfg.min_psnr_db,
            workdir.autoencoder,
            "Train longer (autoencoder.steps) or lower min_psnr_db.",
        )
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)

    results["seconds"] = time.perf_counter() - started
    results["workdir"] = str(workdir.root)
    log(f"[bootstrap] done in {results['seconds']:.0f}s: models in {workdir.models}")
    return results


def _held_out_captions(cfg: BootstrapConfig) -> list[str]:
    from ldm.synth.render import render_batch

    return render_batch(64, cfg.seed + HELDOUT_SEED_OFFSET)[1]
