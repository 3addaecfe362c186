"""`ldm eval`: GenEval-style prompt adherence of a model, checked by code, and the promotion gate.

The model generates images for held-out prompts of the synthetic grammar (prompts the source never
emitted, so never trained on); `ldm.evaluation.geneval.score` checks each image against what its
prompt asserts (objects, counts, colours, positions, bindings) by looking at the pixels. The result is
logged to MLflow (scores as metrics, a grid of the failures, per-prompt results as a table) and stored
as tags on the model version, where the promotion gate reads the champion's score.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ldm import tracking
from ldm.config.eval import EvalConfig

SCORE_TAG = "eval.overall"


def _generate_all(pipe, prompts: list[str], cfg: EvalConfig) -> list:
    from ldm.pipeline import generate

    images = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        for offset, prompt in enumerate(batch):
            # Each prompt gets its own seed so a prompt's image does not depend on the batch it fell in.
            result = generate(
                pipe,
                prompt,
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed + start + offset,
                num_images=cfg.images_per_prompt,
                scheduler=cfg.scheduler,
            )
            images.extend(result.images)
    return images


def autoencoder_ceiling(vae, prompts: list[str], seed: int, size: int) -> dict[str, float]:
    """Scores of true renders of ``prompts`` after a round trip through the pipeline's autoencoder.

    No U-Net can do better than its first stage lets it: a detail the autoencoder cannot reconstruct
    (a small star's arms, at 64 px through 16x16 latents) is lost to generation too. Reported beside the
    model's scores so that a low score can be told apart from a low ceiling.
    """
    import numpy as np
    from PIL import Image

    from ldm.evaluation.geneval import score
    from ldm.first_stage.autoencoder import decode_latents, encode_images
    from ldm.synth.grammar import parse_caption, scene_for_prompt
    from ldm.synth.render import render_scene

    rng = np.random.default_rng(seed)
    renders = np.stack(
        [np.asarray(render_scene(scene_for_prompt(parse_caption(p), rng), size=size)) for p in prompts]
    )
    decoded = decode_latents(vae, encode_images(vae, renders))
    report = score(prompts, [Image.fromarray(image) for image in decoded])
    return {k: float(v) for k, v in report.items() if isinstance(v, int | float)}


def evaluate_model(cfg: EvalConfig, model_uri: str | None = None) -> dict[str, Any]:
    """Generate for the held-out prompts and score them; returns scores, per-prompt results, images,
    and the autoencoder's ceiling on the same prompts."""
    from ldm.evaluation.geneval import score
    from ldm.pipeline import load_pipeline, output_size
    from ldm.synth.grammar import heldout_prompts

    prompts = heldout_prompts(cfg.num_prompts, cfg.prompt_seed)
    loaded = load_pipeline(model_uri or cfg.model)
    images = _generate_all(loaded.pipe, prompts, cfg)
    expanded = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    report = score(expanded, images)
    ceiling = autoencoder_ceiling(loaded.pipe.vae, prompts, cfg.seed, output_size(loaded.pipe))
    return {"loaded": loaded, "prompts": expanded, "images": images, "report": report, "ceiling": ceiling}


def _champion_score(cfg: EvalConfig) -> tuple[str | None, float | None]:
    from mlflow import MlflowClient

    from ldm.registry import get_alias_version

    version = get_alias_version(cfg.model_name, tracking.ALIAS_CHAMPION)
    if version is None:
        return None, None
    tags = MlflowClient().get_model_version(cfg.model_name, version).tags
    if SCORE_TAG in tags:
        return version, float(tags[SCORE_TAG])
    # A champion never evaluated (set by hand, say): score it now on the same prompts.
    result = evaluate_model(cfg, f"models:/{cfg.model_name}/{version}")
    return version, float(result["report"]["overall"])


def gate(candidate: float, champion: float | None, floor: float) -> tuple[bool, str]:
    """The promotion rule: at least the champion's overall score and at least the floor."""
    if candidate < floor:
        return False, f"overall {candidate:.3f} is below the floor {floor:.3f}"
    if champion is not None and candidate < champion:
        return False, f"overall {candidate:.3f} is below the champion's {champion:.3f}"
    if champion is None:
        return True, f"overall {candidate:.3f} >= floor {floor:.3f} and there is no champion yet"
    return True, f"overall {candidate:.3f} >= champion's {champion:.3f} and floor {floor:.3f}"


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    from ldm.pipeline import make_grid
    from ldm.registry import set_alias

    tracking.experiment(cfg.experiment, cfg.workdir)
    result = evaluate_model(cfg)
    loaded, report = result["loaded"], result["report"]
    scores = {k: float(v) for k, v in report.items() if isinstance(v, int | float)}
    decision: dict[str, Any] = {"promoted": False, "reason": "promotion not requested"}

    with mlflow.start_run(experiment_id=tracking.experiment(cfg.experiment, cfg.workdir)) as run:
        mlflow.log_params({f"eval.{k}": v for k, v in cfg.flat().items()})
        mlflow.log_params(
            {"model.uri": loaded.uri, "model.name": loaded.name, "model.version": loaded.version}
        )
        mlflow.log_metrics({f"geneval.{k}": v for k, v in scores.items()})
        mlflow.log_metrics({f"ceiling.{k}": v for k, v in result["ceiling"].items()})
        passed = [bool(entry["passed"]) for entry in report["per_prompt"]]
        rows = [{"prompt": p, "passed": bool(ok)} for p, ok in zip(result["prompts"], passed, strict=False)]
        mlflow.log_table(
            {"prompt": [r["prompt"] for r in rows], "passed": [r["passed"] for r in rows]},
            artifact_file="eval/per_prompt.json",
        )
        failures = [img for img, ok in zip(result["images"], passed, strict=False) if not ok][:32]
        if failures:
            cols = min(8, len(failures))
            mlflow.log_image(
                make_grid(failures, (len(failures) + cols - 1) // cols, cols), "eval/failures.png"
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "scores.json"
            path.write_text(json.dumps(scores, indent=2))
            mlflow.log_artifact(str(path), "eval")

        if loaded.name and loaded.version:
            client = MlflowClient()
            client.set_model_version_tag(loaded.name, loaded.version, SCORE_TAG, f"{scores['overall']:.4f}")
            client.set_model_version_tag(loaded.name, loaded.version, "eval.run_id", run.info.run_id)
            if cfg.promote:
                champion_version, champion = _champion_score(cfg)
                if champion_version == loaded.version:
                    decision = {
                        "promoted": False,
                        "reason": f"version {loaded.version} already is the champion",
                    }
                else:
                    ok, reason = gate(scores["overall"], champion, cfg.floor)
                    if ok:
                        set_alias(loaded.name, tracking.ALIAS_CHAMPION, loaded.version)
                    decision = {"promoted": ok, "reason": reason, "previous_champion": champion_version}
                mlflow.set_tags(
                    {"gate.promoted": str(decision["promoted"]), "gate.reason": decision["reason"]}
                )
        elif cfg.promote:
            decision = {
                "promoted": False,
                "reason": "the model is not a registered version (use models:/...)",
            }
    return {
        "scores": scores,
        "ceiling": result["ceiling"],
        "run_id": run.info.run_id,
        "model": loaded.uri,
        **decision,
    }
