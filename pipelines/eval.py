"""`ldm eval`: score a model, log the scores to MLflow, then (optionally) apply the promotion gate.

`run_eval` is those three steps, each its own function: `score_model` (generate and score, no MLflow
writes), `log_eval` (one MLflow run: config, metrics, per-prompt table, grids; tags on the model
version) and `pipelines.eval_gate.apply_gate` (move ``champion`` or say why not).

What is scored depends on the data (`ldm.config.eval`): the synthetic domain's held-out and seen
compositions checked by code (`ldm.evaluation.geneval`), or, on any data, ``clip_score`` and ``cmmd``
on the training data's hold-out rows or a prompt file (`ldm.evaluation.clip_metrics`).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ldm import tracking
from ldm.config.eval import EvalConfig
from ldm.errors import DataError
from ldm.pipeline import LoadedModel

Kind = Literal["geneval", "clip"]


@dataclass
class EvalResult:
    """What `score_model` measured. ``scores`` are the model's own numbers (the gate may use any of
    them); ``context`` the numbers to read them against (``ceiling.*`` or ``reference.*``)."""

    kind: Kind
    loaded: LoadedModel
    scores: dict[str, float]
    context: dict[str, float]
    prompts: list[str]  # one per image
    images: list[Any]  # PIL images, held-out prompts only
    per_image: list[dict[str, Any]]  # {"prompt", "passed"} or {"prompt", "clip_score"}
    data: str | None  # the training data the hold-out / seen sets came from
    notes: list[str] = field(default_factory=list)

    def final_line(self) -> dict[str, float | None]:
        """The JSON line `ldm eval` ends with (NaN, a value that could not be measured, as null)."""
        line = dict(self.scores)
        if self.kind == "geneval":
            line["autoencoder_ceiling"] = self.context["ceiling.overall"]
        else:
            line |= self.context
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in line.items()}

    def summary(self) -> list[str]:
        """Human-readable lines printed before the JSON line."""
        lines = list(self.notes)
        if self.kind == "geneval":
            for key, value in self.scores.items():
                if key.startswith("seen."):
                    continue
                seen = self.scores.get(f"seen.{key}")
                lines.append(
                    f"{key:>14}: {value:.3f}   (seen {'-' if seen is None else f'{seen:.3f}'}, "
                    f"autoencoder ceiling {self.context.get(f'ceiling.{key}', float('nan')):.3f})"
                )
        else:
            for key, value in self.scores.items():
                lines.append(
                    f"{key:>14}: {value:.4f}   (hold-out images: {self.context[f'reference.{key}']:.4f})"
                )
        return lines


class Progress:
    """Generation progress on stderr: a bar on a terminal, else one line per ``every`` prompts (logs)."""

    def __init__(self, total: int, label: str, every: int):
        self.total, self.label, self.every, self.done = total, label, every, 0
        self.started = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"eval {label}", unit="prompt", file=sys.stderr)

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
            if self.done >= self.total:
                self.bar.close()
        elif self.done // self.every > before // self.every or self.done >= self.total:
            elapsed = time.perf_counter() - self.started
            print(
                f"[eval] {self.label}: {self.done}/{self.total} prompts ({elapsed:.0f}s)",
                file=sys.stderr,
                flush=True,
            )


def generate_all(pipe, prompts: list[str], cfg: EvalConfig, label: str) -> list:
    """``cfg.images_per_prompt`` images per prompt; prompt i's images use seeds from
    ``cfg.seed + i * images_per_prompt``, so an image does not depend on the batch its prompt fell in."""
    from ldm.pipeline import generate

    chunk = min(cfg.batch_size, cfg.progress_every)
    progress = Progress(len(prompts), label, cfg.progress_every)
    images: list = []
    for start in range(0, len(prompts), chunk):
        batch = prompts[start : start + chunk]
        result = generate(
            pipe,
            batch,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            seed=cfg.seed + start * cfg.images_per_prompt,
            num_images=cfg.images_per_prompt,
            scheduler=cfg.scheduler,
        )
        images.extend(result.images)
        progress.update(len(batch))
    return images


# --- score ------------------------------------------------------------------------------------------
def _kind(cfg: EvalConfig, data: str | None) -> Kind:
    """``cfg.metrics``, or for "auto": clip when given prompts or hold-out captions outside the grammar."""
    if cfg.metrics != "auto":
        return cfg.metrics
    if cfg.prompts:
        return "clip"
    if data is None:
        return "geneval"
    from ldm.synth.grammar import parse_caption
    from pipelines.eval_data import holdout_captions

    captions = holdout_captions(data)
    for caption in captions:
        try:
            parse_caption(caption)
        except ValueError:
            return "clip"
    return "geneval"


def _score_synthetic(cfg: EvalConfig, loaded: LoadedModel, data: str | None) -> EvalResult:
    from ldm.evaluation.geneval import score
    from ldm.evaluation.synthetic import autoencoder_ceiling, grammar_seen_captions, seen_prompts
    from ldm.pipeline import output_size
    from ldm.synth.grammar import heldout_prompts
    from pipelines.eval_data import training_captions

    def numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in report.items() if isinstance(v, int | float)}

    pipe: Any = loaded.pipe  # a diffusers StableDiffusionPipeline
    prompts = heldout_prompts(cfg.num_prompts, cfg.prompt_seed)
    expanded = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    images = generate_all(loaded.pipe, prompts, cfg, "held-out")
    report = score(expanded, images)
    scores, notes = numbers(report), []
    if cfg.seen_count:
        source = f"the training data {data}" if data else "the synthetic grammar (training data unknown)"
        captions = training_captions(data) if data else grammar_seen_captions()
        try:
            seen = seen_prompts(captions, cfg.seen_count, cfg.prompt_seed)
        except ValueError as error:
            raise DataError(f"{source}: {error}") from error
        notes.append(f"seen compositions drawn from {source}")
        seen_images = generate_all(loaded.pipe, seen, cfg, "seen")
        scores |= numbers(
            score([p for p in seen for _ in range(cfg.images_per_prompt)], seen_images), "seen."
        )
    ceiling = autoencoder_ceiling(pipe.vae, prompts, cfg.seed, output_size(loaded.pipe))
    per_image = [{"prompt": p["prompt"], "passed": bool(p["passed"])} for p in report["per_prompt"]]
    return EvalResult(
        "geneval", loaded, scores, numbers(ceiling, "ceiling."), expanded, images, per_image, data, notes
    )


def _score_any(cfg: EvalConfig, loaded: LoadedModel, data: str | None) -> EvalResult:
    import torch

    from ldm.evaluation.clip_metrics import clip_score, cmmd, image_text_features, reference_metrics
    from ldm.first_stage.autoencoder import decode_latents
    from ldm.first_stage.clip import load_clip
    from pipelines.eval_data import read_holdout, read_prompt_file

    pipe: Any = loaded.pipe  # a diffusers StableDiffusionPipeline
    if data is None and not cfg.prompts:
        raise DataError("no hold-out data to evaluate on: set data=FOLDER or prompts=FILE")
    rows = read_holdout(data, max(cfg.num_reference, cfg.num_prompts)) if data else None
    prompts = read_prompt_file(cfg.prompts) if cfg.prompts else rows.captions  # type: ignore[union-attr]
    prompts = prompts[: cfg.num_prompts]
    expanded = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    images = generate_all(loaded.pipe, prompts, cfg, "hold-out" if not cfg.prompts else "prompts")
    bundle = load_clip(cfg.clip_spec)
    image_features, text_features = image_text_features(bundle, images, expanded)
    per_image = [
        {"prompt": p, "clip_score": float(s)}
        for p, s in zip(expanded, (image_features * text_features).sum(-1).tolist(), strict=True)
    ]
    scores = {"clip_score": clip_score(image_features, text_features), "cmmd": float("nan")}
    context = {"reference.clip_score": float("nan"), "reference.cmmd": float("nan")}
    notes = []
    if rows is not None:
        try:
            real = decode_latents(pipe.vae, torch.from_numpy(rows.latents))
        except ValueError as error:
            raise DataError(
                f"{data}: hold-out latents do not fit this model's autoencoder: {error}"
            ) from error
        real_features, real_text = image_text_features(bundle, list(real), rows.captions)
        scores["cmmd"] = cmmd(image_features, real_features)
        context = {f"reference.{k}": v for k, v in reference_metrics(real_features, real_text).items()}
        notes.append(f"{len(prompts)} prompts, {len(rows.keys)} hold-out images decoded from {data}")
    else:
        notes.append("no hold-out data: cmmd needs real images (set data=FOLDER)")
    return EvalResult("clip", loaded, scores, context, expanded, images, per_image, data, notes)


def score_model(cfg: EvalConfig, model_uri: str | None = None) -> EvalResult:
    """Generate and score; nothing is written to MLflow (reads only: the model, its training run)."""
    from ldm.pipeline import load_pipeline
    from pipelines.eval_data import model_training_data

    loaded = load_pipeline(model_uri or cfg.model)
    data = cfg.data or model_training_data(loaded.name, loaded.version)
    if _kind(cfg, data) == "clip":
        return _score_any(cfg, loaded, data)
    return _score_synthetic(cfg, loaded, data)


# --- run: score, log, gate ----------------------------------------------------------------------------
def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Score the model, log one MLflow run, apply the gate when ``cfg.promote``; returns the report."""
    from pipelines.eval_gate import apply_gate
    from pipelines.eval_log import log_eval

    tracking.experiment(cfg.experiment, cfg.workdir)
    result = score_model(cfg)
    run_id = log_eval(cfg, result)
    decision = apply_gate(cfg, result, run_id, rescore=score_model)
    return {
        "kind": result.kind,
        "scores": result.scores,
        "ceiling": {
            k.removeprefix("ceiling."): v for k, v in result.context.items() if k.startswith("ceiling.")
        },
        "reference": {
            k.removeprefix("reference."): v for k, v in result.context.items() if k.startswith("reference.")
        },
        "final": result.final_line(),
        "summary": result.summary(),
        "run_id": run_id,
        "model": result.loaded.uri,
        "data": result.data,
        **decision,
    }
