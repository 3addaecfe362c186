"""The MLflow side of `ldm eval`: one run with the config, the scores, per-prompt results and grids,
and the scores as tags on the evaluated model version (where the promotion gate reads a champion's)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ldm import tracking
from ldm.config.eval import EvalConfig

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.eval import EvalResult

TAG_PREFIX = "eval."  # model version tag of each reported score: eval.overall, eval.clip_score, ...
RUN_TAG = "eval.run_id"
GRID_CELLS = 16
LABEL_HEIGHT = 28


def score_tag(metric: str) -> str:
    return f"{TAG_PREFIX}{metric}"


def _metric_names(result: EvalResult) -> dict[str, float]:
    """MLflow metric names: the synthetic held-out scores keep their ``geneval.`` prefix (the
    notebooks and earlier runs read it); everything else is logged under its reported key."""
    names = {}
    for key, value in {**result.scores, **result.context}.items():
        plain = result.kind == "clip" or key.startswith(("seen.", "ceiling."))
        names[key if plain else f"geneval.{key}"] = value
    return {k: v for k, v in names.items() if not math.isnan(v)}


def labelled_grid(images: list[Image.Image], labels: list[str], cols: int = 4) -> Image.Image:
    """Image/prompt pairs in a grid: each image upscaled to at least 128 px with its prompt under it."""
    from PIL import Image, ImageDraw

    size = max(128, images[0].width)
    rows = (len(images) + cols - 1) // cols
    cell_h = size + LABEL_HEIGHT
    grid = Image.new("RGB", (cols * size, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    chars = max(8, size // 6)  # the default bitmap font is ~6 px per character
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        row, col = divmod(index, cols)
        grid.paste(
            image.convert("RGB").resize((size, size), Image.Resampling.NEAREST), (col * size, row * cell_h)
        )
        text = label if len(label) <= 2 * chars else label[: 2 * chars - 1] + "~"
        draw.multiline_text(
            (col * size + 2, row * cell_h + size + 2), f"{text[:chars]}\n{text[chars:]}", fill="black"
        )
    return grid


def _log_grids(result: EvalResult) -> None:
    import mlflow

    from ldm.pipeline import make_grid

    count = min(GRID_CELLS, len(result.images))
    mlflow.log_image(labelled_grid(result.images[:count], result.prompts[:count]), "eval/pairs.png")
    if result.kind == "geneval":
        passed = [entry["passed"] for entry in result.per_image]
        failures = [img for img, ok in zip(result.images, passed, strict=True) if not ok][:32]
        if failures:
            cols = min(8, len(failures))
            mlflow.log_image(
                make_grid(failures, (len(failures) + cols - 1) // cols, cols), "eval/failures.png"
            )


def log_eval(cfg: EvalConfig, result: EvalResult) -> str:
    """One MLflow run in ``cfg.experiment``; returns its id. Tags the model version when registered."""
    import mlflow
    from mlflow import MlflowClient

    loaded = result.loaded
    with mlflow.start_run(experiment_id=tracking.experiment(cfg.experiment, cfg.workdir)) as run:
        mlflow.log_params({f"eval.{k}": v for k, v in cfg.flat().items()})
        mlflow.log_params(
            {
                "model.uri": loaded.uri,
                "model.name": loaded.name,
                "model.version": loaded.version,
                "eval.kind": result.kind,
                "eval.data_used": result.data,
            }
        )
        mlflow.log_metrics(_metric_names(result))
        columns = result.per_image[0].keys()
        mlflow.log_table({c: [row[c] for row in result.per_image] for c in columns}, "eval/per_prompt.json")
        _log_grids(result)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "scores.json"
            path.write_text(json.dumps(result.final_line(), indent=2))
            mlflow.log_artifact(str(path), "eval")
    if loaded.name and loaded.version:
        client = MlflowClient()
        for key, value in result.scores.items():
            if not math.isnan(value):
                client.set_model_version_tag(loaded.name, loaded.version, score_tag(key), f"{value:.4f}")
        client.set_model_version_tag(loaded.name, loaded.version, RUN_TAG, run.info.run_id)
    return run.info.run_id
