"""`ldm eval` and the promotion gate, on tiny registered models in a real MLflow (SQLite) registry.

The tiny models are random, so their scores are whatever the code-based checks find (near 0); the
gate tests set the champion's recorded score to put the candidate above or below it.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ldm.config.eval import EvalConfig, GateConfig
from ldm.errors import LdmError
from ldm.synth.grammar import CATEGORIES
from pipelines.eval import run_eval
from pipelines.eval_gate import gate
from pipelines.eval_log import score_tag

SCORE_TAG = score_tag("overall")

FAST = ["num_prompts=6", "num_inference_steps=2", "batch_size=6", "progress_every=3"]


def register_tiny(work, seed: int) -> str:
    from ldm.registry import register_pipeline
    from ldm.testing import tiny_pipeline_folder

    folder = tiny_pipeline_folder(work / f"model-{seed}", seed=seed)
    return register_pipeline(folder, name="ldm", workdir=work)


def fast_eval_config(work, model: str, **update) -> EvalConfig:
    return EvalConfig(
        workdir=str(work),
        model=model,
        num_prompts=6,
        num_seen_prompts=0,
        num_inference_steps=2,
        batch_size=6,
        **update,
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

    lines = result.stdout.strip().splitlines()  # stdout only: progress goes to stderr
    scores = json.loads(lines[-1])
    seen = {f"seen.{c}" for c in CATEGORIES} | {"seen.overall"}
    assert set(scores) == {*CATEGORIES, "overall", "autoencoder_ceiling", *seen}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    # Not a TTY: a progress line per 3 prompts (progress_every=3) for the held-out and the seen set.
    progress = [line for line in result.stderr.splitlines() if line.startswith("[eval]")]
    expected = [f"[eval] {label}: {n}/6 prompts" for label in ("held-out", "seen") for n in (3, 6)]
    assert [line.rsplit(" (", 1)[0] for line in progress] == expected
    # No training data is known for a bare registered folder: the seen set comes from the grammar.
    assert any("seen compositions drawn from the synthetic grammar" in line for line in lines)
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
    assert run.data.metrics["seen.overall"] == pytest.approx(scores["seen.overall"])
    assert run.data.params["model.version"] == version
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/scores.json", "eval/per_prompt.json", "eval/pairs.png"} <= artifacts
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
    assert gate(0.3, None, None)[0] is True  # no floor
    # Lower is better (cmmd): the floor is a maximum, a smaller value beats the champion.
    assert gate(0.2, 0.3, 0.5, "cmmd", higher_is_better=False)[0] is True
    assert gate(0.4, 0.3, 0.5, "cmmd", False) == (False, "cmmd 0.400 is above the champion's 0.300")
    assert gate(0.6, None, 0.5, "cmmd", False) == (False, "cmmd 0.600 is above the floor 0.500")
    assert gate(float("nan"), None, None, "cmmd", False)[0] is False


def test_promotion_gate_promotes_a_good_enough_candidate_and_refuses_a_worse_one(tmp_path):
    from mlflow import MlflowClient

    from ldm.registry import get_alias_version, set_alias

    work = tmp_path / "work"
    first, second = register_tiny(work, seed=0), register_tiny(work, seed=1)
    client = MlflowClient()

    # No champion yet, floor 0: the first candidate becomes champion.
    promoted = run_eval(
        fast_eval_config(work, f"models:/ldm/{first}", promote=True, gate=GateConfig(floor=0.0))
    )
    assert promoted["promoted"] is True, promoted["reason"]
    assert get_alias_version("ldm", "champion") == first

    # The champion scored 1.0 earlier: the second candidate cannot beat it and is refused.
    client.set_model_version_tag("ldm", first, SCORE_TAG, "1.0")
    refused = run_eval(
        fast_eval_config(work, f"models:/ldm/{second}", promote=True, gate=GateConfig(floor=0.0))
    )
    assert refused["promoted"] is False and "champion" in refused["reason"]
    assert get_alias_version("ldm", "champion") == first

    # A floor above what the candidate scored refuses it even against a weak champion.
    client.set_model_version_tag("ldm", first, SCORE_TAG, "0.0")
    floor = min(1.0, refused["scores"]["overall"] + 0.01)
    below_floor = run_eval(
        fast_eval_config(work, f"models:/ldm/{second}", promote=True, gate=GateConfig(floor=floor))
    )
    assert below_floor["promoted"] is False and "floor" in below_floor["reason"]
    assert get_alias_version("ldm", "champion") == first

    # At least the champion's score and the floor: promoted, the alias moves.
    accepted = run_eval(
        fast_eval_config(work, f"models:/ldm/{second}", promote=True, gate=GateConfig(floor=0.0))
    )
    assert accepted["promoted"] is True, accepted["reason"]
    assert get_alias_version("ldm", "champion") == second
    set_alias("ldm", "champion", first)  # leave the registry as a user would expect after a test


# --- any data: clip_score and cmmd on hold-out rows ---------------------------------------------------
def write_latents(path, captions: list[str], splits: list[str] | None, seed: int = 0) -> None:
    """Latents rows as ingest writes them (4 x 8 x 8 fp16 latents, the tiny pipeline's), with `split`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ldm.contract import COL_CAPTION, COL_KEY, COL_LATENT, COL_SPLIT

    rng = np.random.default_rng(seed)
    latents = rng.normal(0, 1, (len(captions), 4, 8, 8)).astype(np.float16)
    columns = {
        COL_KEY: pa.array([f"{i:05d}" for i in range(len(captions))]),
        COL_CAPTION: pa.array(captions),
        COL_LATENT: pa.FixedShapeTensorArray.from_numpy_ndarray(latents),
    }
    if splits is not None:
        columns[COL_SPLIT] = pa.array(splits)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


WEB_CAPTIONS = [f"a photo of {thing}" for thing in ("a dog", "a red car", "two cats", "a lighthouse")] * 3


def test_eval_on_any_data_reports_clip_score_and_cmmd_against_the_holdout_images(tmp_path):
    import mlflow
    import numpy as np
    import torch
    from ingest_fixtures import write_tiny_models

    from ldm.cli import app
    from ldm.evaluation.clip_metrics import image_text_features, reference_metrics
    from ldm.first_stage.autoencoder import decode_latents
    from ldm.first_stage.clip import load_clip
    from ldm.pipeline import load_pipeline
    from ldm.tracking import configure

    work = write_tiny_models(tmp_path / "work")
    version = register_tiny(work.root, seed=0)
    data = tmp_path / "data" / "latents" / "part-0.parquet"
    splits = ["holdout" if i % 2 else "train" for i in range(len(WEB_CAPTIONS))]
    write_latents(data, WEB_CAPTIONS, splits)
    sets = ["num_prompts=4", "num_inference_steps=2", "batch_size=4", f"data={data.parent.parent}"]
    args = ["eval", "--workdir", str(work.root), "--model", f"models:/ldm/{version}"]
    result = CliRunner().invoke(app, [*args, *[x for item in sets for x in ("--set", item)]])
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(final) == {"clip_score", "cmmd", "reference.clip_score", "reference.cmmd"}
    assert -1.0 <= final["clip_score"] <= 1.0 and np.isfinite(final["cmmd"])

    # The reference is the hold-out images themselves, decoded from their latents by the model's
    # autoencoder and scored with the workdir's CLIP: recomputed here from the parts.
    holdout = [i for i, s in enumerate(splits) if s == "holdout"]
    pipe = load_pipeline(f"models:/ldm/{version}").pipe
    import pyarrow.parquet as pq

    latents = pq.read_table(data)["latent"].combine_chunks().to_numpy_ndarray()[holdout]
    real = decode_latents(pipe.vae, torch.from_numpy(latents.astype(np.float32)))
    features = image_text_features(load_clip(str(work.clip)), list(real), [WEB_CAPTIONS[i] for i in holdout])
    reference = reference_metrics(*features)
    assert final["reference.clip_score"] == pytest.approx(reference["clip_score"], abs=1e-4)
    assert final["reference.cmmd"] == pytest.approx(reference["cmmd"], abs=1e-4)

    configure(work.root)
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    assert run.data.metrics["cmmd"] == pytest.approx(final["cmmd"])
    assert run.data.params["eval.kind"] == "clip"
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval/per_prompt.json"))
    prompts = [row[0] for row in table["data"]]
    assert prompts == [WEB_CAPTIONS[i] for i in holdout][:4]  # the hold-out captions, by key
    assert np.mean([row[1] for row in table["data"]]) == pytest.approx(final["clip_score"], abs=1e-5)
    assert "eval/pairs.png" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert float(client.get_model_version("ldm", version).tags["eval.cmmd"]) == pytest.approx(
        final["cmmd"], abs=1e-4
    )

    # A prompt file instead of the hold-out captions; cmmd still against the hold-out images.
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# my prompts\na watercolour fox\n\na city at night\n")
    again = CliRunner().invoke(
        app, [*args, *[x for item in sets for x in ("--set", item)], "--set", f"prompts={prompt_file}"]
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.strip().splitlines()[-1])["reference.cmmd"] == pytest.approx(
        final["reference.cmmd"]
    )


def test_eval_on_data_without_a_holdout_split_says_so_in_one_line(tmp_path):
    from ingest_fixtures import write_tiny_models

    from ldm.cli import app

    work = write_tiny_models(tmp_path / "work")
    version = register_tiny(work.root, seed=0)
    data = tmp_path / "rows.parquet"
    write_latents(data, WEB_CAPTIONS, splits=None)
    result = CliRunner().invoke(
        app,
        ["eval", "--workdir", str(work.root), "--model", f"models:/ldm/{version}"]
        + ["--set", f"data={data}", "--set", "metrics=clip", "--set", "num_inference_steps=1"],
    )
    assert result.exit_code == 2
    # stderr also holds MLflow's download bars; the error itself is one line
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        f"error: {data}: no `split` column; ingest it with a hold-out split, or give a prompt file "
        "(--set prompts=FILE)"
    ]


def test_gate_on_cmmd_lower_is_better(tmp_path):
    from ingest_fixtures import write_tiny_models
    from mlflow import MlflowClient

    from ldm.registry import get_alias_version

    work = write_tiny_models(tmp_path / "work")
    first, second = register_tiny(work.root, seed=0), register_tiny(work.root, seed=1)
    data = tmp_path / "data.parquet"
    write_latents(data, WEB_CAPTIONS, ["holdout"] * len(WEB_CAPTIONS))
    cfg = fast_eval_config(work.root, f"models:/ldm/{first}", data=str(data), promote=True)
    cfg = cfg.model_copy(update={"gate": GateConfig(metric="cmmd")})
    promoted = run_eval(cfg)
    assert promoted["kind"] == "clip" and promoted["metric"] == "cmmd" and promoted["promoted"]
    # The champion's recorded cmmd is far below anything a distance can reach: the candidate is refused.
    MlflowClient().set_model_version_tag("ldm", first, "eval.cmmd", "-1000.0")
    refused = run_eval(cfg.model_copy(update={"model": f"models:/ldm/{second}"}))
    assert refused["promoted"] is False and "above the champion's -1000.000" in refused["reason"]
    assert get_alias_version("ldm", "champion") == first
    with pytest.raises(LdmError, match="not a reported score"):
        run_eval(
            cfg.model_copy(update={"model": f"models:/ldm/{second}", "gate": GateConfig(metric="overall")})
        )
