"""The notebooks under notebooks/ run top to bottom (nbclient) against a tiny real work directory.

The work directory is made by the real jobs at tiny size: a synthetic shard over HTTP, `run_ingest`,
`run_train` (sample grids at every step), `run_eval` with the gate (the first version becomes
champion), and a live Ray Serve endpoint that the endpoint notebook calls. Each notebook ends by
printing ``SUMMARY {json}``; the test checks those numbers against what the jobs did. The committed
notebooks carry no outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from ops_fixtures import render_shard, tiny_eval, tiny_ingest, tiny_train

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ("01_data.ipynb", "02_experiments.ipynb", "03_endpoint.ipynb")


def test_notebooks_are_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(book)
        code = [cell for cell in book.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first cell holds the parameters"


def _notebook_definitions(name: str, cell_text: str, names: set[str]) -> dict:
    """Run the top-level definitions ``names`` of the code cell that contains ``cell_text``."""
    import ast

    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    (source,) = [cell.source for cell in book.cells if cell.cell_type == "code" and cell_text in cell.source]
    tree = ast.parse(source)
    keep = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        or (isinstance(node, ast.FunctionDef) and node.name in names)
        or (isinstance(node, ast.Assign) and {t.id for t in node.targets if isinstance(t, ast.Name)} & names)
    ]
    import numpy as np
    from PIL import Image

    namespace: dict = {"np": np, "Image": Image}
    exec(compile(ast.Module(body=keep, type_ignores=[]), name, "exec"), namespace)  # noqa: S102
    return namespace


def test_endpoint_notebook_diversity_check_fails_a_constant_image():
    """The sweep's diversity threshold is one a generator that ignores its seed cannot pass."""
    import numpy as np
    from PIL import Image

    found = _notebook_definitions("03_endpoint.ipynb", "def diversity", {"diversity", "MIN_DIVERSITY"})
    diversity, threshold = found["diversity"], found["MIN_DIVERSITY"]
    rng = np.random.default_rng(0)
    constant = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    assert diversity([constant] * 4) == 0.0 < threshold
    speckled = np.full((64, 64, 3), 128, np.uint8)
    speckled[0, 0] = 129  # one pixel one grey level off: still the same picture
    assert diversity([constant, Image.fromarray(speckled)]) < threshold
    noise = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    assert diversity(noise) > threshold


def _run(name: str) -> dict:
    from nbclient import NotebookClient

    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    printed = [
        output.get("text", "")
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "stream"
    ]
    lines = [line for text in printed for line in text.splitlines() if line.startswith("SUMMARY ")]
    assert len(lines) == 1, f"{name} printed no SUMMARY line"
    return json.loads(lines[0].removeprefix("SUMMARY "))


@pytest.mark.slow  # tiny ingest, train and eval, an endpoint, three kernels: ~2 minutes on 2 busy cores
@pytest.mark.nightly  # `make test-all`; see the Makefile
def test_notebooks_run_on_a_tiny_work_directory(ray_local, tmp_path, monkeypatch):
    from ingest_fixtures import write_tiny_models

    from ldm.config.serve import ServeConfig
    from ldm.synth.server import ImageServer
    from ldm.synth.source import write_pairs
    from pipelines.eval import run_eval
    from pipelines.ingest import run_ingest
    from pipelines.train import run_train
    from serve.app import run_serve, shutdown_serve

    work = write_tiny_models(tmp_path / "work")
    with ImageServer(render_shard(work.synth, seed=3, num_pairs=12)) as server:
        pairs = write_pairs(work.synth, server.base_url)
        manifest = run_ingest(tiny_ingest(work.root, input=str(pairs)))
    trained = run_train(tiny_train(work.root, max_steps=2, sample_every=1, run_name="nb"))
    version = str(trained["model_version"])
    report = run_eval(tiny_eval(work.root, model=f"models:/ldm/{version}", promote=True))
    assert report["promoted"]

    monkeypatch.setenv("LDM_WORKDIR", str(work.root))
    data = _run("01_data.ipynb")
    assert data["accepted"] == manifest.counts.accepted == 11  # one of 12 rows is a dead URL
    assert data["funnel"]["input"] == 12 and data["reasons"] == {"download_failed": 1}
    assert data["decoded"] == 8  # the first eight accepted latents, decoded back to pixels

    experiments = _run("02_experiments.ipynb")
    assert experiments["train_runs"] == 1 and experiments["loss_points"] == {"nb": 2}
    assert experiments["grids"] == 2  # sampled at steps 1 and 2
    assert experiments["evaluations"] == 1 and experiments["versions"] == 1
    assert experiments["aliases"] == {"candidate": version, "champion": version}

    base_url = run_serve(
        ServeConfig(workdir=str(work.root), port=0, min_replicas=1, max_replicas=1, replica_num_cpus=0.25),
        block=False,
    )
    try:
        monkeypatch.setenv("LDM_ENDPOINT", base_url)
        for name, value in {
            "LDM_STEPS": "2",
            "LDM_GUIDANCE": "1,5",
            "LDM_SEEDS": "2",
            "LDM_PROMPTS": "6",
        }.items():
            monkeypatch.setenv(name, value)
        endpoint = _run("03_endpoint.ipynb")
    finally:
        shutdown_serve()
    assert endpoint["model"]["version"] == version
    assert endpoint["same_seed_identical"] and endpoint["other_seed_differs"]
    assert [row["guidance"] for row in endpoint["sweep"]] == [1.0, 5.0]
    assert all(0.0 <= row["adherence"] <= 1.0 for row in endpoint["sweep"])
    assert endpoint["diverse"] and all(
        row["diversity"] >= endpoint["min_diversity"] for row in endpoint["sweep"]
    )
