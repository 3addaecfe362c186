"""`ldm eval` and the promotion gate, on tiny registered models in a real MLflow (SQLite) registry.

The tiny models are random, so their scores are whatever the code-based checks find (near 0); the
gate tests set the champion's recorded score to put the candidate above or below it.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ldm.config.eval import EvalConfig
from ldm.evaluate import SCORE_TAG, gate, run_eval
from ldm.synth.grammar import CATEGORIES

FAST = ["num_prompts=6", "num_inference_steps=2", "batch_size=6"]


def register_tiny(work, seed: int) -> str:
    from ldm.registry import register_pipeline
    from ldm.testing import tiny_pipeline_folder

    folder = tiny_pipeline_folder(work / f"model-{seed}", seed=seed)
    return register_pipeline(folder, name="ldm", workdir=work)


def fast_eval_config(work, model: str, **update) -> EvalConfig:
    return EvalConfig(
        workdir=str(work), model=model, num_prompts=6, num_inference_steps=2, batch_size=6, **update
    )


def test_ldm_eval_prints_per_category_scores_ends_with_json_and_logs_to_mlflow(tmp_path):
    import mlflow

    from ldm.cli import app
    from ldm.tracking import configure

    work = tmp_path / "work"
    version = register_tiny(work, seed=0)
    sets = [arg for item in FAST for arg in ("--set", item)]
    result = CliRunner().invoke(
        app, ["eval", "--workdir", str(work), "--model", f"models:/ldm/{version}", *sets]
    )
    assert result.exit_code == 0, result.output

    lines = result.stdout.strip().splitlines()  # stdout only: progress bars go to stderr
    scores = json.loads(lines[-1])
    assert set(scores) == {*CATEGORIES, "overall", "autoencoder_ceiling"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    # The ceiling scores true renders after the model's own (random) autoencoder: were the round trip
    # skipped, clean renders would score 1.0 (tests/test_evaluation.py).
    assert scores["autoencoder_ceiling"] < 0.5
    assert scores["overall"] == pytest.approx(sum(scores[c] for c in CATEGORIES) / len(CATEGORIES))
    for category in CATEGORIES:  # a human-readable line per category before the JSON
        assert any(line.strip().startswith(f"{category}:") for line in lines[:-1])

    configure(work)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("eval")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["geneval.overall"] == pytest.approx(scores["overall"])
    assert run.data.metrics["ceiling.overall"] == pytest.approx(scores["autoencoder_ceiling"])
    assert {f"ceiling.{c}" for c in CATEGORIES} <= set(run.data.metrics)
    assert run.data.params["model.version"] == version
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/scores.json", "eval/per_prompt.json"} <= artifacts
    per_prompt = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval/per_prompt.json"))
    assert len(per_prompt["data"]) == 6
    if scores["overall"] < 1.0:
        assert "eval/failures.png" in artifacts
    tags = client.get_model_version("ldm", version).tags
    assert float(tags[SCORE_TAG]) == pytest.approx(scores["overall"], abs=1e-4)


def test_the_gate_rule():
    assert gate(0.5, None, 0.4)[0] is True
    assert gate(0.5, 0.5, 0.4)[0] is True  # ties go to the candidate
    assert gate(0.5, 0.6, 0.4) == (False, "overall 0.500 is below the champion's 0.600")
    assert gate(0.3, None, 0.4)[0] is False


def test_promotion_gate_promotes_a_good_enough_candidate_and_refuses_a_worse_one(tmp_path):
    from mlflow import MlflowClient

    from ldm.registry import get_alias_version, set_alias

    work = tmp_path / "work"
    first, second = register_tiny(work, seed=0), register_tiny(work, seed=1)
    client = MlflowClient()

    # No champion yet, floor 0: the first candidate becomes champion.
    promoted = run_eval(fast_eval_config(work, f"models:/ldm/{first}", promote=True, floor=0.0))
    assert promoted["promoted"] is True, promoted["reason"]
    assert get_alias_version("ldm", "champion") == first

    # The champion scored 1.0 earlier: the second candidate cannot beat it and is refused.
    client.set_model_version_tag("ldm", first, SCORE_TAG, "1.0")
    refused = run_eval(fast_eval_config(work, f"models:/ldm/{second}", promote=True, floor=0.0))
    assert refused["promoted"] is False and "champion" in refused["reason"]
    assert get_alias_version("ldm", "champion") == first

    # A floor above what the candidate scored refuses it even against a weak champion.
    client.set_model_version_tag("ldm", first, SCORE_TAG, "0.0")
    floor = min(1.0, refused["scores"]["overall"] + 0.01)
    below_floor = run_eval(fast_eval_config(work, f"models:/ldm/{second}", promote=True, floor=floor))
    assert below_floor["promoted"] is False and "floor" in below_floor["reason"]
    assert get_alias_version("ldm", "champion") == first

    # At least the champion's score and the floor: promoted, the alias moves.
    accepted = run_eval(fast_eval_config(work, f"models:/ldm/{second}", promote=True, floor=0.0))
    assert accepted["promoted"] is True, accepted["reason"]
    assert get_alias_version("ldm", "champion") == second
    set_alias("ldm", "champion", first)  # leave the registry as a user would expect after a test
